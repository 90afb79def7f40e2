"""The study: creation and resume, baselines, the space guard, and the trial loop."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
import sqlalchemy
import torch
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, Trial, TrialState

from quantsearch._paths import check_writable_folder
from quantsearch._studydata import mask_url, sqlite_path
from quantsearch.pipeline import (
    Compressed,
    FloatModel,
    FloatModelError,
    ModelProfile,
    TrialRecord,
    build_compressed,
    front_mask,
    get_metric,
    load_state,
    load_weights,
    make_float_model,
    state_sha256,
    trial_mode,
)
from quantsearch.quantization import ConfigError, model_size_bytes
from quantsearch.search._config_builder import ModelLayers, SpacePlan, config_key
from quantsearch.search._errors import SpaceError
from quantsearch.search._objective import (
    TrialJob,
    TrialOutcome,
    build_task,
    model_profile,
    train_config,
    trial_seed,
)
from quantsearch.search._sensitivity import SeedGuide, seed_study
from quantsearch.search._space import BITS_PARAMS, SearchSpec, check_study_name
from quantsearch.search._target import TargetState, apply_target, reached
from quantsearch.search._workers import (
    WORKER_DIED,
    Heartbeat,
    InlinePool,
    ProcessPool,
    available_cores,
    threads_per_worker,
    worker_devices,
)
from quantsearch.tasks import Task, resolve_device, seed_everything

__all__ = [
    "FLOAT_MODEL_FILE",
    "StorageError",
    "StudyBusyError",
    "StudyContext",
    "StudyNotFoundError",
    "TrialReport",
    "artifacts_dir",
    "counted_trials",
    "ensure_float_model",
    "load_study",
    "load_study_from",
    "open_study",
    "prepare",
    "requeue_interrupted",
    "run_study",
    "study_threads",
]

#: The float model's state dict, in the study's artifacts folder.
FLOAT_MODEL_FILE = "float_model.pt"
# Seconds between heartbeats of running trials on a shared (non-SQLite) database, and how
# long a trial may go without one before another machine fails and re-queues it.
HEARTBEAT_SECONDS = 20
GRACE_SECONDS = 90
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# How often a process with nothing to train but trials waiting on other machines reads again.
_ELSEWHERE_POLL_SECONDS = 2.0


class StudyNotFoundError(ValueError):
    """A command that reads a study found no such study (or no such database file)."""


class StorageError(ValueError):
    """The study's database cannot be opened (no driver, server unreachable)."""


class StudyBusyError(ValueError):
    """Another process is already running this study on this SQLite file."""


def artifacts_dir(spec: SearchSpec) -> tuple[Path, Path]:
    """(root, study folder) for checkpoints; stored paths are relative to ``root``.

    Beside a SQLite file: ``<db stem>_artifacts/<study name>/``, relative to the file's folder.
    With a shared database: ``./studies/<study name>_artifacts/`` on each machine, stored as
    absolute paths.
    """
    # The name becomes a path component: never one that leaves the folder (``..``, ``/``).
    name = check_study_name(spec.study_name)
    path = sqlite_path(spec.storage)
    if path is not None:
        root = path.parent
        return root, root / f"{path.stem}_artifacts" / name
    folder = (Path("studies") / f"{name}_artifacts").resolve()
    return folder, folder


@dataclass
class StudyContext:
    """A space laid onto its task: what the study needs before it touches the storage."""

    spec: SearchSpec
    task: Task
    plan: SpacePlan
    float_size_bytes: int
    profile: ModelProfile
    dry_run: DryRun | None = None

    @property
    def layers(self) -> list[str]:
        return self.plan.layers.weighted

    @property
    def float_bitops(self) -> float:
        return self.profile.bitops({})

    @property
    def directions(self) -> list[str]:
        return [get_metric(name).direction for name in self.spec.objectives]


def prepare(spec: SearchSpec) -> StudyContext:
    """Build the task and check the space against its model, writing nothing.

    Every searched value is tried once (a config_list is built and given to the quantizer), so
    a value the algorithm refuses is reported now with its key, not as failed trials later.
    Raises SpaceError, or TaskError for a task that cannot be built.
    """
    task = build_task(spec.task, spec.seed)
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
        dry_run=_dry_run(spec, task, plan, base or {}, pretrained),
    )


@dataclass(frozen=True)
class DryRun:
    """What forward passes of a compressed model showed before the study ran."""

    folded: dict[str, str]
    """Conv name -> the BatchNorm folded into it."""
    quantized_outputs: list[str]
    difference_at_16_bits: float | None
    """Largest |output - float output| / max |float output| with every searched tensor at 16
    bits (affine quantizers only), in eval mode."""


# Algorithms whose 16-bit quantization is the float model to within rounding.
_AFFINE = ("qat", "ptq", "naive")
# Largest relative output difference tolerated at 16 bits.
_TOLERANCE_16_BITS = 1e-2


