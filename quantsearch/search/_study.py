"""The study: run (or resume) a prepared space until it holds its trials.

    context = prepare(spec)            # _prepare: the task, the plan, the dry run
    study = run_study(context, jobs=2) # storage and locks (_storage), the float model, the
                                       # sensitivity seeds, then the trial loop (_loop)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch

from quantsearch._paths import check_writable_folder
from quantsearch.pipeline import (
    ArtifactStore,
    FloatModel,
    FloatModelError,
    StudyRecord,
    fetch_artifact,
    load_state,
    make_float_model,
    open_artifact_store,
    state_sha256,
    store_artifact,
)
from quantsearch.search._latency_table import ensure_latency_table
from quantsearch.search._loop import TrialLoop
from quantsearch.search._objective import train_config
from quantsearch.search._prepare import StudyContext
from quantsearch.search._progress import Progress, Silent
from quantsearch.search._recovery import (
    beat,
    fail_stale_trials,
    heartbeat_seconds,
    requeue_interrupted,
)
from quantsearch.search._seed_guide import seed_study
from quantsearch.search._spec import SearchSpec
from quantsearch.search._storage import StorageError, open_study, study_lock
from quantsearch.search._target import apply_target
from quantsearch.search._workers import (
    Heartbeat,
    InlinePool,
    ProcessPool,
    available_cores,
    threads_per_worker,
    worker_devices,
)

__all__ = ["ensure_float_model", "open_store", "run_study", "study_threads"]


def open_store(study: optuna.Study, spec: SearchSpec) -> ArtifactStore | None:
    """The space's artifact store, opened and recorded with the study (None without one)."""
    if spec.artifacts is None:
        return None
    store = open_artifact_store(spec.artifacts)
    if StudyRecord.of(study).artifacts is None:
        StudyRecord.write(study, artifacts=spec.artifacts)
    return store


def ensure_float_model(
    study: optuna.Study,
    context: StudyContext,
    *,
    log: Callable[[str], None],
    store: ArtifactStore | None = None,
) -> tuple[FloatModel, Path] | None:
    """The study's float model and its file, made the first time (loaded or trained).

    The study records the file and the hash of its weights. A machine (or a resumed run)
    without the file downloads it from the artifact ``store`` when the study uploaded it there,
    else makes it again; either way it must arrive at the same hash, or it is refused
    (FloatModelError) rather than mixing two float models in one study.
    """
    spec = context.spec
    if spec.from_scratch:
        return None
    location = context.location
    path = location.float_model
    stored = StudyRecord.of(study).float_model
    if stored is not None and path.is_file() and state_sha256(load_state(path)) == stored.sha256:
        return stored, path
    if stored is not None and stored.artifact is not None and store is not None:
        fetch_artifact(store, stored.artifact, path, what="the study's float model")
        if state_sha256(load_state(path)) != stored.sha256:
            raise FloatModelError(
                f"the float model in artifact store {store.location} (artifact "
                f"{stored.artifact}) is not the one the study recorded (hash {stored.sha256[:12]})"
            )
        log(f"float model: downloaded from {store.location} ({path})")
        return stored, path
    float_train = train_config(context.task, spec.float_train)
    made = make_float_model(
        context.task,
        pretrained=spec.task.pretrained,
        train=float_train,
        seed=spec.seed,
        out=path,
        log=log,
    )
    if stored is None:
        # Another machine recorded its float model while this one trained: the same, or refused.
        stored = StudyRecord.of(study).float_model
    if stored is not None and made.sha256 != stored.sha256:
        raise FloatModelError(
            f"{path}: the float model made here (hash {made.sha256[:12]}) differs from the "
            f"study's (hash {stored.sha256[:12]}, {stored.source}); copy the study's "
            f"{path.name} to {path}, or use the same torch version, device and threads"
        )
    made = made.model_copy(update={"file": location.stored(path)})
    if stored is None:
        if store is not None:
            made = made.model_copy(update={"artifact": store_artifact(store, path, study)})
        StudyRecord.write(study, float_model=made)
    if made.metrics:
        tests = made.test_metrics
        values = ", ".join(
            f"val {k} {v:.4f}, test {k} {tests.get(k, float('nan')):.4f}"
            for k, v in made.metrics.items()
        )
    elif math.isnan(made.val_accuracy):
        values = "no task metric (the fidelity metrics compare each trial with it)"
    else:
        values = f"val {made.val_accuracy:.4f}, test {made.test_accuracy:.4f}"
    log(f"float model: {values} ({made.source}; {path})")
    return stored or made, path


