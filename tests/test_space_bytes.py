"""A space file with NUL or control bytes is refused in one line that says where."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantsearch.cli import main


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"study_name: x\ntask: digits\x00\x01\n", r"line 2, column 13: the control character "
         r"'\x00' is not allowed"),
        (b"study_name: x\x07\x1b[31m\n", r"line 1, column 14: the control character '\x07' is "
         "not allowed"),
        (b"params: [1,\n", "line 2, column 1: expected the node content, but found '<stream end>'"),
    ],
)
def test_a_space_that_is_not_yaml_is_one_line(
    content: bytes,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("space.yaml").write_bytes(content)
    assert main(["validate", "--space", "space.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == f"quantsearch: error: space.yaml: not valid YAML: {expected}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
