"""Hostile space files: names that would leave their folder, YAML that explodes, values that
pass a naive check and fail later. Each is refused by the parser with one exact message."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantsearch.pipeline import mask_url
from quantsearch.search import SpaceError, load_space, parse_space, study_location
from quantsearch.search._errors import shown
from quantsearch.search._rules import MAX_SEED
from quantsearch.search._yaml import MAX_DEPTH, MAX_NODES, MAX_SPACE_BYTES

MINIMAL = {"algorithm": "qat", "params": {"quant_bits": {"_type": "choice", "_value": [4, 8]}}}
RULE = (
    "is not a study name: use 1 to 100 ASCII letters, digits, '.', '_' or '-', starting with a "
    "letter or a digit (it names the study's files and folders)"
)


def _error(data: object, source: str = "space.yaml") -> str:
    with pytest.raises(SpaceError) as caught:
        parse_space(data, source=source, default_name="space")
    return str(caught.value)


def _load_error(path: Path) -> str:
    with pytest.raises(SpaceError) as caught:
        load_space(path)
    return str(caught.value)


@pytest.mark.parametrize(
    "name",
    ["../../../x", "/tmp/abs", "..", ".", "a/b", "a\\b", ".hidden", "-x", "", " ", "x" * 101,
     "a\0b", "tab\tname", "naïve", 7, None],
)
def test_a_study_name_that_is_not_a_name_is_refused_with_the_rule(name: object) -> None:
    assert _error({**MINIMAL, "study_name": name}) == (
        f"space.yaml: study_name: {shown(name)} {RULE}"
    )


def test_a_long_study_name_is_shown_shortened() -> None:
    message = _error({**MINIMAL, "study_name": "x" * 10_000})
    assert message == f"space.yaml: study_name: '{'x' * 37}...{'x' * 38}' {RULE}"


def test_the_default_name_from_the_file_says_where_it_came_from(tmp_path: Path) -> None:
    path = tmp_path / "my space.yaml"
    path.write_text("algorithm: qat\nparams: {quant_bits: 8}\n")
    assert _load_error(path) == (
        f"{path}: study_name: 'my space' (by default the space file's name) {RULE}"
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=120) | st.text(string.printable, max_size=12))
def test_no_study_name_derives_a_path_outside_its_folders(name: str) -> None:
    """Every name is refused, or every file it names stays in studies/ and reports/."""
    try:
        spec = parse_space({**MINIMAL, "study_name": name}, source="s.yaml")
    except SpaceError as error:
        assert RULE in str(error)
        return
    folder = study_location(spec).folder
    storage = Path(spec.storage.removeprefix("sqlite:///"))
    report = Path("reports") / spec.study_name
    # Exactly one component below each folder, none of them a way out.
    assert storage.parts == ("studies", f"{name}.db")
    assert folder.parts == ("studies", f"{name}_artifacts", name)
    assert report.parts == ("reports", name)
    assert not {".", ".."} & {*storage.parts, *folder.parts, *report.parts}


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    lines = ["a0: &a0 [" + ", ".join(["1"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 500  # 9^9 values once expanded
    assert _load_error(path) == (
        f"{path}: too large: more than {MAX_NODES} values once its aliases are expanded"
    )


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("algorithm: qat\nparams: &p {quant_bits: 8, again: *p}\n")
    assert _load_error(path) == (
        f"{path}: too large: an alias refers to a value that contains it (endless nesting)"
    )


def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 10_000 + "]" * 10_000 + "\n")
    assert _load_error(path) == (
        f"{path}: too large: nested deeper than {MAX_DEPTH} levels "
        f"(line 1, column {MAX_DEPTH + 1})"
    )


def test_aliases_that_nest_deeply_are_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 200)]
    path = tmp_path / "chain.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert _load_error(path) == f"{path}: too large: nested deeper than {MAX_DEPTH} levels"


def test_an_endless_file_is_read_only_up_to_the_limit() -> None:
    assert _load_error(Path("/dev/zero")) == (
        f"/dev/zero: is larger than {MAX_SPACE_BYTES} bytes; a search space is a small YAML file"
    )


def test_a_huge_value_is_not_echoed_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("algorithm: qat\nparams:\n  quant_bits: " + "x" * 500_000 + "\n")
    message = _load_error(path)
    assert len(message) < 600
    assert message.startswith(f"{path}: params.quant_bits: 'xxxx")
    assert "characters cut" in message
    assert message.endswith("is not an integer 1..16 or 'float', nor a search space "
                            "{_type: ..., _value: [...]}")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"lr": {"_type": "uniform", "_value": [0.1, float("inf")]}},
            "params.lr._value: [0.1, inf]: every bound must be a finite number",
        ),
        (
            {"lr": {"_type": "loguniform", "_value": [float("nan"), 1.0]}},
            "params.lr._value: [nan, 1.0]: every bound must be a finite number",
        ),
        (
            {"lr": {"_type": "quniform", "_value": [0.1, 1.0, float("inf")]}},
            "params.lr._value: [0.1, 1.0, inf]: every bound must be a finite number",
        ),
        (
            {"lr": {"_type": "choice", "_value": [0.1, float("inf")]}},
            "params.lr._value[1]: inf is not a finite number",
        ),
        ({"lr": float("inf")}, "params.lr: inf is not a number > 0, nor a search space"),
    ],
)
def test_infinite_and_nan_values_are_refused(params: dict, message: str) -> None:
    data = {**MINIMAL, "params": {**MINIMAL["params"], **params}}
    assert _error(data).startswith(f"space.yaml: {message}")


def test_a_seed_beyond_32_bits_is_refused() -> None:
    assert parse_space({**MINIMAL, "seed": MAX_SEED}, source="s").seed == MAX_SEED
    assert _error({**MINIMAL, "seed": 10**27}) == (
        f"space.yaml: seed: {10**27} is not an integer in 0..{MAX_SEED}"
    )


def test_a_storage_with_a_nul_byte_is_refused() -> None:
    assert _error({**MINIMAL, "storage": "a\0b.db"}) == (
        "space.yaml: storage: 'a\\x00b.db' is not a storage: give a SQLite file path or a "
        "database URL (sqlite:///path.db, postgresql://...)"
    )


def test_the_stored_space_never_holds_the_password() -> None:
    spec = parse_space(
        {**MINIMAL, "storage": "postgresql://ann:s3cret@db.example/qs"}, source="s"
    )
    assert spec.storage == "postgresql://ann:s3cret@db.example/qs"  # what connects
    assert spec.to_dict()["storage"] == "postgresql://ann:***@db.example/qs"  # what is stored
    assert "s3cret" not in repr(spec.to_dict())


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql+psycopg://u:p%40ss@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://h/db?password=zz&sslmode=require", "postgresql://h/db?password=***&sslmode=require"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("sqlite:///studies/a b.db", "sqlite:///studies/a b.db"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