def study_threads(spec: SearchSpec, jobs: int, threads: int | None = None) -> int:
    """Torch threads for each of ``jobs`` training processes: ``threads``, else the space's
    ``train.num_threads``, else, for one job, this process's own setting (OMP_NUM_THREADS, or
    one per core), and for several the cores shared out so that jobs x threads <= cores."""
    if threads or spec.threads:
        return threads or spec.threads or 1
    return torch.get_num_threads() if jobs == 1 else threads_per_worker(jobs)


def run_study(
    context: StudyContext,
    *,
    jobs: int = 1,
    threads: int | None = None,
    devices: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> optuna.Study:
    """Run (or resume) the study until it holds ``n_trials`` trials, and return it.

    Each of the ``jobs`` training processes (this one when ``jobs`` is 1) uses
    :func:`study_threads` torch threads; worker processes train on ``devices`` in turn (by
    default one GPU each when trials train on ``cuda``/``auto`` and there are several GPUs).
    """
    spec = context.spec
    num_threads = study_threads(spec, jobs, threads)
    progress = progress or Silent()
    location = context.location
    # Found now, not as a failure of every trial: checkpoints go to this folder.
    try:
        check_writable_folder(location.folder, "the artifacts folder")
    except ValueError as error:
        raise StorageError(str(error)) from None
    study = open_study(context)
    local = not location.shared
    heartbeat: Heartbeat | None = None
    with study_lock(location) if local else contextlib.nullcontext():
        if local:
            requeue_interrupted(study, location)
        else:
            fail_stale_trials(study)
            heartbeat = Heartbeat(beat(study), heartbeat_seconds())
        store = open_store(study, spec)
        loop = TrialLoop(study, context, progress, heartbeat, store=store)
        # The float model trains here, on every thread the jobs will share.
        torch.set_num_threads(min(available_cores(), num_threads * jobs))
        made = ensure_float_model(study, context, log=progress.message, store=store)
        # Each worker process sets its torch threads once, when it starts.
        pool: InlinePool | ProcessPool = (
            InlinePool()
            if jobs == 1
            else ProcessPool(
                jobs,
                num_threads=num_threads,
                devices=worker_devices(
                    train_config(context.task, spec.train).device, jobs, given=devices
                ),
            )
        )
        try:
            with pool, heartbeat or contextlib.nullcontext():
                if made is not None:
                    loop.float_model_path = made[1]
                    if spec.sensitivity is not None:
                        loop.guide = seed_study(
                            study,
                            context,
                            made[1],
                            pool=pool,
                            log=progress.message,
                            count=functools.partial(progress.count, "sensitivity"),
                        )
                    if spec.target is not None:
                        loop.context, loop.target = apply_target(study, context, made[0])
                if spec.latency_table:
                    # Timed one model at a time in this process, before any trial loads it.
                    loop.latency_table = ensure_latency_table(
                        study,
                        spec,
                        context.task,
                        context.plan,
                        None if made is None else made[1],
                        log=progress.message,
                        count=functools.partial(progress.count, "latency table"),
                    )
                torch.set_num_threads(num_threads if jobs == 1 else 1)
                loop.run(pool)
        finally:
            progress.close()
    return study

