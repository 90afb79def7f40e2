"""The per-layer latency table of a study (``latency: {table: true}``), measured once, as HAQ
and HAWQ-V3 do: the float model's latency, and for each layer a trial quantizes, at each
setting the space gives it, the latency with that layer alone quantized (its weight and the
space's activations for it) in the otherwise float model.

Each model is exported as the latency metric exports a trial (``export_onnx(...,
sub_byte_types=False)``) and timed by ``measure_latency`` with the space's LatencySetup, in
turn with the float model in one loop; the entries run one after the other in the study's
own process (timing two at once would slow both). Stored in the study record after each
entry, so a resumed study, or another machine's worker, reads it back.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from quantsearch.pipeline import (
    LatencyEntry,
    LatencySetup,
    LatencyTable,
    StudyRecord,
    build_compressed,
    measure_latency,
)
from quantsearch.quantization import QUANT_TYPES
from quantsearch.search._config_builder import FLOAT, SpacePlan
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._objective import float_state_of, train_config
from quantsearch.search._sensitivity_plan import param_values
from quantsearch.search._spec import BITS_PARAMS, SearchSpec
from quantsearch.search._workers import available_cores
from quantsearch.tasks import Task, batches_of

__all__ = [
    "LatencyTableError",
    "ensure_latency_table",
    "layer_config_list",
    "measure_latency_table",
    "reference_key",
    "table_settings",
]

# The config keys that change the exported graph (per-channel scales, signedness); the others
# (rounding, bias correction, quant_start_step) change weight values or training only.
_GRAPH_KEYS = ("quant_types", "quant_bits", "op_names", "quant_scheme", "quant_dtype")
_ACTIVATIONS = ("input", "output")


class LatencyTableError(RuntimeError):
    """A latency table entry that could not be measured (its message says which and why)."""


def reference_key(spec: SearchSpec) -> str:
    """The float model's key among ``measure_latency``'s references: the trials' own."""
    return f"{spec.task.name}:{json.dumps(spec.task.options, sort_keys=True)}"


def _sources(plan: SpacePlan) -> dict[str, dict[str, str]]:
    """Each quantized layer (model order) -> quant type -> the parameter giving its bits."""
    out: dict[str, dict[str, str]] = {}
    for name, _ in plan.layers.modules:
        for quant_type in QUANT_TYPES:
            source = plan.bits_source.get((name, quant_type))
            if source is not None:
                out.setdefault(name, {})[quant_type] = source
    return out


def table_settings(plan: SpacePlan) -> dict[str, list[dict[str, int]]]:
    """Each layer a trial may quantize -> every setting (bits per quant type) the space gives
    it, in the space's order; a layer's all-float setting is left out (it adds nothing)."""
    out: dict[str, list[dict[str, int]]] = {}
    for layer, sources in _sources(plan).items():
        params = list(dict.fromkeys(sources.values()))
        settings: list[dict[str, int]] = []
        for combination in itertools.product(*(param_values(plan.params[p]) for p in params)):
            chosen = dict(zip(params, combination, strict=True))
            bits = {
                quant_type: int(chosen[source])
                for quant_type, source in sources.items()
                if chosen[source] != FLOAT
            }
            if bits and bits not in settings:
                settings.append(bits)
        if settings:
            out[layer] = settings
    return out


def layer_config_list(plan: SpacePlan, layer: str, bits: Mapping[str, int]) -> list[dict]:
    """The config_list that quantizes ``layer`` alone at ``bits``, as a trial's config_list
    writes it (the space's other settings at their first value)."""
    values: dict[str, Any] = {}
    for key, param in plan.params.items():
        if key.rpartition(".")[2] in BITS_PARAMS:
            values[key] = FLOAT
        else:
            values[key] = param.candidates()[0] if isinstance(param, NniParam) else param
    entry = plan.entry(bits, [layer], values)
    return [{key: value for key, value in entry.items() if key in _GRAPH_KEYS}]


