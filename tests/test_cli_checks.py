"""The CLI refuses what it can before any model is loaded, and a one-shot `run` does not trip
over another process's metrics port."""

from __future__ import annotations

import contextlib
import json
import re
import socket

import pytest

from linewatch.cli import main
from linewatch.ingest.demo import write_demo_clip

from helpers import error_line

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]
DEFAULT_METRICS_PORT = 9400


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_demo_clip(tmp_path_factory.mktemp("clip"), seconds=1, fps=5, size=(160, 96), references=3)


@contextlib.contextmanager
def held(port: int):
    """A real listening socket on ``port`` (if another process already holds it, that is the
    same situation: the port is taken)."""
    with socket.socket() as sock:
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            sock.listen()
        yield


def test_run_takes_a_free_port_when_the_default_one_is_taken(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LINEWATCH_OPS__PORT")  # the tests' any-free-port: here the default is the point
    with held(DEFAULT_METRICS_PORT):
        code = main(["run", str(clip.video), "--out", str(tmp_path / "out"), "--threshold", "0", *TINY])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"port {DEFAULT_METRICS_PORT} is taken" in err and "metrics and health on http://127.0.0.1:" in err


def test_run_refuses_a_taken_port_it_was_asked_for(clip, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["run", str(clip.video), "--out", str(tmp_path / "out"), "--metrics-port", str(port), *TINY])
    assert code == 2
    assert f"cannot serve metrics and health on 127.0.0.1:{port}" in error_line(capsys)


def test_the_report_names_its_streams_and_span_and_reads_reviews_as_words(clip, tmp_path, capsys):
    from linewatch.console.store import ConsoleStore

    out = tmp_path / "out"
    assert main(["run", str(clip.video), "--stream-id", "drone-1", "--out", str(out), "--threshold", "0",
                 "--scores", str(out / "scores.jsonl"), "--metrics-port", "off", *TINY]) == 0
    [event] = {json.loads(line)["event_id"] for line in (out / "alerts.jsonl").read_text().splitlines()}
    ConsoleStore(out / "archive" / "index.sqlite").review(event, "false_alarm", "")
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    first, last = (json.loads(line)["time"] for line in (out / "scores.jsonl").read_text().splitlines()[::clip.frame_count - 1])
    title = re.search(r"<title>(.*)</title>", page).group(1)
    assert title == f"linewatch report: drone-1, {first[:10]} {first[11:19]} to {last[11:19]} UTC", title
    assert "<td>false alarm</td>" in page and "false_alarm" not in page
