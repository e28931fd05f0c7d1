"""The `linewatch` command: the only argparse code. Imports everything below it, and nothing
imports it. User mistakes end with one clear line, never a traceback (nor argparse's usage
block, nor a library's log lines before it); `--help` loads no torch. Every line it writes to
stderr — log lines and the error line — has its secrets redacted (``bus.redact``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

from .. import __version__
from ..bus.redact import redact
from . import bench, console, offline, pipeline

DESCRIPTION = "Streaming anomaly inspection for power-line camera and drone video."


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one ``linewatch: error:`` line that points to --help."""

    def error(self, message: str):
        self.exit(2, f"linewatch: error: {redact(message)} (see `{self.prog} --help`)\n")


def setup_logging() -> None:
    """Until a command configures its own (``ops`` settings): WARNING and above to stderr,
    timestamped and redacted; libraries' chatter off; FFmpeg's own lines off."""
    from ..ops.logs import setup_logging as configure

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read when cv2 first uses FFmpeg
    configure("text", "warning", redact=redact)


@contextlib.contextmanager
def _signal_handlers_restored():
    """Long-running commands turn SIGINT/SIGTERM into a stop event; the process gets its own
    handlers back when the command returns, so a later Ctrl-C (or a second command run in the
    same process) is not swallowed by a stale event."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="linewatch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    offline.add_parsers(commands)
    pipeline.add_parsers(commands)
    bench.add_parser(commands)
    console.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    handlers = {**offline.HANDLERS, **pipeline.HANDLERS, **console.HANDLERS, "bench": bench.run}
    from ..bus import BusError
    from ..bus.outages import StopRequested
    from ..offline.datasets import DatasetError
    from ..scoring.backbone import BackboneError

    try:
        with _signal_handlers_restored():
            handlers[args.command](args)
    except StopRequested as err:  # a signal during an outage, before a part could finish
        print(f"linewatch: stopped: {redact(err)}", file=sys.stderr)
        return 0
    except (BackboneError, DatasetError, BusError, ValueError, OSError) as err:  # OSError: paths, permissions
        print(f"linewatch: error: {redact(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linewatch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
