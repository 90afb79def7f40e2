"""The error a search space raises for a user mistake."""

from __future__ import annotations

import reprlib

__all__ = ["SpaceError", "shown"]

# Longest message detail shown whole: a value pasted into a space may be megabytes.
MAX_DETAIL = 400
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = 8


def shown(value: object) -> str:
    """``repr(value)``, shortened (``...``) so that a huge value never fills a message."""
    return _REPR.repr(value)


def _cut(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` with its middle cut out past ``limit`` (its end says what is allowed)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ...({len(text) - 2 * half} characters cut)... {text[-half:]}"


class SpaceError(ValueError):
    """A search space that cannot be used.

    The message names the file, the key path (``params.quant_bits._type``), the bad value and
    what is allowed. Code that parses a fragment raises it without a file; the loader adds it.
    """

    def __init__(self, detail: str, *, key: str | None = None, source: str | None = None) -> None:
        self.detail = detail
        self.key = key
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [_cut(part, 200) for part in (self.source, self.key) if part]
        return ": ".join([*parts, _cut(self.detail)])

    def with_source(self, source: str) -> SpaceError:
        """The same error, attributed to ``source`` (a file name) when it has none yet."""
        if self.source is not None:
            return self
        return SpaceError(self.detail, key=self.key, source=source)
