"""The error a search space raises for a user mistake."""

from __future__ import annotations


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
        parts = [part for part in (self.source, self.key) if part]
        return ": ".join([*parts, self.detail])

    def with_source(self, source: str) -> SpaceError:
        """The same error, attributed to ``source`` (a file name) when it has none yet."""
        if self.source is not None:
            return self
        return SpaceError(self.detail, key=self.key, source=source)
