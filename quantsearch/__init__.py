"""quantsearch: NNI-style quantizers for PyTorch and an Optuna search over their settings."""

__version__ = "0.1.0"

__all__ = ["__version__"]
