"""A SQLite file refused before the study is opened leaves its folder exactly as it was."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import optuna
import pytest

from quantsearch.search import StorageError, load_space, prepare, run_study
from quantsearch.search._storage import check_sqlite_file

from ._spaces import write_space


def _folder(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` with its sha256, SQLite's -wal/-shm files included."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _wal_database(path: Path) -> bytes:
    # Closed here: a connection left to the garbage collector checkpoints and deletes its
    # -wal/-shm files whenever it is collected, in the middle of a later snapshot.
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE studies (x)")
    return path.read_bytes()


def test_a_corrupt_wal_database_gets_no_wal_or_shm_files(tmp_path: Path) -> None:
    data = _wal_database(tmp_path / "good.db")
    path = tmp_path / "corrupt.db"
    path.write_bytes(data[:100] + b"\x00" * (len(data) - 100))  # header kept, pages gone
    before = _folder(tmp_path)
    with pytest.raises(StorageError, match=r"corrupt\.db: is a corrupt SQLite database \("):
        check_sqlite_file(path, write=True)
    assert _folder(tmp_path) == before


def test_wal_files_that_were_there_before_stay(tmp_path: Path) -> None:
    data = _wal_database(tmp_path / "good.db")
    path = tmp_path / "corrupt.db"
    path.write_bytes(data[:100] + b"\x00" * (len(data) - 100))
    (tmp_path / "corrupt.db-wal").write_bytes(b"")
    with pytest.raises(StorageError):
        check_sqlite_file(path, write=True)
    assert (tmp_path / "corrupt.db-wal").exists()


@pytest.mark.parametrize("trials", [0, 1])
def test_another_programs_study_of_the_same_name_is_refused_unchanged(
    tmp_path: Path, trials: int
) -> None:
    space = load_space(write_space(tmp_path, storage="other.db"))
    other = optuna.create_study(
        study_name=space.study_name,
        storage=f"sqlite:///{tmp_path / 'other.db'}",
        # With no trial, the directions tell it from a study a crash left before its attributes.
        directions=["minimize"] if trials == 0 else ["maximize", "minimize"],
    )
    for _ in range(trials):
        other.tell(other.ask(), [0.5, 1.0])
    before = _folder(tmp_path)
    with pytest.raises(StorageError) as info:
        run_study(prepare(space))
    assert str(info.value) == (
        f"{tmp_path / 'other.db'}: already holds a study {space.study_name!r} that quantsearch "
        "did not create; give the space another study_name"
    )
    assert _folder(tmp_path) == before
