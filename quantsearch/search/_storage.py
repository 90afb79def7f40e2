"""Where a study's trials are stored: opening, creating and checking the database, and locks.

A refused database keeps every byte: SQLite files are checked read-only before anything is
written, and a study of the same name made from another space is refused before it is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage

from quantsearch._paths import check_writable_folder
from quantsearch.pipeline import (
    METRICS,
    STUDY_RECORD_VERSION,
    StudyLocation,
    StudyRecord,
    TrialRecord,
    mask_url,
)
from quantsearch.search._errors import SpaceError
from quantsearch.search._prepare import StudyContext
from quantsearch.search._recovery import grace_seconds, heartbeat_seconds, requeue_stale
from quantsearch.search._samplers import make_sampler, sampler_seed
from quantsearch.search._spec import SearchSpec

__all__ = [
    "StorageError",
    "StudyBusyError",
    "StudyNotFoundError",
    "check_sqlite_file",
    "initialise",
    "load_study",
    "load_study_from",
    "open_study",
    "study_lock",
    "study_sampler",
]

class StudyNotFoundError(ValueError):
    """A command that reads a study found no such study (or no such database file)."""


class StorageError(ValueError):
    """The study's database cannot be opened (no driver, server unreachable)."""


class StudyBusyError(ValueError):
    """Another process is already running this study on this SQLite file."""


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


def check_sqlite_file(
    path: Path, *, write: bool, study: tuple[str, Sequence[str]] | None = None
) -> None:
    """Refuse (StorageError naming ``path``) what cannot be this study's SQLite database.

    Reads only, through a read-only connection, so a refused file keeps every byte, and its
    folder every file: a folder, a file that is not SQLite, a corrupt database, another
    program's database, tables of another optuna version; with ``study`` (name, directions),
    a study of that name that another program made; with ``write``, a read-only file or folder.
    """
    if path.is_dir():
        raise StorageError(f"{path}: is a folder, not a SQLite database file")
    if not path.exists():
        if write:
            _check_folder(path.parent, "the database's folder")
        return
    # A read-only connection to a WAL database still creates these beside it.
    companions = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    existing = {p for p in companions if p.exists()}
    try:
        _check_contents(path, study)
    except StorageError:
        for companion in companions:
            if companion not in existing:
                companion.unlink(missing_ok=True)
        raise
    if write:
        if not os.access(path, os.R_OK | os.W_OK):
            raise StorageError(f"{path}: is read-only, and the study writes its trials to it")
        _check_folder(path.parent, "the database's folder")


def _check_contents(path: Path, study: tuple[str, Sequence[str]] | None) -> None:
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as error:
        raise StorageError(f"{path}: cannot be read ({error.strerror})") from None
    if not header:
        return
    if header != _SQLITE_HEADER:
        raise StorageError(f"{path}: is not a SQLite database (it lacks SQLite's file header)")
    schema = _read_sqlite_schema(path, study[0] if study else None)
    if schema.tables and not schema.tables >= _OPTUNA_TABLES:
        tables = sorted(schema.tables)
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(
            f"{path}: is a SQLite database that quantsearch did not create (its tables: "
            f"{shown}); give another --storage"
        )
    if schema.revision is not None and schema.revision != _optuna_schema_head():
        raise StorageError(
            f"{path}: its study tables are of another optuna version (schema "
            f"{schema.revision}, this optuna {optuna.__version__} uses "
            f"{_optuna_schema_head()}); upgrade it with `optuna storage upgrade --storage "
            "sqlite:///PATH`, or use another --storage"
        )
    stored = schema.study
    # Without attributes, an empty study of the same directions is one a crash left behind.
    if (
        study is not None
        and stored is not None
        and not stored.created
        and (stored.trials or stored.directions != [d.lower() for d in study[1]])
    ):
        raise StorageError(
            f"{path}: already holds a study {study[0]!r} that quantsearch did not create; "
            "give the space another study_name"
        )


def _check_folder(folder: Path, label: str) -> None:
    try:
        check_writable_folder(folder, label)
    except ValueError as error:
        raise StorageError(f"{error} (SQLite writes its journal beside the database)") from None


@dataclass(frozen=True)
class _StoredStudy:
    created: bool
    """Whether quantsearch wrote its attributes (StudyRecord.created)."""
    trials: int
    directions: list[str]


@dataclass(frozen=True)
class _SqliteSchema:
    tables: set[str]
    revision: str | None
    study: _StoredStudy | None
    """The study of the name asked for, where there is one."""


def _read_sqlite_schema(path: Path, study_name: str | None) -> _SqliteSchema:
    """The tables of a SQLite file, its alembic revision and the named study, read only."""
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
            study = None
            if study_name is not None and tables >= _OPTUNA_TABLES | {"study_directions"}:
                study = _stored_study(db, study_name)
    except sqlite3.DatabaseError as error:
        raise StorageError(f"{path}: is a corrupt SQLite database ({error})") from None
    return _SqliteSchema(tables, revision, study)