def _sample_batch(task: Task) -> torch.Tensor:
    """Two training inputs as one batch (BatchNorm cannot train on one)."""
    count = min(2, len(task.train_set))  # type: ignore[arg-type]
    return torch.stack([torch.as_tensor(task.train_set[i][0]) for i in range(count)])


def _forward(compressed: Compressed, batch: torch.Tensor, *, train: bool) -> torch.Tensor:
    model = compressed.model
    if compressed.quantizer is not None and not train:
        with compressed.quantizer.calibrate():
            model(batch)
    model.train(train)
    with torch.no_grad():
        return model(batch)


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
            _forward(compressed, batch, train=train)
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
    expected = _forward(reference, batch, train=False)
    # A float model that is not finite already fails on its own (its trials say so).
    if spec.algorithm in _AFFINE and bool(torch.isfinite(expected).all()):
        at_16 = {k: 16 if k.rsplit(".", 1)[-1] in BITS_PARAMS and v != "float" else v
                 for k, v in values.items()}
        sixteen = build_compressed(task, spec.algorithm, plan.config_list(at_16), float_state=state)
        got = _forward(sixteen, batch, train=False)
        scale = float(expected.abs().max()) or 1.0
        difference = float((got - expected).abs().max()) / scale
        if not difference <= _TOLERANCE_16_BITS:
            raise SpaceError(
                f"with every searched tensor at 16 bits the {spec.algorithm}-compressed model's "
                f"outputs differ from the float model's by {difference:.3g} of their range (at "
                f"most {_TOLERANCE_16_BITS} expected): the quantizer does not fit this model",
                source=spec.source,
            )
    return DryRun(folded=folded, quantized_outputs=outputs, difference_at_16_bits=difference)


def _sqlite_connector(path: Path) -> Callable[[], sqlite3.Connection]:
    def connect() -> sqlite3.Connection:
        # Readers (quantsearch trials, report) may open the file while a study writes it.
        connection = sqlite3.connect(path, timeout=60, check_same_thread=False)
        # Write-ahead log: readers never block the writer; commits skip the fsync, which
        # costs more than the rest of the bookkeeping (a crash keeps the file consistent).
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return connect


_SQLITE_HEADER = b"SQLite format 3\x00"
# Tables a quantsearch (optuna) database holds; a SQLite file with tables but not these is
# someone else's, and is refused before anything (tables, WAL mode) is written to it.
_OPTUNA_TABLES = {"studies", "trials", "alembic_version"}


@functools.cache
def _optuna_schema_head() -> str:
    """The alembic revision of the tables this optuna creates."""
    from alembic.script import ScriptDirectory

    folder = Path(optuna.storages._rdb.__file__).parent / "alembic"
    head = ScriptDirectory(str(folder)).get_current_head()
    assert head is not None
    return head


def check_sqlite_file(path: Path, *, write: bool) -> None:
    """Refuse (StorageError naming ``path``) what cannot be this study's SQLite database.

    Reads only, through a read-only connection, so a refused file keeps every byte: a folder,
    a file that is not SQLite, a corrupt database, another program's database, tables of
    another optuna version; with ``write``, a read-only file or folder.
    """
    if path.is_dir():
        raise StorageError(f"{path}: is a folder, not a SQLite database file")
    if not path.exists():
        if write:
            _check_folder(path.parent, "the database's folder")
        return
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as error:
        raise StorageError(f"{path}: cannot be read ({error.strerror})") from None
    if header and header != _SQLITE_HEADER:
        raise StorageError(f"{path}: is not a SQLite database (it lacks SQLite's file header)")
    if header:
        tables, revision = _read_sqlite_schema(path)
        if tables and not tables >= _OPTUNA_TABLES:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise StorageError(
                f"{path}: is a SQLite database that quantsearch did not create (its tables: "
                f"{shown}); give another --storage"
            )
        if revision is not None and revision != _optuna_schema_head():
            raise StorageError(
                f"{path}: its study tables are of another optuna version (schema {revision}, "
                f"this optuna {optuna.__version__} uses {_optuna_schema_head()}); upgrade it "
                "with `optuna storage upgrade --storage sqlite:///PATH`, or use another --storage"
            )
    if write:
        if not os.access(path, os.R_OK | os.W_OK):
            raise StorageError(f"{path}: is read-only, and the study writes its trials to it")
        _check_folder(path.parent, "the database's folder")


def _check_folder(folder: Path, label: str) -> None:
    try:
        check_writable_folder(folder, label)
    except ValueError as error:
        raise StorageError(f"{error} (SQLite writes its journal beside the database)") from None


