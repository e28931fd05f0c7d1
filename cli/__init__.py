"""The `linewatch` command: the only argparse code. Imports everything below it, and nothing
imports it. User mistakes end with one clear line, never a traceback (nor argparse's usage
block, nor a library's log lines before it); `--help` loads no torch. Every line it writes to
stderr — log lines and the error line — has its secrets redacted (``bus.redact``)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import signal
import sys
import threading

from .. import __version__
from ..bus.redact import redact
from . import bench, console, offline, pipeline

DESCRIPTION = "Streaming anomaly inspection for power-line camera and drone video."


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one ``linewatch: error:`` line that points to the
    --help of the command it was made in, with a guess at what was meant."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            message += _did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        self.exit(2, f"linewatch: error: {redact(message)} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        """argparse lets the top parser report a subcommand's unknown flags (pointing to the top
        --help); here the command that got them reports them, with the flag it probably meant."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = _command_parser(self, parsed)
            flag = next((extra for extra in extras if extra.startswith("-")), extras[0])
            known = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
            guess = _did_you_mean(flag.split("=", 1)[0], known) if flag.startswith("-") else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{guess}")
        return parsed


def _did_you_mean(given: str, known: list[str]) -> str:
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _command_parser(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)command parser that ``parsed`` went through (`linewatch sink alerts`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(parsed, action.dest, None)
            if chosen in action.choices:
                return _command_parser(action.choices[chosen], parsed)
    return parser


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="one of these; `linewatch COMMAND --help` explains each")
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

    try:
        with _signal_handlers_restored():
            handlers[args.command](args)
    except BrokenPipeError:  # `linewatch methods | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except StopRequested as err:  # a signal during an outage, before a part could finish
        print(f"linewatch: stopped: {redact(err)}", file=sys.stderr)
        return 0
    except (BusError, ValueError, OSError) as err:  # also BackboneError, DatasetError (ValueErrors); OSError: paths
        print(f"linewatch: error: {redact(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linewatch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