def _stored_study(db: sqlite3.Connection, name: str) -> _StoredStudy | None:
    row = db.execute("SELECT study_id FROM studies WHERE study_name = ?", (name,)).fetchone()
    if row is None:
        return None
    study_id = row[0]
    created = db.execute(
        "SELECT 1 FROM study_user_attributes WHERE study_id = ? AND key = ?",
        (study_id, StudyRecord.CREATED_ATTR),
    ).fetchone()
    trials = db.execute("SELECT COUNT(*) FROM trials WHERE study_id = ?", (study_id,)).fetchone()
    directions = db.execute(
        "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective",
        (study_id,),
    ).fetchall()
    return _StoredStudy(created is not None, trials[0], [d[0].lower() for d in directions])


def _storage(location: StudyLocation, directions: Sequence[str]) -> RDBStorage:
    path = location.database
    if path is not None:
        check_sqlite_file(path, write=True, study=(location.study_name, directions))
        return _open_rdb(location.storage, engine_kwargs={"creator": _sqlite_connector(path)})
    return _open_rdb(
        location.storage,
        heartbeat_interval=heartbeat_seconds(),
        grace_period=grace_seconds(),
        heartbeat_stale_trial_callback=requeue_stale,
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


def study_sampler(
    spec: SearchSpec, resume_index: int, *, shared: bool = False
) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded by :func:`sampler_seed` (fresh draws on resume, and per
    process on a shared database)."""
    seed = sampler_seed(spec.seed, resume_index, shared=shared)
    return make_sampler(
        spec.sampler.name, spec.sampler.options, seed=seed, n_trials=spec.n_trials
    )


def _existing_study_id(storage: RDBStorage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _check_space(study: optuna.Study, spec: SearchSpec) -> StudyRecord:
    """The study's record, once its space is known to be ``spec``'s."""
    record = StudyRecord.of(study)
    if record.space_hash is None or spec.matches_stored(record.space_hash, record.space):
        return record
    changed = spec.changed_from(record.space) or ["(unknown)"]
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
    path = context.location.database
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
    spec, location = context.spec, context.location
    shared = location.shared
    storage = _storage(location, context.directions)
    existing = _existing_study_id(storage, spec.study_name)
    if existing is None:
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=spec.study_name,
                directions=context.directions,
                sampler=study_sampler(spec, 0, shared=shared),
            )
        except optuna.exceptions.DuplicatedStudyError:
            existing = _existing_study_id(storage, spec.study_name)  # another machine won
        else:
            initialise(study, context)
            return study
    resume_index = len(storage.get_all_trials(existing, deepcopy=False))
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=storage,
        sampler=study_sampler(spec, resume_index, shared=shared),
    )
    if not _check_space(study, spec).created:
        # Created a moment ago by another machine, which is still writing its attributes.
        if study.trials or [d.name.lower() for d in study.directions] != context.directions:
            raise SpaceError(
                f"{location.shown} already holds a study {spec.study_name!r} that "
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
    StudyRecord.write(
        study,
        record_version=STUDY_RECORD_VERSION,
        space=spec.to_dict(),
        task={**spec.task.to_dict(), "seed": spec.seed},
        algorithm=spec.algorithm,
        float_size_bytes=context.float_size_bytes,
        float_bitops=context.float_bitops,
        layers=context.layers,
        # Only where a metric is the task's own: a classifier's study stores what it did.
        **({"metrics": context.metrics} if set(context.metrics) - set(METRICS) else {}),
        # Last: a study whose space_hash is written is fully created (StudyRecord.created).
        space_hash=spec.space_hash,
    )


def initialise(study: optuna.Study, context: StudyContext) -> None:
    _set_study_attrs(study, context)
    for label in context.spec.baselines.labels:
        queued = TrialRecord(baseline=label).model_dump(include={"baseline"})
        study.enqueue_trial(context.plan.baseline_params(label), user_attrs=queued)


def load_study(spec: SearchSpec) -> optuna.Study:
    """The study of a space, for reading (trials, report, export); never creates anything."""
    study = load_study_from(
        spec.storage, spec.study_name, hint=f"run `quantsearch study --space {spec.source}` first"
    )
    _check_space(study, spec)
    return study


def load_study_from(url: str, study_name: str, *, hint: str = "") -> optuna.Study:
    """An existing study by storage URL and name; StudyNotFoundError names what exists."""
    path = StudyLocation.of(url, study_name).database
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
def study_lock(location: StudyLocation) -> Iterator[None]:
    """Hold the study's lock file: one process runs a study on a SQLite file at a time.

    The lock dies with its process (even under SIGKILL), which is what makes every RUNNING
    trial found by the next holder a trial left behind by a dead process.
    """
    path = location.lock
    path.parent.mkdir(parents=True, exist_ok=True)
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

