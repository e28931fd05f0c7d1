"""A `linewatch run` without `--console` still records its events in the archive's index, so
`linewatch console --archive DIR` shows them later (the tour's step 2)."""

from __future__ import annotations

import json

from linewatch.cli import main
from linewatch.console.store import ConsoleStore
from linewatch.synthetic.demo import write_demo_clip

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]


def test_a_run_without_console_records_its_events_for_the_console(tmp_path, capsys):
    clip = write_demo_clip(tmp_path / "clip", seconds=3, fps=5, size=(160, 96), references=2)
    out = tmp_path / "out"
    code = main(["run", str(clip.video), "--stream-id", "drone-1", "--out", str(out), "--threshold", "0",
                 "--references", str(clip.references[0].parent), "--metrics-port", "0", *TINY])
    assert code == 0, capsys.readouterr().err
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    [event_id] = {a["event_id"] for a in alerts}
    store = ConsoleStore(out / "archive" / "index.sqlite")  # what `linewatch console --archive` reads
    try:
        events = store.events()
    finally:
        store.close()
    assert [(e["event_id"], e["stream"], e["status"]) for e in events] == [(event_id, "drone-1", "closed")]
