"""The safe, bounded YAML reader of space files: YAML 1.2 numbers, size and nesting limits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from quantsearch.search._errors import SpaceError

__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_SPACE_BYTES", "load_yaml", "read_yaml_file"]

# What a space file may hold: a space is a few kilobytes; these stop a file that would take
# unbounded time or memory (a device, an alias bomb, thousands of nested brackets).
MAX_SPACE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000


def read_yaml_file(path: Path) -> Any:
    """The YAML data of the file ``path``; SpaceError (naming the file) when it is missing,
    unreadable, past the limits or not YAML."""
    source = str(path)
    try:
        # Read one byte past the limit, never more: the path may be /dev/zero or a pipe.
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPACE_BYTES + 1)
    except FileNotFoundError:
        raise SpaceError("no such file", source=source) from None
    except IsADirectoryError:
        raise SpaceError("is a folder, expected a YAML file", source=source) from None
    except OSError as error:
        raise SpaceError(f"cannot be read ({error})", source=source) from None
    if len(raw) > MAX_SPACE_BYTES:
        raise SpaceError(
            f"is larger than {MAX_SPACE_BYTES} bytes; a search space is a small YAML file",
            source=source,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpaceError(f"cannot be read ({error})", source=source) from None
    try:
        return load_yaml(text)
    except _TooLarge as error:
        raise SpaceError(f"too large: {error}", source=source) from None
    except yaml.reader.ReaderError as error:
        # A NUL or control byte: said where it is, on one line, the byte shown escaped.
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        char = error.character
        shown = repr(chr(char) if isinstance(char, int) else char)
        raise SpaceError(
            f"not valid YAML: line {line}, column {column}: the control character {shown} is "
            "not allowed",
            source=source,
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        # Never more than one line: the CLI prints an error as one.
        problem = " ".join(problem.split())
        raise SpaceError(f"not valid YAML: {where}{problem}", source=source) from None


class _TooLarge(Exception):
    """A YAML document past MAX_DEPTH levels or MAX_NODES nodes (aliases expanded)."""


def load_yaml(text: str) -> Any:
    """The YAML data of ``text``, refused (an exception naming the limit) past the depth and
    node limits; ``yaml.YAMLError`` when it is not YAML."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expanded(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand past MAX_NODES nodes or MAX_DEPTH levels.

    Aliases share nodes, so the graph is small while its expansion (what every later walk of
    the data visits) may be exponential: sizes and depths are summed per distinct node.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) once expanded
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        children = _children(node)
        if expanded:
            on_path.discard(key)
            done = [sizes[id(child)] for child in children]
            count = 1 + sum(c for c, _ in done)
            depth = 1 + max((d for _, d in done), default=0)
            if count > MAX_NODES:
                raise _TooLarge(f"more than {MAX_NODES} values once its aliases are expanded")
            if depth > MAX_DEPTH:
                raise _TooLarge(f"nested deeper than {MAX_DEPTH} levels")
            sizes[key] = (count, depth)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _TooLarge("an alias refers to a value that contains it (endless nesting)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.2) instead of a string.

    Composing is recursive: nesting past MAX_DEPTH is refused before Python's stack runs out.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooLarge(
                    f"nested deeper than {MAX_DEPTH} levels "
                    f"(line {mark.line + 1}, column {mark.column + 1})"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
