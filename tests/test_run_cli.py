"""`linewatch run` (the embedded pipeline) and the pipeline commands' handling of user mistakes:
one `linewatch: error:` line and exit 2, never a traceback."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from linewatch.cli import main
from linewatch.synthetic.demo import write_demo_clip

from helpers import error_line, make_category, wait_for

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_demo_clip(tmp_path_factory.mktemp("clip"), seconds=3, fps=5, size=(160, 96), references=3)


def test_run_writes_alerts_and_masks(clip, tmp_path, capsys):
    out = tmp_path / "out"
    # threshold 0: every frame is anomalous, so the whole clip is one event and every mask is archived
    code = main(["run", str(clip.video), "--stream-id", "drone-1", "--out", str(out), "--threshold", "0",
                 "--references", str(clip.references[0].parent), *TINY])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"{clip.frame_count} frames scored" in printed
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    assert [a["status"] for a in alerts] == ["open", "closed"]
    assert alerts[0]["event_id"] == alerts[1]["event_id"]
    assert alerts[0]["event_id"].startswith("drone-1@") and alerts[0]["event_id"].endswith(":0")
    assert alerts[1]["frames"] == list(range(clip.frame_count))
    assert alerts[1]["telemetry"]["latitude"] is not None  # from the clip's SRT sidecar
    with sqlite3.connect(out / "archive" / "index.sqlite") as db:
        rows = db.execute("SELECT seq FROM frames WHERE stream = 'drone-1' ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == list(range(clip.frame_count))
    assert len(list((out / "archive").rglob("*mask.png"))) == clip.frame_count


SLOW_S = 6.0  # longer than the 5 s of silence after which the sink used to end an event by its own clock


@pytest.mark.services  # seconds of injected slowness
def test_slow_scoring_does_not_split_the_demos_event(clip, tmp_path, capsys, monkeypatch):
    """The demo clip with a worker that stalls for SLOW_S seconds mid-event (a busy machine),
    once the sink has opened the event and caught up. The event ends on the file's end
    marker, by capture time: still one event, all frames (threshold 0: every frame anomalous)."""
    from linewatch.workers.worker import ScoringWorker

    out = tmp_path / "out"
    real_finish, stalled = ScoringWorker.finish, []

    def finish(self, batch, producer):
        real_finish(self, batch, producer)
        if not stalled and self.stats.frames >= 3:  # k = 3 anomalous frames scored: the sink can open the event
            stalled.append(True)
            wait_for(lambda: "open" in (out / "alerts.jsonl").read_text() if (out / "alerts.jsonl").exists() else False,
                     what="the sink to open the event")
            time.sleep(SLOW_S)  # the injected slowness, not a synchronisation

    monkeypatch.setattr(ScoringWorker, "finish", finish)
    code = main(["run", str(clip.video), "--stream-id", "drone-1", "--out", str(out), "--threshold", "0",
                 "--k", "3", "--n", "10", "--max-batch", "4", *TINY])
    assert code == 0, capsys.readouterr().err
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    assert [a["status"] for a in alerts] == ["open", "closed"] and len({a["event_id"] for a in alerts}) == 1
    assert alerts[1]["frames"] == list(range(clip.frame_count))


def test_ctrl_c_scores_what_was_read_and_stops(tmp_path, capsys, monkeypatch):
    """Ctrl-C (here: an interrupt of the main thread, where the worker scores, as soon as the
    first mask is archived) stops reading; every frame read before it is still scored and
    archived, and the command exits 130."""
    import _thread
    import threading

    from linewatch.pipeline import embedded

    published = []

    def counted_ingest(*args, **kwargs):  # the real ingest; the test only notes what it published
        stats = real_ingest(*args, **kwargs)
        published.append(sum(s.published for s in stats))
        return stats

    real_ingest = embedded.run_ingest
    monkeypatch.setattr(embedded, "run_ingest", counted_ingest)
    clip = write_demo_clip(tmp_path / "long", seconds=20, fps=5, size=(160, 96), references=0)
    out = tmp_path / "out"
    done = threading.Event()

    def interrupt_at_first_mask():
        while not done.is_set():
            if any((out / "archive").rglob("*mask.png")):
                _thread.interrupt_main()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_at_first_mask, daemon=True)
    watcher.start()
    try:
        code = main(["run", str(clip.video), "--stream-id", "d", "--out", str(out), "--threshold", "0",
                     "--realtime", *TINY])
    finally:
        done.set()
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    with sqlite3.connect(out / "archive" / "index.sqlite") as db:
        seqs = [r[0] for r in db.execute("SELECT seq FROM frames ORDER BY seq")]
    assert published and seqs == list(range(published[0]))  # every frame read was scored and archived
    assert published[0] < clip.frame_count  # reading stopped (the clip takes 20 s at recorded speed)


def test_runs_are_sessions_kept_apart(clip, tmp_path, capsys):
    """Ingesting the same file twice is two sessions (seq restarts at 0): two archive folders,
    nothing of the first run overwritten or taken for a duplicate; each run's alerts file holds
    that run's event only (re-running the demo printed the previous runs' alerts too)."""
    args = ["run", str(clip.video), "--stream-id", "d", "--out", str(tmp_path), "--threshold", "0", *TINY]
    event_ids = []
    for _ in range(2):
        assert main(args) == 0
        alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
        assert [a["status"] for a in alerts] == ["open", "closed"]
        event_ids.append(alerts[0]["event_id"])
    assert event_ids[0] != event_ids[1]
    with sqlite3.connect(tmp_path / "archive" / "index.sqlite") as db:
        sessions = db.execute("SELECT session, COUNT(*) FROM frames GROUP BY session").fetchall()
    assert len(sessions) == 2 and all(count == clip.frame_count for _, count in sessions)


@pytest.mark.parametrize("args, message", [
    (["run", "/no/such/clip.mp4"], "no such file"),
    (["run", "{text}"], "cannot read video"),
    (["run", "{video}", "--method", "nope"], "unknown method 'nope'"),
    (["run", "{video}", "--references", "/no/such/refs"], "references folder not found"),
    (["run", "{video}", "--k", "5", "--n", "3"], "k=5 must not exceed n=3"),
    (["run", "{video}", "--config", "/no/such.yaml"], "config file not found"),
    (["run", "{video}", "--config", "{bad_yaml}"], "not valid YAML"),
    (["run", "{video}", "--config", "{list_yaml}"], "list_yaml.yaml holds a YAML list"),
    (["run", "{video}", "--config", "{binary_yaml}"], "binary.yaml is not text"),
    (["run", "{notes}"], "notes.txt is not a video or an image"),
    (["run", "{video}", "--out", "{text}"], "notes.mp4"),
    (["run", "{video}", "--stream-id", "a/b"], "stream id"),
    (["worker"], "no Kafka given"),
    (["worker", "--bootstrap-servers", "127.0.0.1:1"], "cannot reach Kafka at 127.0.0.1:1"),
    (["sink", "archive", "--bootstrap-servers", "127.0.0.1:1"], "needs --archive"),
    (["replay", "--bootstrap-servers", "127.0.0.1:1", "--from-offset", "5", "--to-offset", "2"], "must be above"),
])
def test_user_mistakes_get_one_line(args, message, clip, tmp_path, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("worker: {max_batch: [\n")
    (tmp_path / "list_yaml.yaml").write_text("- worker\n- max_batch\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    notes = tmp_path / "notes.txt"  # FFmpeg renders a text file as a video: it must not get there
    notes.write_text("Inspection notes\n" * 500)
    args = [a.format(text=text, video=clip.video, bad_yaml=bad_yaml, list_yaml=tmp_path / "list_yaml.yaml",
                     binary_yaml=tmp_path / "binary.yaml", notes=notes) for a in args]
    assert main([*args, *TINY] if args[0] == "run" else args) == 2
    assert message in error_line(capsys)


def test_demo_command(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "d"), "--seconds", "2", "--fps", "5"]) == 0
    assert "defect frames" in capsys.readouterr().out
    assert (tmp_path / "d" / "clip.mp4").is_file() and list((tmp_path / "d" / "references").glob("*.png"))


def test_ctrl_c_ends_a_run_with_its_frames_scored_and_events_closed(tmp_path):
    import signal
    import subprocess
    import sys

    clip = write_demo_clip(tmp_path / "long", seconds=30, fps=5, size=(160, 96), references=2)  # 30 s at --realtime
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "linewatch", "run", str(clip.video), "--stream-id", "live",
                            "--realtime", "--threshold", "0", "--out", str(out), *TINY],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "alerts.jsonl"
    for _ in range(600):  # until the first alert opens: frames are flowing
        if log.is_file() and log.read_text():
            break
        assert run.poll() is None, run.communicate()
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err
    alerts = [json.loads(line) for line in log.read_text().splitlines()]
    assert [a["status"] for a in alerts] == ["open", "closed"]  # the open event was closed, not dropped
    assert 0 < len(alerts[1]["frames"]) < clip.frame_count  # stopped part-way, every frame read was scored
    assert alerts[1]["frames"] == list(range(len(alerts[1]["frames"])))


@pytest.mark.parametrize("method", ["aa-clip", "core-clip"])
def test_run_with_a_trained_checkpoint_takes_its_backbone(method, clip, tmp_path, capsys):
    """`linewatch train` then `linewatch run --checkpoint`: no backbone flags needed; the
    scores name the checkpoint; a clashing backbone flag is one clear error line."""
    
    data = make_category(tmp_path / "data", "widget", seed=1)
    checkpoint = tmp_path / "widget.safetensors"
    assert main(["train", "--method", method, "--data", str(data), "--arch", "linewatch-tiny", "--epochs", "1",
                 "--shots", "2", "--views", "1", "--out", str(checkpoint)]) == 0
    out = tmp_path / "out"
    assert main(["run", str(clip.video), "--stream-id", "d", "--out", str(out), "--threshold", "0",
                 "--checkpoint", str(checkpoint), "--class", "widget"]) == 0, capsys.readouterr().err
    assert f"{clip.frame_count} frames scored" in capsys.readouterr().out
    assert len(list((out / "archive").rglob("*mask.png"))) == clip.frame_count
    assert main(["run", str(clip.video), "--out", str(tmp_path / "o2"), "--checkpoint", str(checkpoint),
                 "--image-size", "96"]) == 2
    assert "trained differently: --image-size 96 (checkpoint: 64)" in error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["run"], "the following arguments are required: SOURCE (see `linewatch run --help`)"),
    (["run", "x.mp4", "--k", "abc"], "argument --k: invalid int value: 'abc' (see `linewatch run --help`)"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_argument_mistakes_are_one_line_pointing_to_help(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in error_line_of(err), err  # no usage block before it


def error_line_of(err: str) -> str:
    (line,) = err.splitlines()
    assert line.startswith("linewatch: error: ")
    return line


def test_a_broken_video_gets_linewatch_s_line_alone(tmp_path):
    """FFmpeg's own log lines ('moov atom not found') no longer precede the error line."""
    import subprocess
    import sys

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    result = subprocess.run([sys.executable, "-m", "linewatch", "run", str(broken), *TINY], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2
    expected = f"linewatch: error: cannot read video {broken}: not a video OpenCV can decode"
    assert result.stderr.splitlines() == [expected], result.stderr


def test_an_unreachable_pretrained_tag_is_one_line(capsys, monkeypatch):
    """open_clip's download retries (about 45 lines of huggingface_hub and root warnings) are
    not shown; the error line says what failed."""
    import logging

    import open_clip

    def offline(arch, pretrained=None, **kwargs):
        for attempt in range(5):
            logging.getLogger("huggingface_hub.utils._http").warning(
                "'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x")
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in %ds [Retry %d/5].", 2 ** attempt,
                                                                     attempt + 1)
        logging.getLogger().error("Failed to download weights for tag 'openai': no connection")
        raise RuntimeError("Failed to download weights for tag 'openai': An error happened while trying to "
                           "locate the file on the Hub " + "and more detail " * 30)

    from linewatch.cli import setup_logging
    from linewatch.scoring.backbone import BackboneError, create_clip

    monkeypatch.setattr(open_clip, "create_model", offline)
    # past the quick check (the case of files that may be cached): open_clip itself fails
    monkeypatch.setattr("linewatch.scoring.backbone.check_weights", lambda arch, weights: None)
    setup_logging()  # the command's logging; then huggingface_hub, imported later, sets its own level:
    hub = logging.getLogger("huggingface_hub")
    previous = hub.level
    hub.setLevel(logging.WARNING)
    try:
        with pytest.raises(BackboneError) as caught:
            create_clip("ViT-B-16", "openai", 0)
    finally:
        hub.setLevel(previous)
    err = capsys.readouterr().err
    assert err == "", err  # nothing but the error, which the command prints as its one line
    assert "could not fetch pretrained weights ViT-B-16/openai" in str(caught.value) and len(str(caught.value)) < 400


