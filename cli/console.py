"""The console commands: ``linewatch console`` (the operator's web console) and ``linewatch
report`` (a run folder as one self-contained HTML file)."""

from __future__ import annotations

import argparse

from . import args as a
from .pipeline import S, _bus, _operations, _settings, _stop_on_signals, add_common, add_ops


def add_parsers(commands) -> None:
    console = commands.add_parser(
        "console", help="the operator's web console: live streams, alerts and review, flight map, replay compare",
        description="Serve the console on http://127.0.0.1:8400/. With Kafka (--bootstrap-servers) it shows the "
                    "live scores and alerts; with --archive, each event's frames, and it keeps reviews and flight "
                    "tracks in the archive's index. Bound beyond loopback it needs LINEWATCH_CONSOLE__TOKEN.")
    add_common(console)
    console.add_argument("--archive", dest="archive", default=S, help="the archive: folder or s3://bucket/prefix")
    console.add_argument("--host", dest="console.host", default=S,
                         help="address to listen on (default 127.0.0.1; any other needs the token)")
    console.add_argument("--port", dest="console.port", type=a.port, default=S,
                         help="port (default 8400; 0: any free port, logged)")
    console.add_argument("--tile-url", dest="console.tile_url", default=S, metavar="URL",
                         help="map tiles, e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png (the default); "
                              "'none': a plain background")
    console.add_argument("--references", dest="profile.references", default=S,
                         help="the default profile's references folder (where a false alarm's frames can go)")
    console.add_argument("--calibration", dest="profile.calibration", default=S,
                         help="the default profile's calibration folder")
    add_ops(console)
    a.metavars(console)

    report = commands.add_parser("report", help="write a run's result as one self-contained HTML file",
                                 description="Read RUN_DIR (as `linewatch run --out RUN_DIR --scores "
                                             "RUN_DIR/scores.jsonl` leaves it: scores.jsonl, alerts.jsonl, archive/) "
                                             "and write RUN_DIR/report.html: score timelines, events, their overlays.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (`linewatch run --out`)")
    report.add_argument("--out", default=None, help="the HTML file (default RUN_DIR/report.html)")


def run_console(args: argparse.Namespace) -> None:
    from ..console.service import serve

    settings = _settings(args)
    with _operations(settings, *(["bus"] if settings.bootstrap_servers else [])):
        bus = policy_for = None
        stop = _stop_on_signals()
        if settings.bootstrap_servers:
            from ..pipeline.wiring import policy_table

            policy_for = policy_table(settings)
            bus = _bus(settings, "console", stop)
        elif not settings.archive:
            raise ValueError("the console needs something to show: --bootstrap-servers (live) and/or --archive")
        server = serve(settings, bus, policy_for)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.stop()


def run_report(args: argparse.Namespace) -> None:
    from ..console.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report: {path}")


HANDLERS = {"console": run_console, "report": run_report}
