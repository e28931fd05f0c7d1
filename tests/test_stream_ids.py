"""Issue 22, item 4: stream ids validated once, in the message schema (the rule ingest's CLI
uses), so the worker and the sinks dead-letter a record whose stream id could escape a folder;
the frames counter counts frames only; unknown LINEWATCH_* variables are refused."""

from __future__ import annotations

import json
import threading

import pytest
from prometheus_client import REGISTRY

from linewatch.bus import Topics
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import (
    META_HEADER,
    AlertMsg,
    DeadLetter,
    FrameMeta,
    MessageError,
    ScoreMsg,
    SessionEnd,
    check_stream_id,
    decode,
    encode,
    frame_meta,
)
from linewatch.cli import main
from linewatch.pipeline.settings import load_settings
from linewatch.sinks.alert_sink import AlertSink
from linewatch.sinks.events import AlertPolicy
from linewatch.sinks.archive import Archive
from linewatch.sinks.archive_sink import run_archive_sink
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.profiles import ProfileTable, StreamProfile
from linewatch.workers.worker import ScoringWorker

from helpers import error_line, jpeg, publish, read_all, score_msg, wait_for

BAD_IDS = ["../../etc", "a/b", "a\x00b", "", ".", "..", "x" * 129, "cam\n", "drone 7"]
GOOD_IDS = ["cam", "drone-7", "site_3.north", "x" * 128, "..cam"]
META = {"kind": "frame", "v": 1, "seq": 0, "ts": 1000.0, "source": "t", "width": 64, "height": 48}


@pytest.mark.parametrize("stream", BAD_IDS)
def test_the_schema_refuses_a_bad_stream_id(stream):
    with pytest.raises(ValueError, match="stream id"):
        check_stream_id(stream)
    with pytest.raises(MessageError, match="stream"):
        frame_meta([(META_HEADER, json.dumps({**META, "stream": stream}).encode())])
    good = json.loads(encode(score_msg(0, 0.9)))
    with pytest.raises(MessageError, match="frame.stream"):
        decode(json.dumps({**good, "frame": {**good["frame"], "stream": stream}}).encode(), ScoreMsg)
    with pytest.raises(MessageError, match="stream"):
        decode(json.dumps({"kind": "end", "v": 1, "stream": stream, "frames": 1, "ts": 1.0}).encode(), SessionEnd)


@pytest.mark.parametrize("stream", GOOD_IDS)
def test_the_schema_keeps_good_stream_ids(stream):
    assert FrameMeta(stream=stream, **{k: v for k, v in META.items() if k not in ("kind", "v")}).stream == stream
    assert check_stream_id(stream) == stream


@pytest.mark.parametrize("stream", ["../../etc", "a/b", ".."])
def test_ingest_refuses_the_same_ids_with_the_same_words(stream, tmp_path):
    from linewatch.ingest.publisher import IngestError, run_ingest

    image = tmp_path / "frame.jpg"
    image.write_bytes(jpeg(0))
    with pytest.raises(ValueError) as schema:
        check_stream_id(stream)
    with pytest.raises(IngestError) as ingest:
        run_ingest(MemoryBus(Topics("ids")), [str(image)], stream_ids=[stream], progress=False)
    assert str(ingest.value) == str(schema.value)


def bad_frame(stream: str) -> bytes:
    return json.dumps({**META, "stream": stream}).encode()


def test_the_worker_dead_letters_bad_stream_ids_and_counts_frames_only(tiny):
    bus = MemoryBus(Topics("ids"))
    worker = ScoringWorker(bus, tiny, ProfileTable(StreamProfile(method="aprilgan", threshold=0.0)), AnchorCache(),
                           max_batch=4)
    worker.prepare_all()
    received = REGISTRY.get_sample_value("linewatch_frames_received_total") or 0.0
    publish(bus, "cam", 0)
    for seq, stream in enumerate(["../../etc", "a/b", "a\x00b"], start=1):
        publish(bus, "cam", seq, meta=bad_frame(stream))
    publish(bus, "cam", 4)
    end = SessionEnd(stream="cam", frames=5, ts=1004.0)
    bus.producer().send(bus.topics.frames, b"", key=b"cam", headers=((META_HEADER, encode(end)),))
    worker.run(threading.Event(), until_idle_s=0.3)
    scored = sorted(decode(r.value, ScoreMsg).frame.seq for r in read_all(bus, bus.topics.scores) if b'"score"' in r.value)
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert scored == [0, 4]
    assert len(dead) == 3 and all(d.stage == "worker" and "stream id" in d.reason for d in dead), dead
    assert all(d.headers[META_HEADER] for d in dead)  # the record itself is kept for inspection
    # 5 frame records (3 of them dead-lettered) and one end of session: 5 frames received
    assert (REGISTRY.get_sample_value("linewatch_frames_received_total") or 0.0) - received == 5


def bad_score(stream: str, seq: int) -> bytes:
    good = json.loads(encode(score_msg(seq, 0.9)))
    return json.dumps({**good, "frame": {**good["frame"], "stream": stream}}).encode()