def test_a_command_gives_the_process_its_signal_handlers_back(capsys):
    """`ingest` turns SIGINT/SIGTERM into its stop event; once it returns (here on a user
    mistake, after the handlers were set) Ctrl-C is a KeyboardInterrupt again. A stale handler
    once made a later in-process run ignore its Ctrl-C."""
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["ingest", "nothing.mp4", "--bootstrap-servers", ""]) == 2
    assert "no Kafka given" in error_line(capsys)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """600 frames: far more than a few batches."""
    return write_demo_clip(tmp_path_factory.mktemp("long"), seconds=60, fps=10, size=(160, 96), references=0)


def _run_process(clip, out, *extra):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the tiny model gains nothing from threads (conftest)
    return subprocess.Popen([sys.executable, "-m", "linewatch", "run", str(clip.video), "--stream-id", "d",
                             "--threshold", "0", "--max-batch", "4", "--out", str(out),
                             "--scores", str(out / "scores.jsonl"), *extra, *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_scores(run, scores):
    wait_for(lambda: run.poll() is not None or (scores.is_file() and scores.read_text().count("\n") >= 1),
             timeout_s=300, what="the first score")
    assert run.poll() is None, run.communicate()


def test_one_ctrl_c_on_a_file_run_stops_within_two_batches_with_the_summary(long_clip, tmp_path):
    """The file is read at most two batches ahead of the worker, so one SIGINT ends a 600-frame
    run after at most two more batches (8 frames at --max-batch 4), with the usual summary and
    exit 130 (ingest used to read the whole file at once, and all of it was scored)."""
    import re
    import signal

    out = tmp_path / "out"
    run = _run_process(long_clip, out)
    _wait_for_scores(run, out / "scores.jsonl")
    run.send_signal(signal.SIGINT)
    printed, err = run.communicate(timeout=300)
    assert run.returncode == 130 and "Traceback" not in err, err
    at_signal = int(re.search(r"interrupted after (\d+) frames scored", err).group(1))
    scored = int(re.search(r"^(\d+) frames scored in", printed, re.M).group(1))
    read = int(re.search(r"^(\d+) frames read, 0 dropped \(stopped by Ctrl-C\); 1 event\(s\)$", printed, re.M).group(1))
    assert scored - at_signal <= 2 * 4, (at_signal, scored)
    assert scored == read < long_clip.frame_count  # everything read was scored, and reading stopped
    assert f"alerts: {out / 'alerts.jsonl'}" in printed and f"archive: {out / 'archive'}" in printed
    assert (out / "scores.jsonl").read_text().count("\n") == scored
    assert err.rstrip().endswith("linewatch: interrupted")

