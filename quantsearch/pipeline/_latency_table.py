"""The per-layer latency table: what a study measured once, per layer and bit width, in
onnxruntime, and the latency of any config predicted from it (HAQ's and HAWQ-V3's lookup).

Each entry is one layer quantized alone (as a trial quantizes it: its weight and the space's
activations for it) in the otherwise float model, timed in turn with the float model in one
loop. The prediction of a config adds, over its quantized layers, each entry's change relative
to the float model it was timed with, scaled to the float model's own time:

    predicted = float_ms * (1 + sum over layers of (entry.latency_ms / entry.float_ms - 1))

(relative, because the load of a shared machine changes between entries: an entry and the float
run beside it slow alike, so their ratio holds where their difference does not).

It assumes the layers' changes add up. They do not where onnxruntime fuses neighbours (a conv
whose output and the ReLU after it are both quantized runs as one integer kernel only when
both are): the report says how far prediction and measurement differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LATENCY_TABLE_VERSION", "LatencyEntry", "LatencyTable", "bits_key"]

#: Raised when a field changes meaning.
LATENCY_TABLE_VERSION = 1


def bits_key(bits: Mapping[str, int]) -> str:
    """One string per layer setting (``{"weight": 4, "output": 8}``), independent of order."""
    return json.dumps({k: int(v) for k, v in bits.items()}, sort_keys=True)


class LatencyEntry(BaseModel):
    """One layer at one setting, alone quantized in the float model."""

    model_config = ConfigDict(frozen=True)

    layer: str
    bits: dict[str, int]
    """Bits per quant type, as ``Quantizer.layer_bits`` gives them for the layer."""
    latency_ms: float
    """Median milliseconds per batch of the model with this layer alone quantized."""
    spread_ms: float
    """The interquartile range of those runs."""
    float_ms: float
    """The float model's median, timed in the same loop (one run of each in turn)."""
    float_ops: int = 0
    """Compute ops of that model's export that stay float (the float model's: all of them)."""

    @property
    def delta_ms(self) -> float:
        """What quantizing this layer alone adds to the float model's time (negative: saves)."""
        return self.latency_ms - self.float_ms

    @property
    def relative_change(self) -> float:
        """That change as a share of the float model's time timed beside it."""
        return self.latency_ms / self.float_ms - 1.0 if self.float_ms > 0 else 0.0


class LatencyTable(BaseModel):
    """What a study measured for its latency table; stored as its ``latency_table`` attribute.

    Written as it goes (after each entry), so a killed pass continues where it stopped.
    """

    model_config = ConfigDict(frozen=True)

    version: int = LATENCY_TABLE_VERSION
    setup: dict[str, Any]
    """The LatencySetup of every measurement (batch size, threads, provider, repeats)."""
    float_ms: float
    """The float model's median milliseconds per batch."""
    float_spread_ms: float
    settings: dict[str, list[dict[str, int]]]
    """Every setting to measure, per layer in model order (a layer's float setting is not
    listed: it adds nothing)."""
    entries: list[LatencyEntry] = Field(default_factory=list)
    complete: bool = False
    seconds: float = 0.0

    def entry(self, layer: str, bits: Mapping[str, int]) -> LatencyEntry | None:
        key = bits_key(bits)
        return next((e for e in self.entries if e.layer == layer and bits_key(e.bits) == key), None)

    @property
    def missing(self) -> list[tuple[str, dict[str, int]]]:
        """(layer, setting) of every setting not measured yet, in the table's order."""
        return [
            (layer, bits)
            for layer, settings in self.settings.items()
            for bits in settings
            if self.entry(layer, bits) is None
        ]

    def contributions(self, layer_bits: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
        """Each quantized layer of a config (``TrialRecord.layer_bits``) -> its entry's change
        in ms at the table's float time (``relative_change * float_ms``); KeyError naming the
        first layer or setting the table lacks."""
        out: dict[str, float] = {}
        for layer, bits in layer_bits.items():
            if not bits:
                continue
            entry = self.entry(layer, bits)
            if entry is None:
                raise KeyError(f"the latency table has no entry for {layer} at {dict(bits)}")
            out[layer] = entry.relative_change * self.float_ms
        return out

    def predict(self, layer_bits: Mapping[str, Mapping[str, int]]) -> float:
        """The predicted latency (ms) of a config: ``float_ms`` + the sum of its layers'
        contributions (never below 0). KeyError when a layer's setting was not measured."""
        return max(0.0, self.float_ms + sum(self.contributions(layer_bits).values()))

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per entry: layer, bits, its latency, the float time beside it, the change."""
        for entry in self.entries:
            yield {
                "layer": entry.layer,
                "bits": bits_key(entry.bits),
                "latency_ms": entry.latency_ms,
                "spread_ms": entry.spread_ms,
                "float_ms": entry.float_ms,
                "delta_ms": entry.delta_ms,
                "float_ops": entry.float_ops,
            }