def _read_sqlite_schema(path: Path) -> tuple[set[str], str | None]:
    """The table names of a SQLite file and its alembic revision, read without writing."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=60)) as db:
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                # SQLite's report spans lines under a banner: one line, without the banner.
                problem = " ".join(problem.replace("*** in database main ***", "").split())
                raise StorageError(f"{path}: is a corrupt SQLite database ({problem})")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            revision = None
            if "alembic_version" in tables:
                row = db.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else None
    except sqlite3.DatabaseError as error:
        raise StorageError(f"{path}: is a corrupt SQLite database ({error})") from None
    return tables, revision


def _storage(spec: SearchSpec) -> RDBStorage:
    path = sqlite_path(spec.storage)
    if path is not None:
        check_sqlite_file(path, write=True)
        return _open_rdb(spec.storage, engine_kwargs={"creator": _sqlite_connector(path)})
    return _open_rdb(
        spec.storage,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=_requeue_stale,
    )


def _open_rdb(url: str, **options: Any) -> RDBStorage:
    """Optuna's RDB storage; a missing driver or an unreachable server is a StorageError."""
    waits = [0.2, 0.5, 1.0, 2.0]
    while True:
        try:
            return _open_rdb_once(url, **options)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # What another machine creating the same tables this instant looks like: retry.
            if not waits:
                reason = _reason(error)
                raise StorageError(
                    f"{mask_url(url)}: cannot set up the study tables: {reason}"
                ) from None
            time.sleep(waits.pop(0))


def _reason(error: sqlalchemy.exc.DBAPIError) -> str:
    """The first line of what the database said."""
    return str(error.orig or error).strip().splitlines()[0]


def _open_rdb_once(url: str, **options: Any) -> RDBStorage:
    shown = mask_url(url)
    try:
        return RDBStorage(url, **options)
    except ImportError as error:
        missing = error.__cause__ or error
        raise StorageError(
            f"{shown}: no database driver for this URL is installed ({missing}); for "
            "PostgreSQL: pip install 'quantsearch[postgres]'"
        ) from None
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
        raise  # retried by _open_rdb
    except sqlalchemy.exc.DatabaseError as error:  # unreachable, refused, corrupt, read-only
        raise StorageError(f"{shown}: cannot open the database: {_reason(error)}") from None
    except sqlalchemy.exc.ArgumentError as error:  # e.g. an unknown dialect such as foo://
        raise StorageError(f"{shown}: not a database URL sqlalchemy knows: {error}") from None
    except RuntimeError as error:  # optuna: tables of another optuna version
        reason = str(error).strip().splitlines()[0]
        raise StorageError(f"{shown}: the study tables cannot be used: {reason}") from None


