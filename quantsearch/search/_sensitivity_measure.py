"""Per-layer sensitivity, measured once on the float model: for every per-layer bits parameter
(a layer's ``weight_bits``, ...) and bit width, the float model quantized post-training at that
one parameter alone, evaluated on a few validation batches (loss and accuracy, or the task's
own: ``Sensitivity.metric``); ``method: hessian`` adds HAWQ-V2's mean Hessian trace x
||Q(W) - W||^2 per weight. Each bit width also gets the bytes it saves, by
``model_size_bytes``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from quantsearch.pipeline import (
    Bits,
    ParamSensitivity,
    Sensitivity,
    SensitivityEntry,
    StudyRecord,
    build_compressed,
    state_sha256,
)
from quantsearch.quantization import model_size_bytes, wrappers_of
from quantsearch.search._config_builder import FLOAT, ModelLayers, SpacePlan
from quantsearch.search._objective import build_task, float_state_of, train_config
from quantsearch.search._rules import MEASURING_ALGORITHM, entry_keys
from quantsearch.search._sensitivity_plan import candidates_of, only_at, searched_tensors
from quantsearch.search._sensitivity_task import (
    batch_loss,
    classifier_sensitivity_eval,
    outputs_on,
    sensitivity_metric,
    task_sensitivity_eval,
)
from quantsearch.search._spec import SearchSpec, SensitivitySpec
from quantsearch.search._workers import InlinePool, ProcessPool
from quantsearch.tasks import Task, batches_of, seed_everything

__all__ = [
    "SensitivityError",
    "SensitivityJob",
    "ensure_sensitivity",
    "measure_sensitivity",
]

# Activation types whose observers need calibration batches before they quantize.
_ACTIVATIONS = ("input", "output")


@dataclass
class _Measurer:
    spec: SearchSpec
    task: Task
    plan: SpacePlan
    float_state: Mapping[str, Tensor]
    float_size: int

    def __post_init__(self) -> None:
        self.config = train_config(self.task, self.spec.train)
        self.batches = (self.spec.sensitivity or SensitivitySpec()).batches
        self.metric = sensitivity_metric(self.spec, self.task)

    def _val_batches(self) -> Iterator[Any]:
        batches = batches_of(self.task.val_set, self.config, shuffle=False, task=self.task)
        return itertools.islice(batches, self.batches)

    def evaluate(self, model: nn.Module) -> tuple[float, float, int]:
        """(loss, metric, examples) on the first validation batches: a classifier's
        cross-entropy and accuracy; another task's own loss and ``metric``
        (``task_sensitivity_eval``)."""
        model.eval()
        if self.task.is_classifier:
            return classifier_sensitivity_eval(model, self._val_batches())
        return task_sensitivity_eval(
            self.task, model, self._val_batches(), self.metric[0], self.reference, self.config
        )

    _reference: list[Tensor] | None = None

    def reference(self) -> list[Tensor]:
        """The float model's outputs on the same batches, computed once."""
        if self._reference is None:
            self._reference = outputs_on(
                self.task, self.float_model(), self._val_batches(), self.config
            )
        return self._reference

    _float_result: tuple[float, float, int] | None = None

    def float_result(self) -> tuple[float, float, int]:
        if self._float_result is None:
            self._float_result = self.evaluate(self.float_model())
        return self._float_result

    def float_model(self) -> nn.Module:
        return build_compressed(
            self.task, MEASURING_ALGORITHM, [], float_state=self.float_state
        ).model

    def measure(self, name: str, tensors: Sequence[str], bits: Bits) -> SensitivityEntry:
        if bits == FLOAT:
            loss, metric, _ = self.float_result()
            return SensitivityEntry(bits=bits, loss=loss, metric=metric, size_delta=0)
        values = only_at(self.plan, name, bits)
        config_list = self.plan.config_list(values)
        # The measuring quantizer's own keys (others, such as quant_start_step, are training's).
        kept = (*entry_keys(MEASURING_ALGORITHM), "quant_types", "quant_bits", "op_names")
        measured = [{k: v for k, v in e.items() if k in kept} for e in config_list]
        compressed = build_compressed(
            self.task, MEASURING_ALGORITHM, measured, float_state=self.float_state
        )
        assert compressed.quantizer is not None
        activations = any(t.rpartition(".")[2] in _ACTIVATIONS for t in tensors)
        # Weights set their own ranges; activations need calibration batches first, and so do
        # weights the space rounds with AdaRound/GPTQ or bias-corrects (measured as trials run).
        fitted = any(
            e.get("rounding", "nearest") != "nearest" or e.get("bias_correction")
            for e in measured
        )
        count = self.spec.calibration_batches if activations or fitted else 1
        self._calibrate(compressed, count)
        loss, metric, _ = self.evaluate(compressed.model)
        # The size the study's own algorithm gives this setting (it may store more or less).
        sized = build_compressed(self.task, self.spec.algorithm, config_list)
        size_delta = model_size_bytes(sized.model) - self.float_size
        return SensitivityEntry(
            bits=bits,
            loss=loss,
            metric=metric,
            size_delta=int(size_delta),
            hessian=self._hessian_measure(compressed.model, tensors),
        )

    def _calibrate(self, compressed: Any, count: int) -> None:
        generator = torch.Generator().manual_seed(self.spec.seed)
        batches = batches_of(
            self.task.train_set, self.config, shuffle=True, generator=generator, task=self.task
        )
        compressed.model.to(batches.device)
        with compressed.quantizer.calibrate(), torch.no_grad():
            for batch in itertools.islice(batches, count):
                self.task.output(compressed.model, batch)

    # Set by ``traces`` before measuring with method hessian: layer -> mean Hessian trace.
    layer_traces: dict[str, float] | None = None

    def _hessian_measure(self, model: nn.Module, tensors: Sequence[str]) -> float | None:
        if self.layer_traces is None:
            return None
        wrappers = wrappers_of(model)
        total, any_weight = 0.0, False
        for tensor in tensors:
            layer, _, quant_type = tensor.rpartition(".")
            if quant_type != "weight" or layer not in self.layer_traces:
                continue
            any_weight = True
            total += self.layer_traces[layer] * _weight_error(wrappers[layer])
        return total if any_weight else None

    def traces(self, layers: Sequence[str], samples: int) -> dict[str, float]:
        """Mean Hessian trace (trace / elements) of the training loss in each layer's weight.

        Hutchinson: E[v^T H v] = tr(H) for Rademacher v; H v by differentiating (g . v).
        """
        model = self.float_model()
        model.eval()  # BatchNorm at its running statistics, as the quantized model runs
        modules = dict(model.named_modules())
        weights = [modules[layer].weight for layer in layers]
        generator = torch.Generator().manual_seed(self.spec.seed)
        batches = batches_of(
            self.task.train_set, self.config, shuffle=True, generator=generator, task=self.task
        )
        sums = [0.0] * len(layers)
        count = 0
        model.to(batches.device)
        for batch in itertools.islice(batches, self.batches):
            loss = batch_loss(self.task, model, batch)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for _ in range(samples):
                vectors = [
                    torch.randint(0, 2, w.shape, generator=generator).to(w) * 2 - 1 for w in weights
                ]
                dot = sum((g * v).sum() for g, v in zip(grads, vectors, strict=True))
                products = torch.autograd.grad(dot, weights, retain_graph=True)
                for index, (hv, v) in enumerate(zip(products, vectors, strict=True)):
                    sums[index] += float((hv * v).sum())
            count += 1
        return {
            layer: sums[i] / (count * samples) / weights[i].numel()
            for i, layer in enumerate(layers)
        }


