"""Per-stream settings: a default and first-match glob patterns over stream ids.

The one lookup behind both the workers' scoring profiles and the sinks' alert policies:
patterns are tried in the order written, the first that matches a stream id wins, and a
stream no pattern matches gets the default.
"""

from __future__ import annotations

import fnmatch
from typing import Generic, TypeVar

T = TypeVar("T")


class StreamTable(Generic[T]):
    def __init__(self, default: T, patterns: dict[str, T] | None = None):
        self.default = default
        self.patterns = list((patterns or {}).items())

    def for_stream(self, stream: str) -> T:
        return next((value for pattern, value in self.patterns if fnmatch.fnmatchcase(stream, pattern)), self.default)

    __call__ = for_stream

    def values(self) -> list[T]:
        """The default, then each pattern's value in order."""
        return [self.default] + [value for _, value in self.patterns]
