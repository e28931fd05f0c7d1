"""The README's 10-minute tour, run as written: every block marked ``<!-- runnable -->``, in
order, with the real ``linewatch`` command, in a temporary copy of the repository's tracked
files (a fresh clone), checking what the text promises. getting-started.md carries the same
tour; a test here keeps the two identical, block for block.

``LINEWATCH_QUICKSTART`` (documented in docs/getting-started.md, "The tour is a test") is the
only way the commands may change: ``quick`` (default) gives the training the tiny architecture
and one short epoch; ``full`` runs them exactly as written. The demo itself always runs as
written: with half its frames (``--fps 5``) the same poses score the same but the defect's
frames no longer reach k = 3 of n = 10 above the threshold, and no event is raised."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from docblocks import ROOT, Block, blocks

pytestmark = pytest.mark.services  # whole linewatch processes, minutes

MODE = os.environ.get("LINEWATCH_QUICKSTART", "quick")
# quick mode: (what a command line starts with, exactly) -> what is appended to it
QUICK = {"linewatch train ": " --arch linewatch-tiny --epochs 1 --views 1"}
LINEWATCH = Path(sys.executable).parent / "linewatch"


def tour(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.runnable]


def test_getting_started_runs_the_readmes_tour():
    readme, page = tour(ROOT / "README.md"), tour(ROOT / "docs" / "getting-started.md")
    assert readme, "the README marks no runnable block"
    assert [(b.tag, b.commands()) for b in page] == [(b.tag, b.commands()) for b in readme]


def script(block: Block, applied: set[str]) -> str:
    lines = []
    for command in block.commands():
        if MODE == "quick":
            for start, extra in QUICK.items():
                if command == start or (start.endswith(" ") and command.startswith(start)):
                    command += extra
                    applied.add(start)
        lines.append(command)
    return "\n".join(lines)


def fresh_clone(dest: Path) -> None:
    """The tracked files only: no .venv, no runs/, no build output."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True)
    if listed.returncode != 0:  # not a git checkout (a source archive): what is there, less the ignored outputs
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "site", "__pycache__"))
        return
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def test_the_readme_tour_does_what_it_says(tmp_path):
    assert MODE in ("quick", "full"), f"LINEWATCH_QUICKSTART is quick or full, not {MODE!r}"
    assert LINEWATCH.exists(), f"no linewatch command beside {sys.executable}"
    clone = tmp_path / "linewatch"
    clone.mkdir()
    fresh_clone(clone)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}  # a user's fresh shell
    env.update(PATH=f"{LINEWATCH.parent}{os.pathsep}{env.get('PATH', '')}", NO_COLOR="1",
               LINEWATCH_CONSOLE__PORT="0",  # the console on any free port (it logs its URL), not 8400
               LINEWATCH_OPS__PORT="0",  # each command's metrics on any free port: tests run side by side
               LINEWATCH_SHARED=str(tmp_path / "no-shared"))  # a fresh clone: no ../shared, the demo's own background
    applied: set[str] = set()
    outputs = []
    for block in tour(ROOT / "README.md"):
        text = script(block, applied)
        if block.tag == "console":
            check_console(text, clone, env, outputs[0])
            continue
        assert block.tag is None, f"{block.where()}: unknown runnable tag {block.tag!r}"
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=3600)
        assert done.returncode == 0, f"{block.where()} failed:\n{text}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    if MODE == "quick":
        assert applied == set(QUICK), f"quick mode found no command starting {sorted(set(QUICK) - applied)}"

    # 1. the demo: one event on drone-1 inside the defect's frames, as open and as closed
    first, last = map(int, re.search(r"defect frames: (\d+)\.\.(\d+)", outputs[0]).groups())
    alerts = [json.loads(line) for line in (clone / "runs/demo/out/alerts.jsonl").read_text().splitlines()]
    assert {a["status"] for a in alerts} == {"open", "closed"} and len({a["event_id"] for a in alerts}) == 1, alerts
    closed = next(a for a in alerts if a["status"] == "closed")
    assert closed["stream"] == "drone-1" and first <= closed["peak_seq"] <= last, (closed, first, last)
    # 3. the report
    report = clone / "runs/demo/out/report.html"
    assert report.is_file() and "drone-1" in report.read_text()
    # 4. and 5. the checkpoint, and the run that used it
    assert (clone / "runs/aprilgan.safetensors").is_file()
    assert (clone / "runs/trained/alerts.jsonl").is_file()


def check_console(command: str, clone: Path, env: dict, demo_output: str) -> None:
    """2. the console on the demo's archive lists the demo's event (its HTTP API, as the page reads it)."""
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url, seen = None, []
        for line in proc.stdout:  # "console at http://127.0.0.1:PORT ..." once it listens (port 0: its own)
            seen.append(line)
            if found := re.search(r"console at (http://[^\s/]+)", line):
                url = found[1]
                break
        assert url, f"the console exited {proc.wait()} without saying where it listens:\n{''.join(seen)[-3000:]}"
        deadline = time.monotonic() + 300  # a liveness bound: it starts in seconds on an idle machine
        events = None
        while not events:
            assert proc.poll() is None, f"the console exited {proc.returncode}"
            assert time.monotonic() < deadline, "the console never listed an event"
            events = get_json(f"{url}/api/events")
            if not events:
                time.sleep(0.5)
        first, last = map(int, re.search(r"defect frames: (\d+)\.\.(\d+)", demo_output).groups())
        assert [(e["stream"], e["status"]) for e in events] == [("drone-1", "closed")], events
        assert first <= events[0]["peak_seq"] <= last, events
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as the tour says
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