class _Measurer:
    """Builds and times the models of one study's table, in this process."""

    def __init__(
        self, spec: SearchSpec, task: Task, plan: SpacePlan, float_weights: str | Path | None
    ) -> None:
        self.spec = spec
        self.task = task
        self.plan = plan
        self.setup = spec.latency or LatencySetup()
        self.float_state: Mapping[str, Tensor] | None = (
            None if float_weights is None else float_state_of(str(float_weights))
        )
        self.config = train_config(task, spec.train)

    def float_model(self) -> nn.Module:
        return build_compressed(
            self.task, self.spec.algorithm, [], float_state=self.float_state
        ).model

    def layer_model(self, layer: str, bits: Mapping[str, int]) -> nn.Module:
        config_list = layer_config_list(self.plan, layer, bits)
        compressed = build_compressed(
            self.task, self.spec.algorithm, config_list, float_state=self.float_state
        )
        assert compressed.quantizer is not None
        if any(quant_type in _ACTIVATIONS for quant_type in bits):
            # Activation ranges for the export (their values do not change the time).
            generator = torch.Generator().manual_seed(self.spec.seed)
            batches = batches_of(
                self.task.train_set,
                self.config,
                shuffle=True,
                generator=generator,
                task=self.task,
            )
            compressed.model.to(batches.device)
            with compressed.quantizer.calibrate(), torch.no_grad():
                for batch in itertools.islice(batches, 1):
                    self.task.output(compressed.model, batch)
        return compressed.model.cpu().eval()

    def time_float(self) -> tuple[float, float]:
        measured = measure_latency(self.float_model().eval(), self.task.dummy_input, self.setup)
        return measured.median_ms, measured.spread_ms

    def entry(self, layer: str, bits: Mapping[str, int]) -> LatencyEntry:
        try:
            measured = measure_latency(
                self.layer_model(layer, bits),
                self.task.dummy_input,
                self.setup,
                reference=self.float_model().eval(),
                reference_key=reference_key(self.spec),
            )
        except Exception as error:
            raise LatencyTableError(
                f"timing {layer} at {dict(bits)} alone failed: {type(error).__name__}: {error}; "
                "the entries measured so far are stored, and the next run goes on from them"
            ) from error
        assert measured.reference_ms is not None
        return LatencyEntry(
            layer=layer,
            bits=dict(bits),
            latency_ms=measured.median_ms,
            spread_ms=measured.spread_ms,
            float_ms=measured.reference_ms,
            float_ops=measured.float_ops,
        )


def measure_latency_table(
    spec: SearchSpec,
    task: Task,
    plan: SpacePlan,
    float_weights: str | Path | None,
    *,
    stored: LatencyTable | None = None,
    save: Callable[[LatencyTable], None] = lambda table: None,
    log: Callable[[str], None] = lambda text: None,
    count: Callable[[int, int], None] = lambda done, total: None,
) -> LatencyTable:
    """Measure every (layer, setting) not yet in ``stored`` (a table of another setup or
    another set of layers is measured again), in this process; ``save`` gets the table after
    each entry, ``count`` the entries done and their total."""
    started = time.perf_counter()
    measurer = _Measurer(spec, task, plan, float_weights)
    settings = table_settings(plan)
    if not settings:
        raise LatencyTableError("the space quantizes no layer: there is no latency to tabulate")
    setup = measurer.setup.to_dict()
    if stored is None or stored.setup != setup or stored.settings != settings:
        float_ms, float_spread = measurer.time_float()
        stored = LatencyTable(
            setup=setup, float_ms=float_ms, float_spread_ms=float_spread, settings=settings
        )
        log(
            f"latency table: float model {float_ms:.3f} ms per batch of {measurer.setup.batch_size}"
        )
        save(stored)
    current = stored
    total = sum(len(s) for s in settings.values())
    done = total - len(current.missing)
    count(done, total)
    for layer, bits in current.missing:
        entry = measurer.entry(layer, bits)
        now = time.perf_counter()
        current = current.model_copy(
            update={
                "entries": [*current.entries, entry],
                "seconds": current.seconds + now - started,
            }
        )
        started = now
        done += 1
        save(current)
        count(done, total)
        log(
            f"latency table {done}/{total}: {layer} at {_bits_text(bits)} "
            f"{entry.latency_ms:.3f} ms ({entry.delta_ms:+.3f} against float)"
        )
    current = current.model_copy(update={"complete": True})
    save(current)
    return current


def _bits_text(bits: Mapping[str, int]) -> str:
    return ", ".join(f"{quant_type} {value}" for quant_type, value in bits.items())


def ensure_latency_table(
    study: optuna.Study,
    spec: SearchSpec,
    task: Task,
    plan: SpacePlan,
    float_path: Path | None,
    *,
    log: Callable[[str], None],
    count: Callable[[int, int], None] = lambda done, total: None,
) -> LatencyTable:
    """The study's latency table: read back when complete, else measured (from where a
    killed pass stopped) and stored in the study as it goes."""
    stored = StudyRecord.of(study).latency_table
    setup = (spec.latency or LatencySetup()).to_dict()
    if stored is not None and stored.complete and stored.setup == setup:
        return stored
    if stored is not None and stored.entries:
        log(f"latency table: resuming ({len(stored.entries)} measured)")
    else:
        log("latency table: timing each layer's bit widths alone in the float model ...")

    def save(table: LatencyTable) -> None:
        StudyRecord.write(study, latency_table=table)

    # One timed model at a time, on the threads the setup names (torch's for building only).
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, available_cores()))
    try:
        made = measure_latency_table(
            spec, task, plan, float_path, stored=stored, save=save, log=log, count=count
        )
    finally:
        torch.set_num_threads(threads)
    log(f"latency table: done in {made.seconds:.1f} s")
    return made
