"""``quantsearch sensitivity``: measure (or read back) a study's sensitivity without trials."""

from __future__ import annotations

import contextlib
import functools

import pandas as pd
import torch

from quantsearch.pipeline import Sensitivity
from quantsearch.search._errors import SpaceError
from quantsearch.search._objective import train_config
from quantsearch.search._predicted_front import predicted_front
from quantsearch.search._prepare import StudyContext
from quantsearch.search._progress import Progress, Silent
from quantsearch.search._sensitivity_measure import ensure_sensitivity
from quantsearch.search._sensitivity_plan import searched_tensors
from quantsearch.search._storage import open_study, study_lock
from quantsearch.search._study import ensure_float_model, open_store, study_threads
from quantsearch.search._workers import (
    InlinePool,
    ProcessPool,
    available_cores,
    worker_devices,
)

__all__ = ["describe_front", "sensitivity_frame", "sensitivity_pivot", "study_sensitivity"]


def study_sensitivity(
    context: StudyContext,
    *,
    threads: int | None = None,
    jobs: int = 1,
    progress: Progress | None = None,
) -> Sensitivity:
    """The study's sensitivity: opens (or creates) the study, gets its float model and
    measures what is not yet stored, in ``jobs`` processes; runs no trial. A space without a
    ``sensitivity`` key is measured with the defaults (``method: loss``, 8 batches)."""
    spec = context.spec
    if not searched_tensors(context.plan):
        raise SpaceError(
            "has no searched per-layer bits parameter, so there is nothing to measure; "
            "add per_layer with a bits parameter in NNI's syntax",
            key="per_layer",
            source=spec.source,
        )
    if spec.from_scratch:
        raise SpaceError(
            "sensitivity is measured on the trained float model, which from_scratch "
            "trials do not use",
            key="from_scratch",
            source=spec.source,
        )
    study = open_study(context)
    location = context.location
    num_threads = study_threads(spec, jobs, threads)
    torch.set_num_threads(min(available_cores(), num_threads * jobs))
    progress = progress or Silent()
    # One GPU per worker where there are several, as the study's workers.
    devices = worker_devices(train_config(context.task, spec.train).device, jobs)
    pool = (
        InlinePool() if jobs == 1 else ProcessPool(jobs, num_threads=num_threads, devices=devices)
    )
    with study_lock(location) if not location.shared else contextlib.nullcontext(), pool:
        store = open_store(study, spec)
        made = ensure_float_model(study, context, log=progress.message, store=store)
        assert made is not None
        return ensure_sensitivity(
            study,
            spec,
            context.task,
            context.plan,
            made[1],
            float_size_bytes=context.float_size_bytes,
            log=progress.message,
            count=functools.partial(progress.count, "sensitivity"),
            pool=pool,
        )


def sensitivity_frame(sensitivity: Sensitivity) -> pd.DataFrame:
    """One row per (parameter, bit width): loss, its increase, accuracy, size change."""
    return pd.DataFrame(list(sensitivity.rows()))


def sensitivity_pivot(sensitivity: Sensitivity, value: str = "loss_increase") -> pd.DataFrame:
    """Parameters down, bit widths across (the space's order), one column of the frame."""
    frame = sensitivity_frame(sensitivity)
    order = list(dict.fromkeys(b for values in sensitivity.candidates.values() for b in values))
    frame["bits"] = frame["bits"].astype(str)
    pivot = frame.pivot(index="param", columns="bits", values=value)
    columns = [str(b) for b in order if str(b) in pivot.columns]
    return pivot.reindex(index=[p.param for p in sensitivity.params], columns=columns)


def describe_front(sensitivity: Sensitivity) -> str:
    """One line about the predicted Pareto set."""
    front = predicted_front(sensitivity)
    smallest, largest = front[0].size_bytes, front[-1].size_bytes
    return (
        f"predicted Pareto set: {len(front)} configs, {smallest:,} to {largest:,} bytes "
        f"(float {sensitivity.float_size_bytes:,})"
    )
