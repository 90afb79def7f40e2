from __future__ import annotations

from quantsearch.quantization.testing import ConformanceNet as TinyNet
from quantsearch.quantization.testing import example_batch as batch
from quantsearch.quantization.testing import make_net

__all__ = ["TinyNet", "batch", "make_net"]