def _weight_error(wrapper: Any) -> float:
    """||Q(W) - W||^2 in the float weight's own units (a folded BatchNorm's scale undone)."""
    weight = wrapper.module.weight.detach()
    error = wrapper.quantized_weight() - wrapper._folded()[0].detach()
    bn = wrapper.bn
    if bn is not None:
        factor = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            factor = bn.weight.detach() * factor
        shape = (-1,) + (1,) * (weight.dim() - 1)
        factor = factor.reshape(shape)
        error = torch.where(factor != 0, error / factor, torch.zeros_like(error))
    return float((error**2).sum())


@dataclass(frozen=True)
class SensitivityJob:
    """One (per-layer bits parameter, bit width) to measure, in whichever process runs it."""

    number: int
    spec: SearchSpec
    float_weights: str
    float_size_bytes: int
    param: str
    tensors: tuple[str, ...]
    bits: Bits
    layer_traces: dict[str, float] | None = None

    def run(self) -> SensitivityEntry | str:
        """The entry, or why it could not be measured."""
        try:
            measurer = _measurer_of(self.spec, self.float_weights, self.float_size_bytes)
            measurer.layer_traces = self.layer_traces
            return measurer.measure(self.param, self.tensors, self.bits)
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    def on_device(self, device: str) -> SensitivityJob:
        spec = replace(self.spec, train={**self.spec.train, "device": device})
        return replace(self, spec=spec)

    def died(self, reason: str) -> str:
        return f"{reason} while measuring"


