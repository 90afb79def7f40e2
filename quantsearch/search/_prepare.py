"""A space laid onto its task before any study is touched: the checks and the dry run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quantsearch.pipeline import (
    Compressed,
    FidelityError,
    FloatModelError,
    MetricInfo,
    ModelProfile,
    StudyLocation,
    build_compressed,
    load_state,
    load_weights,
    main_tensor,
)
from quantsearch.quantization import ConfigError, algorithm_rules, model_size_bytes
from quantsearch.search._config_builder import ModelLayers, SpacePlan
from quantsearch.search._errors import SpaceError
from quantsearch.search._objective import build_task, model_profile, train_config
from quantsearch.search._paths import check_study_name
from quantsearch.search._spec import SearchSpec
from quantsearch.search._task_metrics import check_task_fits, resolve_metrics
from quantsearch.tasks import (
    Batches,
    Task,
    TaskError,
    resolve_device,
    seed_everything,
    time_limit,
)

__all__ = ["DryRun", "StudyContext", "prepare", "study_location"]


def study_location(spec: SearchSpec) -> StudyLocation:
    """Where ``spec``'s study lives; its name is checked first, as it becomes a path."""
    return StudyLocation.of(spec.storage, check_study_name(spec.study_name))


@dataclass
class StudyContext:
    """A space laid onto its task: what the study needs before it touches the storage."""

    spec: SearchSpec
    task: Task
    plan: SpacePlan
    float_size_bytes: int
    profile: ModelProfile
    dry_run: DryRun | None = None
    metrics: dict[str, MetricInfo] = field(default_factory=dict)
    """Every metric the space names, resolved against the task (direction, label, unit)."""
    location: StudyLocation = field(init=False)

    def __post_init__(self) -> None:
        self.location = study_location(self.spec)

    @property
    def layers(self) -> list[str]:
        return self.plan.layers.weighted

    @property
    def float_bitops(self) -> float:
        return self.profile.bitops({})

    @property
    def directions(self) -> list[str]:
        return [self.metrics[name].direction for name in self.spec.objectives]


def prepare(spec: SearchSpec) -> StudyContext:
    """Build the task and check the space against its model, writing nothing.

    Every searched value is tried once (a config_list is built and given to the quantizer), so
    a value the algorithm refuses is reported now with its key, not as failed trials later.
    Raises SpaceError, or TaskError for a task that cannot be built.
    """
    task = build_task(spec.task, spec.seed)
    metrics = resolve_metrics(spec, task)
    check_task_fits(spec, task)
    try:
        config = train_config(task, spec.train)
    except ValueError as error:
        raise SpaceError(str(error), key="train", source=spec.source) from None
    try:
        resolve_device(config.device)
    except (ValueError, RuntimeError) as error:
        raise SpaceError(str(error), key="train.device", source=spec.source) from None
    try:
        train_config(task, spec.float_train)
    except ValueError as error:
        raise SpaceError(str(error), key="float_train", source=spec.source) from None
    seed_everything(spec.seed)
    model = task.build_model()
    float_size = model_size_bytes(model)
    pretrained = None
    if spec.task.pretrained is not None and not spec.from_scratch:
        try:
            pretrained = load_state(spec.task.pretrained)
            load_weights(task.build_model(), pretrained, spec.task.pretrained)
        except FloatModelError as error:
            raise SpaceError(str(error), key="task.pretrained", source=spec.source) from None
    try:
        plan = SpacePlan(spec, ModelLayers.of(model))
    except SpaceError as error:
        raise error.with_source(spec.source) from None
    base: dict[str, Any] | None = None
    for key, value, values in plan.candidate_points():
        base = base or values
        config_list = plan.config_list(values)
        if not config_list:
            continue
        try:
            build_compressed(task, spec.algorithm, config_list)
        except ConfigError as error:
            if value is None:
                # The first value of every parameter: the fault may lie in any of them.
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "the fixed values"
                raise SpaceError(
                    f"the {spec.algorithm} quantizer refuses the config_list of {shown}: {error}",
                    source=spec.source,
                ) from None
            raise SpaceError(
                f"{value!r} gives a config_list the {spec.algorithm} quantizer refuses: {error}",
                key=key,
                source=spec.source,
            ) from None
    return StudyContext(
        spec=spec,
        task=task,
        plan=plan,
        float_size_bytes=float_size,
        profile=model_profile(task),
        dry_run=_timed_dry_run(spec, task, plan, base or {}, pretrained),
        metrics=metrics,
    )