def _requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Called on a trial failed for its missing heartbeat: queue its parameters again."""
    study.enqueue_trial(trial.params, user_attrs=_retry_attrs(trial))


def _fail_stale_trials(study: optuna.Study) -> None:
    """optuna's fail_stale_trials, writing each trial's fail_reason while it is still RUNNING.

    A finished trial takes no attribute, so optuna's own function leaves it without a reason.
    Whichever process moves the trial to FAIL queues it again; the others skip it.
    """
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            reason = (
                f"interrupted: no heartbeat for {GRACE_SECONDS} s (its machine or process "
                "died) mid-trial"
            )
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
        _requeue_stale(study, storage.get_trial(trial_id))


def _retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    record = TrialRecord.of(trial)
    retry = TrialRecord(retry_of=trial.number, baseline=record.baseline, seed_of=record.seed_of)
    return retry.model_dump(include={"retry_of", "baseline", "seed_of"}, exclude_none=True)


def _sampler(
    spec: SearchSpec, resume_index: int, *, shared: bool = False
) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded from the study seed and the number of trials so far.

    A resumed study continues with fresh random draws instead of replaying the first run's.
    On a shared database (``shared``) each process adds entropy of its own: processes joining
    at the same trial count would otherwise draw the same parameters.
    """
    words = [spec.seed, resume_index, 1]
    if shared:
        words.append(int.from_bytes(os.urandom(8), "little"))
    state = np.random.SeedSequence(words).generate_state(1)
    seed = int(state[0])
    # A quarter of the trials per generation / at random, within 4..50.
    default_size = min(50, max(4, spec.n_trials // 4))
    if spec.sampler.name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            population_size=spec.sampler.population_size or default_size, seed=seed
        )
    if spec.sampler.name == "tpe":
        startup = spec.sampler.n_startup_trials
        return optuna.samplers.TPESampler(
            multivariate=True,
            n_startup_trials=default_size if startup is None else startup,
            seed=seed,
        )
    return optuna.samplers.RandomSampler(seed=seed)


def _existing_study_id(storage: RDBStorage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _check_space(study: optuna.Study, spec: SearchSpec) -> None:
    stored_hash = study.user_attrs.get("space_hash")
    stored = study.user_attrs.get("space")
    stored = stored if isinstance(stored, Mapping) else {}
    if stored_hash is None or spec.matches_stored(stored_hash, stored):
        return
    changed = spec.changed_from(stored) or ["(unknown)"]
    raise SpaceError(
        f"the study {spec.study_name!r} in {mask_url(spec.storage)} was created from a different "
        f"space (changed: {', '.join(changed)}); a study never mixes two spaces: give the "
        "space a new study_name, or use another --storage",
        source=spec.source,
    )


def open_study(context: StudyContext) -> optuna.Study:
    """Create the study (with its attributes and baselines) or load it to resume.

    Refuses (SpaceError) a study of the same name created from a different space, before
    anything is written to it.
    """
    spec = context.spec
    path = sqlite_path(spec.storage)
    if path is None:
        return _open_or_create(context)
    if not path.parent.is_dir():
        check_sqlite_file(path, write=True)  # before the folder is made: a refusal writes nothing
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(
                f"{path.parent}: cannot create the folder ({error.strerror})"
            ) from None
    # Two processes creating a new SQLite study at once: the second waits, then loads it. The
    # file is checked under the lock (by _storage), never while the other writes its tables.
    with _folder_lock(path.parent):
        return _open_or_create(context)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (no lock file), released when its process dies."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        # Some network file systems lock no folders: then creation just races, as before.
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _open_or_create(context: StudyContext) -> optuna.Study:
    spec = context.spec
    shared = sqlite_path(spec.storage) is None
    storage = _storage(spec)
    existing = _existing_study_id(storage, spec.study_name)
    if existing is None:
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=spec.study_name,
                directions=context.directions,
                sampler=_sampler(spec, 0, shared=shared),
            )
        except optuna.exceptions.DuplicatedStudyError:
            existing = _existing_study_id(storage, spec.study_name)  # another machine won
        else:
            _initialise(study, context)
            return study
    resume_index = len(storage.get_all_trials(existing, deepcopy=False))
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=storage,
        sampler=_sampler(spec, resume_index, shared=shared),
    )
    _check_space(study, spec)
    if "space_hash" not in study.user_attrs:
        # Created a moment ago by another machine, which is still writing its attributes.
        if study.trials or [d.name.lower() for d in study.directions] != context.directions:
            raise SpaceError(
                f"{mask_url(spec.storage)} already holds a study {spec.study_name!r} that "
                "quantsearch did not create; give the space another study_name",
                source=spec.source,
            )
        _set_study_attrs(study, context)
    return study


def _set_study_attrs(study: optuna.Study, context: StudyContext) -> None:
    spec = context.spec
    with warnings.catch_warnings():
        # Metric names have been "experimental" since optuna 3.2; the API is stable in use.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objectives))
    study.set_user_attr("space", spec.to_dict())
    study.set_user_attr("space_hash", spec.space_hash)
    study.set_user_attr("task", {**spec.task.to_dict(), "seed": spec.seed})
    study.set_user_attr("algorithm", spec.algorithm)
    study.set_user_attr("float_size_bytes", context.float_size_bytes)
    study.set_user_attr("float_bitops", context.float_bitops)
    study.set_user_attr("layers", context.layers)


def _initialise(study: optuna.Study, context: StudyContext) -> None:
    _set_study_attrs(study, context)
    for label in context.spec.baselines.labels:
        queued = TrialRecord(baseline=label).model_dump(include={"baseline"})
        study.enqueue_trial(context.plan.baseline_params(label), user_attrs=queued)


def ensure_float_model(
    study: optuna.Study, context: StudyContext, *, log: Callable[[str], None]
) -> tuple[FloatModel, Path] | None:
    """The study's float model and its file, made the first time (loaded or trained).

    The study records the file and the hash of its weights: a machine (or a resumed run)
    without the file makes it again and must arrive at the same hash; one that does not is
    refused (FloatModelError) rather than mixing two float models in one study.
    """
    spec = context.spec
    if spec.from_scratch:
        return None
    root, folder = artifacts_dir(spec)
    path = folder / FLOAT_MODEL_FILE
    raw = study.user_attrs.get("float_model")
    stored = FloatModel.model_validate(raw) if raw is not None else None
    if stored is not None and path.is_file() and state_sha256(load_state(path)) == stored.sha256:
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
    if stored is None and study.user_attrs.get("float_model") is not None:
        # Another machine recorded its float model while this one trained: the same, or refused.
        stored = FloatModel.model_validate(study.user_attrs["float_model"])
    if stored is not None and made.sha256 != stored.sha256:
        raise FloatModelError(
            f"{path}: the float model made here (hash {made.sha256[:12]}) differs from the "
            f"study's (hash {stored.sha256[:12]}, {stored.source}); copy the study's "
            f"{FLOAT_MODEL_FILE} to {path}, or use the same torch version, device and threads"
        )
    relative = path.relative_to(root) if sqlite_path(spec.storage) else path
    made = made.model_copy(update={"file": str(relative)})
    if stored is None:
        study.set_user_attr("float_model", made.model_dump())
    log(
        f"float model: val {made.val_accuracy:.4f}, test {made.test_accuracy:.4f} "
        f"({made.source}; {path})"
    )
    return stored or made, path


