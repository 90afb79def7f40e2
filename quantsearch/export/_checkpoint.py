"""A trial's checkpoint, and the study's float model: on this machine, or fetched from the
study's artifact store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from quantsearch.export._errors import ExportError

__all__ = ["checkpoint_file", "float_weights_file", "load_checkpoint", "resolve_checkpoint"]


def resolve_checkpoint(
    study: optuna.Study,
    trial: FrozenTrial,
    *,
    checkpoint_root: str | Path | None = None,
) -> Path:
    """The file of ``trial``'s "checkpoint" attribute, relative to the study's SQLite folder.

    ``checkpoint_root`` replaces that folder (needed for storages that are not SQLite files).
    """
    from quantsearch.pipeline import TrialRecord

    relative = TrialRecord.of(trial).checkpoint
    if not relative:
        raise ExportError(
            f"trial {trial.number} has no stored checkpoint (user attribute 'checkpoint'): "
            "rerun the study with a version that stores checkpoints"
        )
    path = Path(relative)
    if not path.is_absolute():
        root = Path(checkpoint_root) if checkpoint_root is not None else _checkpoint_root(study)
        if root is None:
            raise ExportError(
                f"trial {trial.number}'s checkpoint {relative!r} is relative to the study's "
                "SQLite file, but this study is not stored in one: pass checkpoint_root"
            )
        path = root / path
    if not path.is_file():
        raise ExportError(
            f"checkpoint of trial {trial.number} not found at {path}: the study's artifacts "
            "folder must stay beside its database file"
        )
    return path


def checkpoint_file(
    study: optuna.Study,
    trial: FrozenTrial,
    out: Path,
    *,
    checkpoint_root: str | Path | None,
    store: str | None,
) -> tuple[Path, bool]:
    """The trial's checkpoint: on this machine, or fetched from the artifact ``store`` into
    ``out`` (then True: the caller deletes it once read)."""
    from quantsearch.pipeline import (
        ArtifactError,
        TrialRecord,
        fetch_artifact,
        file_sha256,
        open_artifact_store,
    )

    record = TrialRecord.of(trial)
    artifact = record.checkpoint_artifact
    try:
        path = resolve_checkpoint(study, trial, checkpoint_root=checkpoint_root)
    except ExportError:
        if artifact is None:
            raise
    else:
        # A local file of other bytes is read anyway when there is no stored copy: loading
        # it says what is wrong with it.
        if artifact is None or record.checkpoint_sha256 in (None, file_sha256(path)):
            return path, False
    if store is None:
        raise ExportError(
            f"trial {trial.number}'s checkpoint is in an artifact store the study does not "
            "name: give it with --artifacts"
        )
    try:
        fetched = fetch_artifact(
            open_artifact_store(store),
            artifact,
            out / f".trial_{trial.number}.pt",
            what=f"the checkpoint of trial {trial.number}",
            sha256=record.checkpoint_sha256,
        )
    except ArtifactError as error:
        raise ExportError(str(error)) from None
    return fetched, True


def float_weights_file(
    study: optuna.Study,
    out: Path,
    *,
    checkpoint_root: str | Path | None,
    store: str | None,
    why: str,
) -> tuple[Path, bool]:
    """The study's float model (its ``float_model`` attribute): the file on this machine when
    its weights hash as recorded, else fetched from the artifact ``store`` into ``out`` (then
    True: the caller deletes it). ``why`` says what needs it, for the errors."""
    from quantsearch.pipeline import (
        ArtifactError,
        StudyRecord,
        fetch_artifact,
        load_state,
        open_artifact_store,
        state_sha256,
    )

    stored = StudyRecord.of(study).float_model
    if stored is None:
        raise ExportError(f"{why}, but study {study.study_name!r} records no float model")
    path = Path(stored.file)
    if not path.is_absolute():
        root = Path(checkpoint_root) if checkpoint_root is not None else _checkpoint_root(study)
        path = (root or Path.cwd()) / path

    def fits(file: Path) -> bool:
        try:
            return state_sha256(load_state(file)) == stored.sha256
        except (OSError, ValueError, RuntimeError):
            return False

    if path.is_file() and fits(path):
        return path, False
    if stored.artifact is None or store is None:
        state = "changed since the study made it" if path.is_file() else "not found"
        raise ExportError(f"{why}: the study's float model {path} is {state}")
    fetched = out / ".float_model.pt"
    try:
        fetch_artifact(
            open_artifact_store(store), stored.artifact, fetched, what="the study's float model"
        )
    except ArtifactError as error:
        raise ExportError(str(error)) from None
    if not fits(fetched):
        fetched.unlink(missing_ok=True)
        raise ExportError(f"{why}: the float model in {store} is not the one the study recorded")
    return fetched, True


def _checkpoint_root(study: optuna.Study) -> Path | None:
    """The folder relative checkpoint paths start from: the SQLite file's (its location's
    root); None for a study not stored in a SQLite file."""
    from quantsearch.pipeline import StudyLocation, storage_url

    url = storage_url(study)
    if url is None:
        return None
    location = StudyLocation.of(url, study.study_name)
    return None if location.shared else location.root


def load_checkpoint(path: Path, trial_number: int) -> dict[str, Any]:
    """The state dict stored at ``path``; ExportError (one line naming it) if unreadable.

    torch's own message for a damaged file spans lines and suggests ``weights_only=False``,
    which would run whatever the file holds: never that.
    """
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile,
            ValueError, KeyError, AttributeError, TypeError):
        state = None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ExportError(
            f"checkpoint of trial {trial_number} at {path} is damaged or is not a checkpoint "
            "(truncated or changed since the trial wrote it): run the trial again"
        )
    return state