def test_the_archive_sink_dead_letters_bad_stream_ids(tmp_path):
    bus = MemoryBus(Topics("ids"))
    producer = bus.producer()
    values = [encode(score_msg(0, 0.9)), bad_score("../../etc", 1), bad_score("a/b", 2), encode(score_msg(3, 0.9))]
    for value in values:
        producer.send(bus.topics.scores, value, key=b"cam")
    stop, result = threading.Event(), {}
    sink = threading.Thread(target=lambda: result.update(stats=run_archive_sink(bus, Archive(tmp_path), stop=stop,
                                                                                  poll_s=0.05)), daemon=True)
    sink.start()
    try:
        wait_for(lambda: sum(bus.committed.get(bus.topics.group("archive"), {}).values()) == 4, what="every record committed")
    finally:
        stop.set()
        sink.join(10)
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert (result["stats"].archived, result["stats"].dead) == (2, 2)
    assert all(d.stage == "sink-archive" and "frame.stream" in d.reason and "stream id" in d.reason for d in dead)
    assert not list(tmp_path.glob("**/etc*")) and not (tmp_path.parent / "etc").exists()


def test_the_alert_sink_dead_letters_bad_stream_ids(tmp_path):
    bus = MemoryBus(Topics("ids"))
    producer = bus.producer()
    for seq, value in enumerate([bad_score("../../etc", 0), bad_score("a\x00b", 1)]):
        producer.send(bus.topics.scores, value, key=b"cam")
    sink = AlertSink(bus, lambda stream: AlertPolicy(k=1, n=1), [], poll_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(read_all(bus, bus.topics.dead)) == 2, what="two dead letters")
    finally:
        stop.set()
        thread.join(10)
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert all(d.stage == "sink-alerts" and "stream id" in d.reason for d in dead), dead
    assert not [r for r in read_all(bus, bus.topics.alerts)]
    with pytest.raises(ValueError, match="stream id"):  # nor can an alert carry one
        AlertMsg(event_id="x", status="open", stream="a/b", start_seq=0, end_seq=0, start_ts=0, end_ts=0,
                 peak_score=1, peak_seq=0, threshold=0.5, frames=[0], method="m", class_name="c")


# ---- LINEWATCH_* variables ---------------------------------------------------------------------
@pytest.mark.parametrize("name, hint", [
    ("LINEWATCH_SECURITY_PROTOCOL", "LINEWATCH_KAFKA__SECURITY_PROTOCOL"),
    ("LINEWATCH_WORKER__MAX_BACH", "LINEWATCH_WORKER__MAX_BATCH"),
    ("LINEWATCH_WORKER__MAX_BATCH__X", None),
    ("LINEWATCH_ALERTS__NOPE", None),
])
def test_an_unknown_variable_is_refused_by_name(name, hint, monkeypatch, capsys):
    monkeypatch.setenv(name, "SASL_SSL")
    with pytest.raises(ValueError) as refused:
        load_settings()
    assert f"environment variable {name} is not a setting" in str(refused.value)
    if hint:
        assert f"did you mean {hint}?" in str(refused.value)
    assert main(["worker", "--bootstrap-servers", "memory://"]) == 2
    assert name in error_line(capsys)


def test_variables_that_are_settings_or_linewatchs_own_are_accepted(monkeypatch):
    for name, value in [("LINEWATCH_KAFKA__SECURITY_PROTOCOL", "SSL"), ("LINEWATCH_ALERTS__POLICY__K", "1"),
                        ("LINEWATCH_STREAMS", '{"cam-*": {"threshold": 0.7}}'), ("LINEWATCH_SHARED", "/nowhere"),
                        ("LINEWATCH_SOURCE_cam1", "rtsp://cam/1"), ("LINEWATCH_CONSOLE_TOKEN", "x"),
                        ("linewatch_partitions", "2")]:
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert (settings.kafka.security_protocol, settings.alerts.policy.k, settings.partitions) == ("SSL", 1, 2)


def test_every_linewatch_variable_the_project_mentions_is_a_setting_or_allowed():
    """A variable named in the docs, scripts, deploy files or tests that the settings would refuse
    is a documented command that fails (LINEWATCH_QUICKSTART was one)."""
    import re
    import subprocess
    from pathlib import Path

    from linewatch.pipeline.settings import check_environment

    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of the project's files")
    refused_on_purpose = {"LINEWATCH_SECURITY_PROTOCOL"}  # the docs' and tests' example of a refused variable
    names = set()
    for name in listed.stdout.decode().split("\0"):
        path = root / name
        if name == "tests/test_stream_ids.py":  # this file's refusal tests name bad variables on purpose
            continue
        if name and path.is_file() and path.suffix in {".md", ".py", ".sh", ".yaml", ".yml", ".tpl", ""}:
            text = path.read_text(errors="replace")
            names |= set(re.findall(r"\bLINEWATCH_[A-Z][A-Z0-9_]*[A-Z0-9]\b", text))
    bad = []
    for name in sorted(names - refused_on_purpose):
        try:
            check_environment({name: "x"})
        except ValueError as error:
            bad.append(str(error))
    assert not bad, bad