def load_study(spec: SearchSpec) -> optuna.Study:
    """The study of a space, for reading (trials, report, export); never creates anything."""
    study = load_study_from(
        spec.storage, spec.study_name, hint=f"run `quantsearch study --space {spec.source}` first"
    )
    _check_space(study, spec)
    return study


def load_study_from(url: str, study_name: str, *, hint: str = "") -> optuna.Study:
    """An existing study by storage URL and name; StudyNotFoundError names what exists."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise StudyNotFoundError(f"no study database at {path}" + (f"; {hint}" if hint else ""))
    if path is not None:
        check_sqlite_file(path, write=False)
    storage = _open_rdb(url)
    if _existing_study_id(storage, study_name) is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        held = f"it holds: {', '.join(names)}" if names else "it holds none"
        raise StudyNotFoundError(f"{mask_url(url)} holds no study {study_name!r} ({held})")
    return optuna.load_study(study_name=study_name, storage=storage)


@contextlib.contextmanager
def _study_lock(folder: Path) -> Iterator[None]:
    """Hold the study's lock file: one process runs a study on a SQLite file at a time.

    The lock dies with its process (even under SIGKILL), which is what makes every RUNNING
    trial found by the next holder a trial left behind by a dead process.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise StudyBusyError(
                f"the study is already running in process {owner} (lock {path}); wait for "
                "it, or stop it and run the command again to resume; use --jobs N for "
                "more workers"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class TrialReport:
    """One finished trial, as shown in the progress output."""

    number: int
    state: str
    record: TrialRecord


class Progress(Protocol):
    def message(self, text: str) -> None: ...

    def count(self, label: str, done: int, total: int) -> None:
        """Work before the trials (``label``: what): ``done`` of ``total`` steps."""

    def start(self, *, total: int, done: int, front: int) -> None: ...

    def trial(self, report: TrialReport, *, done: int, front: int) -> None: ...

    def close(self) -> None: ...


class _Silent:
    def message(self, text: str) -> None:
        pass

    def count(self, label: str, done: int, total: int) -> None:
        pass

    def start(self, *, total: int, done: int, front: int) -> None:
        pass

    def trial(self, report: TrialReport, *, done: int, front: int) -> None:
        pass

    def close(self) -> None:
        pass


def counted_trials(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count towards n_trials: all but WAITING ones and failures run again."""
    retried = {TrialRecord.of(t).retry_of for t in trials}
    return sum(
        1
        for t in trials
        if t.state in (*_FINISHED, TrialState.RUNNING)
        or (t.state == TrialState.FAIL and t.number not in retried)
    )


def front_size(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> int:
    """Trials on the Pareto front (as ``study.best_trials``), a reused result counted once."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    points = [
        tuple(sign * value for sign, value in zip(signs, t.values, strict=True))
        for t in trials
        if t.state == TrialState.COMPLETE
        and TrialRecord.of(t).duplicate_of is None
        and all(c <= 0 for c in t.constraints.values())
    ]
    # Every objective minimised now; equal points all count.
    return int(front_mask(np.asarray(points)).sum())


@dataclass
class _Ticket:
    trial: Trial
    config_list: list[dict[str, Any]]
    train: dict[str, Any]
    key: str
    baseline: str | None
    retry_of: int | None
    seed: int


@dataclass
class _Loop:
    study: optuna.Study
    context: StudyContext
    progress: Progress
    # Set on a shared database (no lock file): other machines add and fail trials too.
    heartbeat: Heartbeat | None = None
    # The weights every trial starts from; None when trials train from scratch.
    float_model_path: Path | None = None
    in_flight: dict[int, _Ticket] = field(default_factory=dict)
    # Trials waiting for a running twin (same config_list) instead of training it again.
    parked: dict[str, list[_Ticket]] = field(default_factory=dict)
    # Parked trials whose twin failed: they train after all.
    unparked: list[_Ticket] = field(default_factory=list)
    # Shared database: trials whose parameters another process is training right now, by the
    # number of that running trial; they take its result once it lands.
    parked_elsewhere: dict[int, list[_Ticket]] = field(default_factory=dict)
    # The finished trial of each config key (the lowest-numbered one): a repeated key reuses
    # its result. Filled from every read of the trials, each finished trial keyed once.
    finished: dict[str, FrozenTrial] = field(default_factory=dict)
    _keyed: set[int] = field(default_factory=set)
    # The trials as last read, their counted_trials, and the trials asked since that read.
    _trials: list[FrozenTrial] = field(default_factory=list)
    _counted: int = 0
    _asked_since_read: int = 0
    # The target (smallest model within an accuracy drop): the study stops once it is met.
    target: TargetState | None = None
    _target_trial: int | None = None
    # Queues the sensitivity's predicted front, a trial at a time, before the sampler's own.
    guide: SeedGuide | None = None

    @property
    def spec(self) -> SearchSpec:
        return self.context.spec

    def run(self, pool: InlinePool | ProcessPool) -> None:
        trials = self._read_trials()
        self.progress.start(
            total=self.spec.n_trials, done=self._done(trials), front=self._front(trials)
        )
        try:
            while True:
                self._fill(pool)
                if not self.in_flight:
                    if not self.parked_elsewhere:
                        break
                    time.sleep(_ELSEWHERE_POLL_SECONDS)  # nothing here to wait on but others
                    self._read_trials()
                    self._take_elsewhere()
                    continue
                number, outcome = pool.next_result()
                ticket = self.in_flight.pop(number)
                self._finish(ticket, outcome)
                self._retry_died(ticket, outcome)
        except BaseException:
            pool.terminate()
            self._abandon("interrupted: the study process stopped before the trial finished")
            raise

    def _front(self, trials: Sequence[FrozenTrial]) -> int:
        return front_size(trials, self.context.directions)

    def _retry_died(self, ticket: _Ticket, outcome: TrialOutcome) -> None:
        """A trial whose worker died runs once more (not a retry's retry: that is the trial)."""
        trial = ticket.trial
        reason = outcome.record.fail_reason or ""
        if outcome.state != "FAIL" or not reason.startswith(WORKER_DIED):
            return
        if TrialRecord.of(trial).retry_of is not None:
            return
        self.study.enqueue_trial(trial.params, user_attrs=_retry_attrs(trial))
        self._read_trials()  # the failure no longer counts; its retry does, once asked

    def _running_elsewhere(self, ticket: _Ticket) -> int | None:
        """The number of a RUNNING trial of another process with this ticket's parameters."""
        if self.heartbeat is None:
            return None
        number = ticket.trial.number
        params = ticket.trial.params
        for trial in self._trials:
            if (
                trial.state == TrialState.RUNNING
                and trial.number != number
                and trial.number not in self.in_flight
                and trial.params == params
                and TrialRecord.of(trial).baseline == ticket.baseline
            ):
                return trial.number
        return None

    def _take_elsewhere(self) -> None:
        """Parked tickets whose twin elsewhere finished: take its result, or train after all."""
        states = {t.number: t.state for t in self._trials}
        for number in list(self.parked_elsewhere):
            if states.get(number) == TrialState.RUNNING:
                continue
            for ticket in self.parked_elsewhere.pop(number):
                original = self.finished.get(ticket.key)
                if original is not None:
                    self._tell_duplicate(ticket, original)
                else:
                    self.unparked.append(ticket)

    def _done(self, trials: Sequence[FrozenTrial]) -> int:
        """Counted trials not running, of ``trials`` as ``_read_trials`` just read them."""
        return self._counted - sum(t.state == TrialState.RUNNING for t in trials)

    def _read_trials(self) -> list[FrozenTrial]:
        """Read all trials from the storage; key its newly finished trials in ``finished``."""
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state not in _FINISHED or trial.number in self._keyed:
                continue
            self._keyed.add(trial.number)
            record = TrialRecord.of(trial)
            if record.config_list is not None:
                key = config_key(record.config_list, record.train)
                known = self.finished.get(key)
                if known is None or trial.number < known.number:
                    self.finished[key] = trial
        self._trials = trials
        self._counted = counted_trials(trials)
        self._asked_since_read = 0
        return trials

    def _counted_now(self) -> int:
        """counted_trials of the study as it is now.

        With the lock file this process alone writes the study, and each ask adds one counted
        trial (a new or WAITING trial becomes RUNNING) to the last read; on a shared database
        other machines change it, so the trials are read again.
        """
        if self.heartbeat is not None:
            self._read_trials()
        return self._counted + self._asked_since_read

    def _fill(self, pool: InlinePool | ProcessPool) -> None:
        if self.parked_elsewhere:
            self._take_elsewhere()
        while self.unparked and pool.has_capacity:
            self._submit(pool, self.unparked.pop(0))
        while pool.has_capacity:
            if self.heartbeat is not None:
                _fail_stale_trials(self.study)
            if self._counted_now() >= self.spec.n_trials or self._target_met():
                return
            if self.guide is not None:
                self._queue_seed(self.guide)
            ticket = self._ask()
            original = self.finished.get(ticket.key)
            elsewhere = None if original is not None else self._running_elsewhere(ticket)
            if original is not None:
                self._tell_duplicate(ticket, original)
            elif any(t.key == ticket.key for t in self.in_flight.values()):
                # The same config_list is training right now: take its result when it lands.
                self.parked.setdefault(ticket.key, []).append(ticket)
            elif elsewhere is not None:
                # Another machine trains these parameters now: wait for its result instead.
                self.parked_elsewhere.setdefault(elsewhere, []).append(ticket)
            else:
                self._submit(pool, ticket)

    def _queue_seed(self, guide: SeedGuide) -> None:
        """Queue the guide's next seed; once it has ended, say why (once) and drop it."""
        trials = self._read_trials()
        if guide.queue_next(self.study, trials):
            return
        reason = guide.ended(trials, [TrialRecord.of(t) for t in trials])
        if reason is not None:
            self.progress.message(f"seeds: {reason}; the sampler goes on alone")
            self.guide = None

    def _target_met(self) -> bool:
        """Whether a trial within the target is as small as the space allows (said once)."""
        if self.target is None:
            return False
        if self._target_trial is None:
            best = reached(self._trials, self.target)
            if best is None:
                return False
            self._target_trial = best.number
            self.progress.message(
                f"target: trial {best.number} is within {self.target.max_accuracy_drop:.2%} of "
                "the float accuracy at the smallest size the space allows; no more trials"
            )
        return True

    def _ask(self) -> _Ticket:
        plan = self.context.plan
        with warnings.catch_warnings():
            # Optuna expects heartbeats from Study.optimize; here the Heartbeat thread sends them.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask(plan.distributions)
        self._asked_since_read += 1
        if self.heartbeat is not None:
            self.heartbeat.add(_trial_id(trial))
        values = plan.values(trial.params)
        queued = TrialRecord.from_attrs(trial.user_attrs)
        config_list = [] if queued.baseline == "float" else plan.config_list(values)
        train = plan.train_overrides(values)
        return _Ticket(
            trial=trial,
            config_list=config_list,
            train=train,
            key=config_key(config_list, train),
            baseline=queued.baseline,
            retry_of=queued.retry_of,
            seed=trial_seed(self.spec.seed, trial.number),
        )

    def _submit(self, pool: InlinePool | ProcessPool, ticket: _Ticket) -> None:
        spec = self.spec
        _, folder = artifacts_dir(spec)
        number = ticket.trial.number
        job = TrialJob(
            number=number,
            seed=ticket.seed,
            task=spec.task,
            task_seed=spec.seed,
            algorithm=spec.algorithm,
            mode=trial_mode(spec.algorithm, ticket.config_list, from_scratch=spec.from_scratch),
            # Threads are set once per process (run_study, workers), not per trial.
            train={k: v for k, v in {**spec.train, **ticket.train}.items() if k != "num_threads"},
            searched_train=ticket.train,
            config_list=ticket.config_list,
            objectives=spec.objectives,
            float_weights=None if self.float_model_path is None else str(self.float_model_path),
            calibration_batches=spec.calibration_batches,
            checkpoint=str(folder / f"trial_{number}.pt"),
            hopeless=spec.hopeless,
        )
        self.in_flight[number] = ticket
        pool.submit(job)

    def _finish(self, ticket: _Ticket, outcome: TrialOutcome) -> None:
        trial = ticket.trial
        spec = self.spec
        identity = {"baseline": ticket.baseline, "retry_of": ticket.retry_of}
        if outcome.record.config_list is None:  # a worker that died reports only why
            identity.update(
                algorithm=spec.algorithm,
                mode=trial_mode(spec.algorithm, ticket.config_list, from_scratch=spec.from_scratch),
                config_list=ticket.config_list,
                train=ticket.train,
                seed=ticket.seed,
            )
        record = outcome.record.model_copy(update=identity)
        if outcome.state == "COMPLETE":
            root, folder = artifacts_dir(self.spec)
            checkpoint = folder / f"trial_{trial.number}.pt"
            float_size = self.context.float_size_bytes
            record = record.model_copy(
                update={
                    "float_size_bytes": float_size,
                    "compression_ratio": float_size / record.size_bytes,
                    "float_bitops": self.context.float_bitops,
                    "checkpoint": str(
                        checkpoint.relative_to(root)
                        if sqlite_path(self.spec.storage)
                        else checkpoint
                    ),
                }
            )
        self._tell(ticket, outcome.state, record, outcome.values)
        twins = self.parked.pop(ticket.key, [])
        if not twins:
            return
        finished = self._trials[trial.number]  # as read by _tell
        for twin in twins:
            if finished.state in _FINISHED:
                self._tell_duplicate(twin, finished)
            else:
                self.unparked.append(twin)

    def _tell_duplicate(self, ticket: _Ticket, original: FrozenTrial) -> None:
        record = TrialRecord.of(original).reused_by(
            seed=ticket.seed,
            baseline=ticket.baseline,
            retry_of=ticket.retry_of,
            config_list=ticket.config_list,
            train=ticket.train,
            duplicate_of=original.number,
            train_seconds=0.0,
        )
        if original.state == TrialState.PRUNED:
            record = record.model_copy(
                update={
                    "fail_reason": f"same config_list as trial {original.number}, which was "
                    f"stopped: {TrialRecord.of(original).fail_reason}"
                }
            )
        values = tuple(original.values) if original.values is not None else ()
        self._tell(ticket, original.state.name, record, values)

    def _tell(
        self, ticket: _Ticket, state: str, record: TrialRecord, values: Sequence[float]
    ) -> None:
        trial = ticket.trial
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        if state == "COMPLETE":
            constraints = self.spec.constraints
            accuracy, size = record.val_accuracy, record.size_bytes
            if constraints.min_accuracy is not None and accuracy is not None:
                trial.set_constraint("min_accuracy", constraints.min_accuracy - accuracy)
            if constraints.max_size_bytes is not None and size is not None:
                trial.set_constraint("max_size_bytes", size - constraints.max_size_bytes)
            self.study.tell(trial, list(values))
        else:
            self.study.tell(trial, state=TrialState[state])
        if self.heartbeat is not None:
            self.heartbeat.discard(_trial_id(trial))
        trials = self._read_trials()
        report = TrialReport(number=trial.number, state=state, record=record)
        self.progress.trial(report, done=self._done(trials), front=self._front(trials))

    def _abandon(self, reason: str) -> None:
        """Fail every trial this process holds and queue its parameters to run again."""
        tickets = [
            *self.in_flight.values(),
            *(t for ts in self.parked.values() for t in ts),
            *(t for ts in self.parked_elsewhere.values() for t in ts),
            *self.unparked,
        ]
        self.in_flight.clear()
        self.parked.clear()
        self.parked_elsewhere.clear()
        self.unparked.clear()
        for ticket in tickets:
            with contextlib.suppress(Exception):
                _fail_and_requeue(self.study, ticket.trial, reason)


def _trial_id(trial: Trial | FrozenTrial) -> int:
    # Optuna keys its storage by this id; it has no public accessor.
    return trial._trial_id


def _fail_and_requeue(study: optuna.Study, trial: Trial | FrozenTrial, reason: str) -> None:
    """Fail a RUNNING trial (of this or a dead process) with a reason; queue it again."""
    frozen = study.get_trials(deepcopy=False)[trial.number]
    # A trial of a dead process has no Trial object here; write through the storage.
    study._storage.set_trial_user_attr(_trial_id(frozen), "fail_reason", reason)
    study.tell(frozen.number, state=TrialState.FAIL)
    study.enqueue_trial(frozen.params, user_attrs=_retry_attrs(frozen))


def requeue_interrupted(study: optuna.Study, folder: Path | None = None) -> list[int]:
    """Fail the RUNNING trials of a dead process and queue their parameters again.

    Call only while holding the study's lock (so no live process owns those trials). A
    checkpoint such a trial left in ``folder`` (the artifacts folder) is deleted: no trial the
    study holds wrote it, so nothing may ever take it.
    """
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        _fail_and_requeue(
            study, trial, "interrupted: its process stopped (killed or crashed) mid-trial"
        )
        if folder is not None:
            (folder / f"trial_{trial.number}.pt").unlink(missing_ok=True)
    return [t.number for t in stale]


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
    progress = progress or _Silent()
    _, folder = artifacts_dir(spec)
    # Found now, not as a failure of every trial: checkpoints go to this folder.
    try:
        check_writable_folder(folder, "the artifacts folder")
    except ValueError as error:
        raise StorageError(str(error)) from None
    study = open_study(context)
    local = sqlite_path(spec.storage) is not None
    heartbeat: Heartbeat | None = None
    with _study_lock(folder) if local else contextlib.nullcontext():
        if local:
            requeue_interrupted(study, folder)
        else:
            _fail_stale_trials(study)
            heartbeat = Heartbeat(_beat(study), HEARTBEAT_SECONDS)
        loop = _Loop(study, context, progress, heartbeat)
        # The float model trains here, on every thread the jobs will share.
        torch.set_num_threads(min(available_cores(), num_threads * jobs))
        made = ensure_float_model(study, context, log=progress.message)
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
                torch.set_num_threads(num_threads if jobs == 1 else 1)
                loop.run(pool)
        finally:
            progress.close()
    return study


def _beat(study: optuna.Study) -> Callable[[Iterable[int]], None]:
    storage = study._storage

    def beat(trial_ids: Iterable[int]) -> None:
        for trial_id in trial_ids:
            storage.record_heartbeat(trial_id)

    return beat