# The measurer of the last space and float model this process measured (a worker runs many).
_MEASURERS: dict[tuple[str, str, float, str], _Measurer] = {}


def _measurer_key(spec: SearchSpec, float_weights: str) -> tuple[str, str, float, str]:
    device = str(spec.train.get("device"))
    return spec.space_hash, float_weights, Path(float_weights).stat().st_mtime, device


def _measurer_of(spec: SearchSpec, float_weights: str, float_size: int) -> _Measurer:
    key = _measurer_key(spec, float_weights)
    if key not in _MEASURERS:
        _MEASURERS.clear()
        task = build_task(spec.task, spec.seed)
        plan = SpacePlan(spec, ModelLayers.of(task.build_model()))
        _MEASURERS[key] = _Measurer(spec, task, plan, float_state_of(float_weights), float_size)
    return _MEASURERS[key]


class SensitivityError(RuntimeError):
    """A sensitivity measurement that failed (its message says which and why)."""


def measure_sensitivity(
    spec: SearchSpec,
    task: Task,
    plan: SpacePlan,
    float_weights: str | Path,
    *,
    float_size_bytes: int,
    stored: Sensitivity | None = None,
    pool: InlinePool | ProcessPool | None = None,
    save: Callable[[Sensitivity], None] = lambda s: None,
    log: Callable[[str], None] = lambda text: None,
    count: Callable[[int, int], None] = lambda done, total: None,
) -> Sensitivity:
    """Measure every (per-layer bits parameter, bit width) not yet in ``stored``, on the
    ``pool``'s workers (default: in this process).

    ``save`` gets the sensitivity after each new entry (so a killed pass resumes from it),
    ``count`` the entries done and their total.
    """
    started = time.perf_counter()
    options = spec.sensitivity or SensitivitySpec()
    method = options.method
    seed_everything(spec.seed)
    float_state = float_state_of(str(float_weights))
    measurer = _Measurer(spec, task, plan, float_state, float_size_bytes)
    # Jobs run in this process (an InlinePool) measure with it, not with a rebuilt one.
    _MEASURERS.clear()
    _MEASURERS[_measurer_key(spec, str(float_weights))] = measurer
    tensors = searched_tensors(plan)
    candidates = candidates_of(plan)
    sha = state_sha256(float_state)
    if stored is None or stored.float_sha256 != sha or stored.method != method:
        float_loss, float_metric, samples = measurer.float_result()
        stored = Sensitivity(
            method=method,
            batches=measurer.batches,
            samples=samples,
            float_sha256=sha,
            float_loss=float_loss,
            float_metric=float_metric,
            metric=measurer.metric[0],
            direction=measurer.metric[1],
            loss_label=(
                "loss" if task.loss is not None or task.is_classifier else "noise-to-signal ratio"
            ),
            float_size_bytes=float_size_bytes,
            params=[ParamSensitivity(param=name, tensors=t) for name, t in tensors.items()],
            candidates=candidates,
        )
        save(stored)
    current = stored
    if method == "hessian":
        weighted = {
            name: [t.rpartition(".")[0] for t in ts if t.endswith(".weight")]
            for name, ts in tensors.items()
        }
        missing = [
            layer
            for name, layers in weighted.items()
            if current.param(name).trace is None
            for layer in layers
        ]
        if missing:
            log(f"sensitivity: Hessian traces of {len(missing)} weight(s) ...")
            traces = measurer.traces(missing, options.hessian_samples)
            params = [
                p.model_copy(update={"trace": sum(traces[lay] for lay in weighted[p.param])})
                if p.param in weighted and weighted[p.param] and p.trace is None
                else p
                for p in current.params
            ]
            current = current.model_copy(update={"params": params})
            save(current)
        measurer.layer_traces = {
            layer: current.param(name).trace or 0.0
            for name, layers in weighted.items()
            for layer in layers
        }
    total = sum(len(v) for v in candidates.values())
    missing_bits = {
        name: [b for b in values if current.param(name).entry(b) is None]
        for name, values in candidates.items()
    }
    measured = [(name, b) for name, values in missing_bits.items() for b in values if b != FLOAT]
    jobs = [
        SensitivityJob(
            number=number,
            spec=spec,
            float_weights=str(float_weights),
            float_size_bytes=float_size_bytes,
            param=name,
            tensors=tuple(tensors[name]),
            bits=bits,
            layer_traces=measurer.layer_traces,
        )
        for number, (name, bits) in enumerate(measured)
    ]
    # A parameter's float entry is the float model's own result: nothing to run.
    floats = [
        (name, measurer.measure(name, tensors[name], FLOAT))
        for name, values in missing_bits.items()
        if FLOAT in values
    ]
    done = total - sum(len(v) for v in missing_bits.values())
    count(done, total)
    for name, entry in itertools.chain(floats, _run_jobs(jobs, pool or InlinePool())):
        param = current.param(name)
        entries = sorted([*param.entries, entry], key=lambda e: candidates[name].index(e.bits))
        param = param.model_copy(update={"entries": entries})
        now = time.perf_counter()
        current = current.model_copy(
            update={
                "params": [param if p.param == name else p for p in current.params],
                "seconds": current.seconds + now - started,
            }
        )
        started = now
        done += 1
        save(current)
        count(done, total)
        if len(entries) == len(candidates[name]):
            finished = sum(len(p.entries) == len(candidates[p.param]) for p in current.params)
            shown = "  ".join(f"{e.bits}: {e.loss - current.float_loss:+.3f}" for e in entries)
            log(
                f"sensitivity {done}/{total} ({finished}/{len(candidates)} {name}): "
                f"loss increase {shown}"
            )
    current = current.model_copy(update={"complete": True})
    save(current)
    return current


