"""Per-frame scores and the report without the console (`linewatch run --scores`, `linewatch
report`), `linewatch run --console` as a process, and a worker that picks up a profile's new
references (the console's feedback) without a restart."""

from __future__ import annotations

import json
import re
import shutil
import threading

import cv2
import numpy as np
import pytest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import ScoreMsg, decode
from linewatch.cli import main
from linewatch.synthetic.demo import write_demo_clip
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.profiles import ProfileTable, StreamProfile
from linewatch.workers.worker import ScoringWorker

from helpers import Processes, error_line, http_get, publish, read_all, wait_for

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_demo_clip(tmp_path_factory.mktemp("clip"), seconds=3, fps=5, size=(160, 96), references=3)


def test_run_writes_every_frames_score_and_report_shares_the_result(clip, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(clip.video), "--stream-id", "drone-1", "--out", str(out), "--threshold", "0",
                 "--scores", str(out / "scores.jsonl"), "--references", str(clip.references[0].parent), *TINY])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [row["seq"] for row in lines] == list(range(clip.frame_count))
    first = lines[0]
    assert {"stream", "seq", "time", "ts", "score", "threshold", "anomalous"} <= set(first)
    assert first["stream"] == "drone-1" and first["anomalous"] is True and first["threshold"] == 0.0
    assert first["time"].endswith("Z") and first["latitude"] is not None  # from the clip's SRT
    capsys.readouterr()

    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    [event] = {json.loads(line)["event_id"] for line in (out / "alerts.jsonl").read_text().splitlines()}
    assert event in page and 'aria-label="score timeline"' in page and 'aria-label="flight path"' in page
    assert page.count("data:image/jpeg;base64,") == 2  # the event's overlay and mask, inline
    assert f"{clip.frame_count} frames scored, {clip.frame_count} anomalous" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained

    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "run folder not found" in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither scores.jsonl nor alerts.jsonl" in error_line(capsys)


@pytest.mark.services  # a whole `linewatch run` process
def test_run_console_serves_the_run_and_stays_open_until_stopped(clip, tmp_path):
    processes = Processes(tmp_path)
    out = tmp_path / "out"
    try:
        processes.start("run", "run", str(clip.video), "--stream-id", "drone-1", "--out", str(out), "--threshold", "0",
                        "--console", "--console-port", "0", "--metrics-port", "off", *TINY)
        processes.wait_for_line("run", "the console stays open", 300)
        url = re.search(r"console at (http://\S+/)", processes.log("run")).group(1)
        status, body = http_get(url + "api/events")
        assert status == 200 and [e["status"] for e in json.loads(body)] == ["closed"]
        status, body = http_get(url + "api/config")
        assert json.loads(body)["live"] is True
        processes.stop("run")  # SIGTERM: a clean exit
    finally:
        processes.stop_all()


def test_a_worker_picks_up_new_references_without_a_restart(tiny, tmp_path):
    """Frame X scores high against references that lack it; once X's JPEG lands in the
    references folder (what the console's feedback does), the same worker scores it low."""
    references = tmp_path / "references"
    references.mkdir()
    rng = np.random.default_rng(7)
    for i in range(2):
        cv2.imwrite(str(references / f"ref_{i}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    x = cv2.imencode(".jpg", np.full((64, 64, 3), (40, 160, 220), np.uint8))[1].tobytes()
    profiles = ProfileTable(StreamProfile(references=str(references), threshold=0.5, options={"text_weight": 0}))
    bus = MemoryBus(partitions=1)
    worker = ScoringWorker(bus, tiny, profiles, AnchorCache(None, folder=None), max_batch=1, reload_s=0)
    worker.prepare_all()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()

    def scores() -> list[float]:
        return [decode(r.value, ScoreMsg).image_score for r in read_all(bus, bus.topics.scores)]

    try:
        publish(bus, "cam", 0, value=x)
        wait_for(lambda: len(scores()) == 1, 60, "the first score")
        (references / "feedback-cam-none-000000.jpg").write_bytes(x)
        publish(bus, "cam", 1, value=x)
        wait_for(lambda: len(scores()) == 2, 60, "the second score")
    finally:
        stop.set()
        thread.join(30)
    before, after = scores()
    assert after < before / 4, (before, after)
    assert len(worker.prepared) == 1


def test_a_reference_folder_that_breaks_keeps_the_previous_profile(tiny, tmp_path, caplog):
    references = tmp_path / "references"
    references.mkdir()
    cv2.imwrite(str(references / "ref_0.png"), np.full((64, 64, 3), 128, np.uint8))
    profiles = ProfileTable(StreamProfile(references=str(references), threshold=0.5, options={"text_weight": 0}))
    worker = ScoringWorker(MemoryBus(), tiny, profiles, AnchorCache(None, folder=None), reload_s=0)
    worker.prepare_all()
    prepared = worker._prepared(profiles.default)
    shutil.rmtree(references)  # the volume went away
    assert worker._prepared(profiles.default) is prepared
    assert "cannot be read" in caplog.text
