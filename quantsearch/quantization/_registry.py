"""The registry that names the algorithms: ``@register_quantizer("qat")`` and its look-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ._base import Quantizer
from ._config import AlgorithmRules, ConfigError

__all__ = [
    "QUANTIZERS",
    "algorithm_rules",
    "get_quantizer",
    "missing_examples",
    "register_quantizer",
]

Q = TypeVar("Q", bound=type[Quantizer])

#: Algorithm name -> quantizer class, in registration order.
QUANTIZERS: dict[str, type[Quantizer]] = {}


def missing_examples(cls: type) -> str | None:
    """Why ``cls`` cannot join the conformance suite, or None when it declares its examples."""
    if not isinstance(cls, type) or not issubclass(cls, Quantizer):
        return f"{cls!r} is not a Quantizer subclass"
    # Its own declaration: a subclass that only inherits its parent's cases has not said what
    # its own config_lists look like.
    if not cls.__dict__.get("examples"):
        return (
            f"{cls.__name__} declares no conformance examples: set the class attribute "
            "`examples = (Example(id, config_list, bits), ...)` (see "
            "quantsearch.quantization.testing)"
        )
    return None


def register_quantizer(name: str) -> Callable[[Q], Q]:
    """Class decorator: register an algorithm under ``name``.

    The class must declare its own ``examples``; the conformance suite then runs every check on
    each of them. Refused (``TypeError``/``ValueError``): a name taken by another class, or a
    class without examples.
    """

    def register(cls: Q) -> Q:
        problem = missing_examples(cls)
        if problem is not None:
            raise TypeError(f"cannot register {name!r}: {problem}")
        if name in QUANTIZERS and QUANTIZERS[name] is not cls:
            raise ValueError(
                f"cannot register {name!r}: already taken by {QUANTIZERS[name].__name__}"
            )
        QUANTIZERS[name] = cls
        return cls

    return register


def get_quantizer(name: str) -> type[Quantizer]:
    """The quantizer class registered under ``name`` (see :data:`QUANTIZERS`)."""
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown algorithm {name!r}: expected one of {', '.join(QUANTIZERS)}"
        ) from None


def algorithm_rules(name: str) -> AlgorithmRules:
    """The rules of the algorithm registered under ``name``: its ``options`` (key -> default
    and validator), ``quant_types``, ``min_bits``/``max_bits``, whether it ``trains`` and
    whether it is ``affine``. Raises :class:`ConfigError` naming the registered algorithms for
    an unknown name."""
    return get_quantizer(name).rules
