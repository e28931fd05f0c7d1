"""The shell blocks of the README and the docs pages, with the marker before each: the tour's
test runs the runnable ones, the docs lint checks every one is marked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(`{3,})(\S*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!-- (runnable(?:: (?P<tag>[\w-]+))?|not-runnable: (?P<why>.+?)) -->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    runnable: bool
    tag: str | None  # runnable: how to run it ("console": a server the test starts and stops)
    why: str | None  # not runnable: the reason given
    marked: bool

    def commands(self) -> list[str]:
        """One line per command: continuations joined, comments and blank lines left out."""
        joined = re.sub(r"\\\n\s*", " ", self.body)
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path, shell_only: bool = True) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        lang = match.group(2).lower()
        if shell_only and lang not in SHELL:
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        out.append(Block(path, text.count("\n", 0, match.start()) + 1, lang, match.group(3),
                         runnable=bool(marker and marker.group(1).startswith("runnable")),
                         tag=marker.group("tag") if marker else None, why=marker.group("why") if marker else None,
                         marked=marker is not None))
    return out
