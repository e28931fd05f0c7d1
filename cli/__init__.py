"""The `linewatch` command: the only argparse code. Imports everything below it, and nothing
imports it. User mistakes end with one clear line, never a traceback; `--help` loads no torch."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, console, offline, pipeline

DESCRIPTION = "Streaming anomaly inspection for power-line camera and drone video."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linewatch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    offline.add_parsers(commands)
    pipeline.add_parsers(commands)
    bench.add_parser(commands)
    console.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {**offline.HANDLERS, **pipeline.HANDLERS, **console.HANDLERS, "bench": bench.run}
    from ..bus import BusError
    from ..offline.datasets import DatasetError
    from ..scoring.backbone import BackboneError

    try:
        handlers[args.command](args)
    except (BackboneError, DatasetError, BusError, ValueError, OSError) as err:  # OSError: paths, permissions
        print(f"linewatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linewatch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