def _timed_dry_run(spec: SearchSpec, *args: Any) -> DryRun:
    try:
        with time_limit(f"the dry run of task {spec.task.name}'s model (forward passes)"):
            return _dry_run(spec, *args)
    except TaskError as error:
        raise SpaceError(str(error), source=spec.source) from None


@dataclass(frozen=True)
class DryRun:
    """What forward passes of a compressed model showed before the study ran."""

    folded: dict[str, str]
    """Conv name -> the BatchNorm folded into it."""
    quantized_outputs: list[str]
    difference_at_16_bits: float | None
    """Largest |output - float output| / max |float output| with every quantized tensor at 16
    bits (affine quantizers only), in eval mode."""


# Largest relative output difference tolerated at 16 bits.
_TOLERANCE_16_BITS = 1e-2


def _at_16_bits(config_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``config_list`` with every quantized tensor at 16 bits, searched or fixed: 8 fixed bits
    through many layers would decide the output on their own."""
    return [
        {**entry, "quant_bits": {t: 16 for t in bits} if isinstance(bits, dict) else 16}
        if (bits := entry.get("quant_bits")) is not None
        else entry
        for entry in config_list
    ]


def _sample_batch(task: Task) -> Any:
    """Two training examples as one batch (BatchNorm cannot train on one): a classifier's
    inputs, or a batch of any structure as the task's collate_fn makes it."""
    count = min(2, len(task.train_set))  # type: ignore[arg-type]
    if task.is_classifier:
        return (torch.stack([torch.as_tensor(task.train_set[i][0]) for i in range(count)]),)
    batches = Batches(
        task.train_set, count, torch.device("cpu"), shuffle=False,
        collate_fn=task.collate_fn, raw=True,
    )
    return next(iter(batches))


def _forward(
    compressed: Compressed, task: Task, batch: Any, *, train: bool
) -> torch.Tensor | None:
    """The compared output tensor (None when the output holds none)."""
    model = compressed.model
    if compressed.quantizer is not None and not train:
        with compressed.quantizer.calibrate():
            task.output(model, batch)
    model.train(train)
    with torch.no_grad():
        output = task.output(model, batch)
    try:
        return main_tensor(output).float()
    except FidelityError:
        return None


def _dry_run(
    spec: SearchSpec,
    task: Task,
    plan: SpacePlan,
    values: dict[str, Any],
    pretrained: dict[str, torch.Tensor] | None,
) -> DryRun:
    """One train-mode and one eval-mode forward of a compressed model, and the 16-bit one
    against the float model (the pretrained weights when given): a quantizer that breaks the
    model is found here, not in trials."""
    config_list = plan.config_list(values)
    if not config_list:
        return DryRun(folded={}, quantized_outputs=[], difference_at_16_bits=None)
    batch = _sample_batch(task)
    seed_everything(spec.seed)
    state = pretrained if pretrained is not None else task.build_model().state_dict()
    compressed = build_compressed(task, spec.algorithm, config_list, float_state=state)
    for train in (True, False):
        try:
            _forward(compressed, task, batch, train=train)
        except Exception as error:
            mode = "training" if train else "eval"
            raise SpaceError(
                f"the {spec.algorithm}-compressed model fails a forward pass in {mode} mode: "
                f"{type(error).__name__}: {error}",
                source=spec.source,
            ) from None
    quantizer = compressed.quantizer
    assert quantizer is not None
    folded = quantizer.folded_batch_norms()
    outputs = [name for name, bits in quantizer.layer_bits().items() if "output" in bits]
    difference = None
    reference = build_compressed(task, spec.algorithm, [], float_state=state)
    expected = _forward(reference, task, batch, train=False)
    # A float model that is not finite already fails on its own (its trials say so).
    # Only an affine grid at 16 bits is the float model to within rounding.
    if (
        expected is not None
        and algorithm_rules(spec.algorithm).affine
        and bool(torch.isfinite(expected).all())
    ):
        sixteen = build_compressed(
            task, spec.algorithm, _at_16_bits(config_list), float_state=state
        )
        got = _forward(sixteen, task, batch, train=False)
        assert got is not None
        scale = float(expected.abs().max()) or 1.0
        difference = float((got - expected).abs().max()) / scale
        if not difference <= _TOLERANCE_16_BITS:
            raise SpaceError(
                f"with every quantized tensor at 16 bits the {spec.algorithm}-compressed model's "
                f"outputs differ from the float model's by {difference:.3g} of their range (at "
                f"most {_TOLERANCE_16_BITS} expected): the quantizer does not fit this model",
                source=spec.source,
            )
    return DryRun(folded=folded, quantized_outputs=outputs, difference_at_16_bits=difference)
