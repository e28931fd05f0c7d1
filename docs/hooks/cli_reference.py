"""MkDocs hook: renders docs/cli.md's reference from linewatch's own argparse parsers at build
time, so the page can never drift from ``linewatch <command> --help`` (tests/test_docs.py
compares the two)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

MARKER = "<!-- cli-reference: generated at build time by docs/hooks/cli_reference.py -->"
COLUMNS = "100"  # argparse wraps help to the terminal's width; the reference and the test fix it


def commands(parser: argparse.ArgumentParser | None = None,
             path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command and subcommand with its parser, depth first: (), ('eval',), ('sink', 'alerts'), ..."""
    if parser is None:
        from linewatch.cli import build_parser

        parser = build_parser()
    yield path, parser
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def help_text(parser: argparse.ArgumentParser) -> str:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        return parser.format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def render() -> str:
    parts = []
    for path, parser in commands():
        title = " ".join(("linewatch", *path))
        level = "#" * min(2 + max(len(path) - 1, 0), 4)
        summary = next((a.help for a in _parent_choices(path) if a.dest == path[-1]), None) if path else None
        parts += [f"{level} `{title}`", ""]
        if summary:
            parts += [summary[0].upper() + summary[1:] + ".", ""]
        parts += ["```text", help_text(parser).rstrip(), "```", ""]
    return "\n".join(parts)


def _parent_choices(path: tuple[str, ...]) -> list:
    """The subparsers action's pseudo-actions (name and one-line help) of the command's parent."""
    parents = dict(commands())
    parent = parents[path[:-1]]
    for action in parent._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action._choices_actions)
    return []


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/cli.md lost its marker line: {MARKER}")
    return markdown.replace(MARKER, render())
