"""The documentation cannot go stale: its code examples run, and the options it names exist.

Every fenced ```python block of ``docs/**/*.md``, ``README.md`` and ``CONTRIBUTING.md`` is a
test. The blocks of one
page run in order, in one namespace and one empty working folder, like a reader typing them in
(so a page can build on its earlier blocks). A block that needs data the test cannot make
(``../shared``, a long study) is marked in the markdown by a line right before it::

    <!-- no-run: why -->

and is then only compiled, and reported as skipped with that reason.

Every ``quantsearch <command> --option`` written in a code span or a shell block is checked
against ``quantsearch <command> --help``, and the options table of ``docs/cli.md`` against the
commands it lists.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
NO_RUN = re.compile(r"^<!--\s*no-run\b:?\s*(?P<why>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})\s*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the code's first line
    lang: str
    code: str
    no_run: str | None  # the reason, for a block marked no-run

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, with the no-run mark before each, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, ticks = len(opening["indent"]), opening["ticks"]
        previous = next((ln.strip() for ln in reversed(lines[:index]) if ln.strip()), "")
        mark = NO_RUN.match(previous)
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        code = "\n".join(line[indent:] for line in lines[index + 1 : end]) + "\n"
        blocks.append(
            Block(page, index + 2, opening["lang"].lower(), code, mark["why"] if mark else None)
        )
        index = end + 1
    return blocks


PYTHON_BLOCKS = [b for page in PAGES for b in fenced_blocks(page) if b.lang in ("python", "py")]


def test_the_docs_have_examples() -> None:
    # Guards the collection itself: a changed fence syntax must not silently collect nothing.
    assert len(PYTHON_BLOCKS) >= 8, [b.id for b in PYTHON_BLOCKS]
    skipped = [b.id for b in PYTHON_BLOCKS if b.no_run is not None]
    assert len(skipped) <= 3, f"keep the no-run exceptions few: {skipped}"


# ---------------------------------------------------------------------------------------------
# Running the python blocks


@dataclass
class _PageRun:
    folder: Path
    namespace: dict
    failed: str | None = None


_RUNS: dict[Path, _PageRun] = {}


@pytest.fixture(scope="module", autouse=True)
def _restore_global_state():
    """Examples register metrics, samplers, ... and set torch's threads: undo it afterwards."""
    import torch

    from quantsearch.pipeline import METRICS
    from quantsearch.quantization import QUANTIZERS
    from quantsearch.search import SAMPLERS

    registries: list[dict] = [METRICS, QUANTIZERS, SAMPLERS]
    with contextlib.suppress(ImportError):
        from quantsearch.export import EXPORT_FORMATS

        registries.append(EXPORT_FORMATS)
    saved = [dict(registry) for registry in registries]
    threads = torch.get_num_threads()
    yield
    for registry, content in zip(registries, saved, strict=True):
        registry.clear()
        registry.update(content)
    torch.set_num_threads(threads)
    _RUNS.clear()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_example(
    block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = compile(block.code, block.id, "exec")  # even a no-run block must be valid Python
    if block.no_run is not None:
        pytest.skip(f"marked no-run in the markdown: {block.no_run or 'no reason given'}")
    run = _RUNS.get(block.page)
    if run is None:
        folder = tmp_path_factory.mktemp(block.page.stem)
        run = _RUNS[block.page] = _PageRun(folder, {"__name__": "__docs__"})
    if run.failed is not None:
        pytest.fail(f"an earlier block of this page failed: {run.failed}")
    # Every earlier block of the page must have run (a -k selection may have left some out).
    ran = run.namespace.setdefault("__ran__", set())
    for earlier in PYTHON_BLOCKS:
        if (
            earlier.page == block.page
            and earlier.line < block.line
            and earlier.no_run is None
            and earlier.id not in ran
        ):
            _execute(earlier, compile(earlier.code, earlier.id, "exec"), run, monkeypatch)
    _execute(block, code, run, monkeypatch)


def _execute(block: Block, code, run: _PageRun, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tracebacks then show the markdown's lines (numbered from the block's first line).
    lines = block.code.splitlines(keepends=True)
    linecache.cache[block.id] = (len(block.code), None, lines, block.id)
    monkeypatch.chdir(run.folder)
    try:
        exec(code, run.namespace)
    except BaseException:
        run.failed = block.id
        raise
    run.namespace.setdefault("__ran__", set()).add(block.id)


# ---------------------------------------------------------------------------------------------
# Command options named in the docs


def _help(*argv: str) -> str | None:
    """``quantsearch ARGV --help`` as printed, or None when the command does not exist."""
    from quantsearch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*argv, "--help"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                return None
    return out.getvalue()


_OPTION = re.compile(r"--[a-z][a-z0-9-]*")
_OPTIONS_CACHE: dict[str, set[str] | None] = {}


def options_of(command: str) -> set[str] | None:
    """The options ``quantsearch COMMAND`` accepts ("" for the top level); None: no command."""
    if command not in _OPTIONS_CACHE:
        text = _help(command) if command else _help()
        _OPTIONS_CACHE[command] = None if text is None else set(_OPTION.findall(text))
    return _OPTIONS_CACHE[command]


def _code_text(page: Path) -> list[tuple[int, str]]:
    """(line, text) of the page's shell blocks and inline code spans, continuations joined."""
    pieces: list[tuple[int, str]] = []
    blocks = fenced_blocks(page)
    for block in blocks:
        if block.lang in ("", "sh", "bash", "shell", "console", "text"):
            joined = block.code.replace("\\\n", " ")
            pieces += [(block.line + i, line) for i, line in enumerate(joined.splitlines())]
    in_block = {b.line + i for b in blocks for i in range(-1, block_len(b) + 1)}
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if number not in in_block:
            pieces += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return pieces


def block_len(block: Block) -> int:
    return block.code.count("\n")


def documented_commands() -> list[tuple[str, int, str, list[str]]]:
    """(page, line, command, options) of every ``quantsearch ...`` invocation in the docs."""
    found = []
    for page in PAGES:
        for line, text in _code_text(page):
            for part in re.split(r"&&|;|\|(?!\|)|#", text):
                words = part.split()
                # The program itself: first on the line (after `time`, `VAR=...`), or `-m`'s.
                while words and (words[0] == "time" or re.fullmatch(r"\w+=\S*", words[0])):
                    words = words[1:]
                if words[:3] == ["python", "-m", "quantsearch"]:
                    words = words[2:]
                if not words or words[0] != "quantsearch":
                    continue
                rest = words[1:]
                if not rest:
                    continue
                if rest[0].startswith("--"):
                    command, options = "", rest
                elif re.fullmatch(r"[a-z][a-z-]*", rest[0]):
                    command, options = rest[0], rest[1:]
                else:  # a placeholder such as COMMAND or ...
                    continue
                flags = [flag for word in options for flag in _OPTION.findall(word)]
                found.append((str(page.relative_to(ROOT)), line, command, flags))
    return found


def test_documented_commands_and_options_exist() -> None:
    commands = documented_commands()
    assert len(commands) >= 20, commands  # the collection works
    wrong = []
    for page, line, command, flags in commands:
        accepted = options_of(command)
        if accepted is None:
            wrong.append(f"{page}:{line}: no command 'quantsearch {command}'")
            continue
        wrong += [
            f"{page}:{line}: 'quantsearch {command}' has no option {flag}"
            for flag in flags
            if flag not in accepted
        ]
    assert not wrong, "\n".join(wrong)


def test_cli_options_table_matches_the_parser() -> None:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    table = text[text.index("## Options") :].split("\n## ", 1)[0]
    all_commands = [
        cmd
        for cmd in re.findall(r"^\| `quantsearch ([a-z]+)", text, flags=re.M)
        if options_of(cmd) is not None
    ]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    assert len(rows) >= 10
    wrong = []
    for row in rows:
        cells = row.replace("\\|", "/").strip("|").split("|")
        option_cell, commands_cell = cells[0].strip(), cells[1].strip()
        option = _OPTION.search(option_cell)[0]
        if commands_cell.startswith("all"):
            commands = [c for c in all_commands if c not in re.findall(r"`(\w+)`", commands_cell)]
        else:
            commands = re.findall(r"`([a-z]+)`", commands_cell)
        assert commands, row
        for command in commands:
            if option not in (options_of(command) or set()):
                wrong.append(f"docs/cli.md: {option} is listed for {command}, which lacks it")
        # ... and no command that has it is missing from the row (for rows naming commands).
        if not commands_cell.startswith("all"):
            wrong += [
                f"docs/cli.md: {option} is an option of {other} too; add it to the row"
                for other in all_commands
                if other not in commands and option in (options_of(other) or set())
            ]
    assert not wrong, "\n".join(wrong)
