"""Files every machine of a study can reach: checkpoints and the float model in an
``optuna.artifacts`` store (a shared folder, or S3 and S3-compatible servers).

A study without a store keeps its files in its artifacts folder (:class:`StudyLocation`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, Trial

__all__ = [
    "ArtifactError",
    "ArtifactStore",
    "fetch_artifact",
    "file_sha256",
    "open_artifact_store",
    "store_artifact",
]

_S3 = "s3://"


class ArtifactError(ValueError):
    """An artifact store that cannot be opened, or an artifact missing or damaged in it."""


class ArtifactStore:
    """An ``optuna.artifacts`` store and the location it was opened from (for messages)."""

    def __init__(self, location: str, backend: Any) -> None:
        self.location = location
        self.backend = backend

    def __repr__(self) -> str:
        return f"ArtifactStore({self.location!r})"


class _PrefixedStore:
    """A store whose artifact ids live under a key prefix (``s3://bucket/prefix``)."""

    def __init__(self, backend: Any, prefix: str) -> None:
        self._backend = backend
        self._prefix = prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._backend.open_reader(self._prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._backend.write(self._prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._backend.remove(self._prefix + artifact_id)


def open_artifact_store(location: str) -> ArtifactStore:
    """The store at ``location``: a folder (created if missing) or ``s3://bucket[/prefix]``.

    S3 credentials and the endpoint come from boto3's usual chain (environment, config files,
    instance roles; ``AWS_ENDPOINT_URL`` for an S3-compatible server): none is printed or
    stored. Raises :class:`ArtifactError` for a store that cannot be reached.
    """
    if location.startswith(_S3):
        return ArtifactStore(location, _s3_store(location))
    folder = Path(location)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArtifactError(
            f"artifact store {location}: cannot create the folder ({error.strerror})"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(f"artifact store {location}: the folder is not writable")
    return ArtifactStore(location, FileSystemArtifactStore(folder))


def _s3_store(location: str) -> Any:
    bucket, _, prefix = location[len(_S3) :].partition("/")
    try:
        import boto3
        import botocore.exceptions
        from optuna.artifacts import Boto3ArtifactStore
    except ImportError:
        raise ArtifactError(
            f"artifact store {location}: S3 needs boto3: pip install 'quantsearch[s3]'"
        ) from None
    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        reason = f"cannot reach the bucket ({error})"
        raise ArtifactError(f"artifact store {location}: {reason}") from None
    store = Boto3ArtifactStore(bucket, client=client)
    return _PrefixedStore(store, prefix) if prefix.strip("/") else store


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def store_artifact(
    store: ArtifactStore, path: Path, owner: optuna.Study | Trial | FrozenTrial
) -> str:
    """Upload ``path`` for a study or a running trial; its artifact id."""
    try:
        return upload_artifact(
            artifact_store=store.backend, file_path=str(path), study_or_trial=owner
        )
    except OSError as error:
        raise ArtifactError(
            f"artifact store {store.location}: cannot store {path.name} ({error})"
        ) from None


def fetch_artifact(
    store: ArtifactStore, artifact_id: str, path: Path, *, what: str, sha256: str | None = None
) -> Path:
    """Download ``artifact_id`` to ``path`` (replaced whole, never half-written); with
    ``sha256``, a file of other bytes is refused. ``what`` names it in errors
    (``the checkpoint of trial 3``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    partial = Path(temporary)
    try:
        partial.unlink()  # download_artifact refuses an existing file
        download_artifact(
            artifact_store=store.backend, artifact_id=artifact_id, file_path=str(partial)
        )
        if sha256 is not None and file_sha256(partial) != sha256:
            raise ArtifactError(
                f"{what} in artifact store {store.location} is damaged (artifact {artifact_id}: "
                "its bytes differ from the ones stored)"
            )
        partial.replace(path)
    except ArtifactNotFound:
        raise ArtifactError(
            f"{what} is missing from artifact store {store.location} (artifact {artifact_id})"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return path