def _run_jobs(
    jobs: Sequence[SensitivityJob], pool: InlinePool | ProcessPool
) -> Iterator[tuple[str, SensitivityEntry]]:
    """(parameter, entry) of each job, as its worker finishes it."""
    waiting = list(jobs)
    running: dict[int, SensitivityJob] = {}
    while waiting or running:
        while waiting and pool.has_capacity:
            job = waiting.pop(0)
            running[job.number] = job
            pool.submit(job)
        number, result = pool.next_result()
        job = running.pop(number)
        if not isinstance(result, SensitivityEntry):
            raise SensitivityError(
                f"measuring {job.param} at {job.bits} bits failed: {result}; the entries "
                "measured so far are stored, and the next run goes on from them"
            )
        yield job.param, result


def ensure_sensitivity(
    study: optuna.Study,
    spec: SearchSpec,
    task: Task,
    plan: SpacePlan,
    float_path: Path,
    *,
    float_size_bytes: int,
    log: Callable[[str], None],
    count: Callable[[int, int], None] = lambda done, total: None,
    pool: InlinePool | ProcessPool | None = None,
) -> Sensitivity:
    """The study's sensitivity: read back when complete, else measured (from where a killed
    pass stopped, on the ``pool``'s workers) and stored in the study as it goes."""
    stored = StudyRecord.of(study).sensitivity
    sha = state_sha256(float_state_of(str(float_path)))
    if stored is not None and stored.complete and stored.float_sha256 == sha:
        return stored
    if stored is not None:
        log(f"sensitivity: resuming ({sum(len(p.entries) for p in stored.params)} measured)")
    else:
        log("sensitivity: measuring each per-layer bit width on the float model ...")

    def save(sensitivity: Sensitivity) -> None:
        StudyRecord.write(study, sensitivity=sensitivity)

    made = measure_sensitivity(
        spec,
        task,
        plan,
        float_path,
        float_size_bytes=float_size_bytes,
        stored=stored,
        pool=pool,
        save=save,
        log=log,
        count=count,
    )
    log(f"sensitivity: done in {made.seconds:.1f} s")
    return made
