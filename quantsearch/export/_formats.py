"""Export formats by name: what ``export_trial(format=...)`` and ``--format`` accept.

Every format first gets the base files (model.pt, calibration.json, model.qpk and
model_dequantized.pt, each reloaded and evaluated); a format's handler then writes its own files
from the rebuilt models and returns its part of the result::

    @register_export_format("bits", description="those and the layers' bits as JSON")
    def export_bits(context: ExportContext) -> BitsPart:
        path = context.out_dir / "bits.json"
        path.write_text(json.dumps(context.record.layer_bits))
        return BitsPart(path)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from quantsearch.export._errors import ExportError

if TYPE_CHECKING:
    from torch import nn

    from quantsearch.pipeline import TrialRecord
    from quantsearch.quantization import Quantizer
    from quantsearch.tasks import Task

__all__ = [
    "DEFAULT_FORMAT",
    "EXPORT_FORMATS",
    "ExportContext",
    "ExportFormat",
    "ExportHandler",
    "ExportPart",
    "describe_formats",
    "get_export_format",
    "register_export_format",
]

DEFAULT_FORMAT = "packed"


@dataclass(frozen=True)
class ExportContext:
    """What a format's handler gets: the trial's models, rebuilt from its checkpoint, and the
    folder that already holds the base files."""

    trial_number: int
    record: TrialRecord
    """What the study stored about the trial (config_list, layer_bits, accuracies...)."""
    task: Task
    out_dir: Path
    model: nn.Module
    """The trial's trained model as the study evaluated it (compressed; bare for a float
    trial)."""
    quantizer: Quantizer | None
    """The quantizer that wraps ``model``; None for a float trial."""
    float_model: nn.Module
    """The task's architecture holding the trial's trained float weights (model.pt)."""
    deployed: nn.Module
    """The deployed model: model.qpk loaded by ``load_packed``."""
    stored_accuracy: float
    """The trial's test ``metric`` as the study stored it."""
    metric: str = "accuracy"
    """The test metric the export checks."""
    evaluate: Callable[[nn.Module], float] | None = None
    """That metric of a model on the test split, as the export measures it (None: the task's
    own ``measure``)."""


class ExportPart(Protocol):
    """A format's part of an :class:`~quantsearch.export.ExportResult`."""

    def summary(self) -> dict[str, Any]:
        """The format's section of export.json (under the format's name)."""
        ...

    def describe(self) -> list[str]:
        """Terminal lines, printed after the base files'."""
        ...

    def check(self, trial_number: int) -> None:
        """Raise ExportError when the format's files are wrong (run after export.json is
        written, so the files stay for inspection)."""
        ...


#: A format's handler: writes its files into ``context.out_dir``; None when it adds nothing.
ExportHandler = Callable[[ExportContext], ExportPart | None]
_Handler = TypeVar("_Handler", bound=ExportHandler)


@dataclass(frozen=True)
class ExportFormat:
    """A registered export format."""

    name: str
    description: str
    """What ``--format NAME`` writes, for the command's help."""
    handler: ExportHandler


#: Every export format by name, in registration order (the built-ins: packed, onnx).
EXPORT_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(name: str, *, description: str) -> Callable[[_Handler], _Handler]:
    """Register the decorated handler as export format ``name`` (``format=name``,
    ``quantsearch export --format name``); a name already taken is refused."""

    def register(handler: _Handler) -> _Handler:
        if name in EXPORT_FORMATS:
            raise ValueError(f"export format {name!r} is already registered")
        EXPORT_FORMATS[name] = ExportFormat(name, description, handler)
        return handler

    return register


def get_export_format(name: str) -> ExportFormat:
    """The format called ``name``; ExportError lists the known ones."""
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise ExportError(
            f"unknown export format {name!r}: expected one of {list(EXPORT_FORMATS)}"
        ) from None


@register_export_format(DEFAULT_FORMAT, description="state dict, calibration and packed model")
def _packed(context: ExportContext) -> None:
    """The base files are the whole of this format."""
    return None


def describe_formats() -> str:
    """Each format and what it writes, in one line (``quantsearch export --help``)."""
    return "; ".join(
        f"{name}: {entry.description}" + (" (default)" if name == DEFAULT_FORMAT else "")
        for name, entry in EXPORT_FORMATS.items()
    )
