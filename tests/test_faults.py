"""The fault-injection suite (issue 13, item 7): real Tansu, Redis and SeaweedFS on loopback,
linewatch's parts as separate processes (workers on the tiny architecture, random weights,
threshold 0 so every frame is anomalous and archived), each fault injected and its outcome
asserted by counting:

- poison records on the frames and scores topics: each dead-lettered with its stage and
  reason, every good frame scored and archived, no part exits;
- SIGKILL of the worker, the archive sink and ingest mid-stream, each restarted: frames on the
  frames topic = frames scored = archive index rows, 4 files per row, no file without a row;
- the broker killed and restarted on durable storage (Tansu on SeaweedFS S3, same port): the
  same counts, and each part says once that Kafka is gone and once that it is back; then the
  broker killed again and every part stopped with SIGTERM during the outage: each exits 0;
- Redis killed and restarted empty: scoring goes on, the worker writes its anchors back;
- S3 stopped under the archive sink and started again: every score archived once it is back.
No part may print a traceback. The alert sink's own fault tests (restarts, slow outputs) are
``test_alerts.py``'s.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.bench.broker import free_port, local_tansu, stop, wait_listening
from linewatch.bus.messages import (
    META_HEADER,
    DeadLetter,
    FrameMeta,
    MessageError,
    ScoreMsg,
    decode,
    encode,
    frame_meta,
)
from linewatch.synthetic.demo import write_demo_clip
from linewatch.pipeline.wiring import connect

from helpers import WORKER_READY, Processes, jpeg, read_topic, score_msg, wait_for

pytestmark = pytest.mark.services

PARTITIONS = 2
MODEL = ["--arch", "linewatch-tiny", "--threshold", "0", "--max-batch", "4"]
FILES_PER_FRAME = 4  # frame.jpg, mask.png, overlay.jpg, json


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """8 s at 10 frames/s: long enough at recorded speed (--realtime) to kill parts mid-stream."""
    return write_demo_clip(tmp_path_factory.mktemp("clip"), seconds=8, fps=10, size=(160, 96), references=0)


def flags(servers: str, prefix: str) -> list[str]:
    return ["--bootstrap-servers", servers, "--topic-prefix", prefix, "--partitions", str(PARTITIONS)]


def frames_ingested(bus) -> set:
    """(stream, session, seq) of every well-formed frame on the frames topic."""
    found = set()
    for record in read_topic(bus, bus.topics.frames):
        try:
            meta = frame_meta(record.headers)
        except MessageError:
            continue
        found.add((meta.stream, meta.session, meta.seq))
    return found


def scores(bus) -> dict:
    """(stream, session, seq) -> ScoreMsg for every score on the scores topic (duplicates merged)."""
    found = {}
    for record in read_topic(bus, bus.topics.scores):
        try:
            score = decode(record.value, ScoreMsg)
        except MessageError:
            continue
        found[(score.frame.stream, score.frame.session, score.frame.seq)] = score
    return found


def dead_letters(bus) -> list[DeadLetter]:
    return [decode(r.value, DeadLetter) for r in read_topic(bus, bus.topics.dead)]


def index_rows(root: Path) -> set:
    if not (root / "index.sqlite").exists():
        return set()
    with sqlite3.connect(root / "index.sqlite") as db:
        return set(db.execute("SELECT stream, session, seq FROM frames"))


def check_archive(root: Path) -> int:
    """Files and index rows agree: every row's files exist, every frame's files have a row.
    Returns the number of rows."""
    with sqlite3.connect(root / "index.sqlite") as db:
        rows = db.execute("SELECT frame_path, mask_path, overlay_path FROM frames").fetchall()
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "index.sqlite" and not p.name.startswith(".tmp")]
    assert len(files) == FILES_PER_FRAME * len(rows), (len(files), len(rows))
    assert all((root / path).is_file() for row in rows for path in row)
    return len(rows)


def outage_lines(log: str, dependency: str) -> tuple[int, int]:
    """(lines saying ``dependency`` went away, lines saying it is back) in a part's log."""
    lines = log.splitlines()
    return (sum(dependency in line and "unavailable" in line for line in lines),
            sum(dependency in line and "is back after" in line for line in lines))


def assert_no_traceback(processes: Processes, *names: str) -> None:
    for name in names:
        assert "Traceback" not in processes.log(name), processes.log(name)[-3000:]


def published(processes: Processes, name: str) -> int:
    """Frames an ingest process has published so far (its progress bar's ``published=N``)."""
    return max(map(int, re.findall(r"published=(\d+)", processes.log(name))), default=0)


# ---- poison records --------------------------------------------------------------------------------------
def test_poison_records_are_dead_lettered_and_nothing_stops(kafka_servers, tmp_path, processes):
    prefix = "fault-poison"
    common = flags(kafka_servers, prefix)
    limits = ["--max-pixels", "1000000", "--max-message-bytes", "200000"]
    archive = tmp_path / "archive"
    processes.start("worker", "worker", *common, *MODEL, *limits)
    processes.start("archive", "sink", "archive", *common, "--archive", str(archive), *limits)
    processes.start("alerts", "sink", "alerts", *common, "--jsonl", str(tmp_path / "alerts.jsonl"), "--no-publish")
    processes.wait_for_line("worker", WORKER_READY, timeout=300)

    bus = connect(f"kafka://{kafka_servers}", prefix, PARTITIONS)
    producer = bus.producer()

    def frame(seq: int, value: bytes | None = None, header: bytes | None = None, stream: str = "cam") -> None:
        meta = encode(FrameMeta(stream=stream, seq=seq, ts=1000.0 + seq, source="test", width=64, height=48))
        producer.send(bus.topics.frames, value if value is not None else jpeg(seq), key=stream.encode(),
                      headers=((META_HEADER, header if header is not None else meta),))

    def header(**fields) -> bytes:
        return json.dumps({"kind": "frame", "v": 1, "stream": "bad", "seq": 0, "ts": 1.0, "source": "t",
                           "width": 64, "height": 48, **fields}).encode()

    noise = np.random.default_rng(0).integers(0, 255, (250, 340, 3), dtype=np.uint8)
    big = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()  # ~175 KB: its score won't fit
    for seq in range(10):
        frame(seq)
    frame(10, value=big)
    for poison in (b'{"kind":"frame","v":1,"telemetry":' + b"[" * 30_000 + b"]" * 30_000 + b"}",  # RecursionError
                   header(seq=2 ** 63), header(ts=math.nan)):
        frame(0, header=poison, stream="bad")
    frame(11, value=cv2.imencode(".jpg", np.zeros((1000, 1200, 3), np.uint8))[1].tobytes(), stream="bad")
    good = json.loads(encode(score_msg(0, 0.9, stream="bad")))
    for value in (b'{"kind":"score","v":1,"frame":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                  json.dumps({**good, "frame": {**good["frame"], "seq": 2 ** 63}}).encode(),
                  json.dumps({**good, "image_score": math.nan}).encode()):
        producer.send(bus.topics.scores, value, key=b"bad")
    producer.flush()

    expected_dead = {"worker": 4, "sink-archive": 3, "sink-alerts": 3}
    wait_for(lambda: len(index_rows(archive)) == 11, timeout_s=120, what="the 11 good frames archived")
    wait_for(lambda: len(dead_letters(bus)) >= sum(expected_dead.values()), timeout_s=60, what="the dead letters")
    dead = dead_letters(bus)
    by_stage = {stage: [d.reason for d in dead if d.stage == stage] for stage in expected_dead}
    assert {stage: len(reasons) for stage, reasons in by_stage.items()} == expected_dead, by_stage
    worker_reasons = " | ".join(by_stage["worker"])
    for expected in ("nested deeper", "seq: Input should be less than", "ts: Input should be a finite number",
                     "above the pixel budget"):
        assert expected in worker_reasons, worker_reasons
    scored = scores(bus)
    assert {key[2] for key in scored if key[0] == "cam"} == set(range(11))
    assert scored[("cam", "", 10)].frame_jpeg_note == "reduced"  # was MessageSizeTooLargeError and exit 2
    assert check_archive(archive) == 11
    for name in ("worker", "archive", "alerts"):
        assert processes.running[name].poll() is None, processes.log(name)[-3000:]
    assert_no_traceback(processes, "worker", "archive", "alerts")


# ---- kill -9 and restart ---------------------------------------------------------------------------------
def test_killed_parts_resume_and_lose_nothing(kafka_servers, clip, tmp_path, processes):
    prefix = "fault-kill"
    common = flags(kafka_servers, prefix)
    archive = tmp_path / "archive"
    processes.start("worker", "worker", *common, *MODEL)
    processes.start("archive", "sink", "archive", *common, "--archive", str(archive))
    processes.wait_for_line("worker", WORKER_READY, timeout=300)
    processes.start("ingest", "ingest", str(clip.video), "--stream-id", "drone", "--realtime", *common)

    wait_for(lambda: len(index_rows(archive)) >= 10, timeout_s=120, what="10 frames archived")
    processes.running["worker"].send_signal(signal.SIGKILL)  # mid-batch, offsets uncommitted
    processes.running["worker"].wait()
    processes.start("worker", "worker", *common, *MODEL)
    processes.wait_for_line("worker", WORKER_READY, timeout=300, count=2)

    at = len(index_rows(archive))
    wait_for(lambda: len(index_rows(archive)) >= at + 5, timeout_s=120, what="5 more frames archived")
    processes.running["archive"].send_signal(signal.SIGKILL)
    processes.running["archive"].wait()
    processes.start("archive", "sink", "archive", *common, "--archive", str(archive))

    wait_for(lambda: published(processes, "ingest") >= 50, timeout_s=120, what="ingest half way")
    processes.running["ingest"].send_signal(signal.SIGKILL)
    processes.running["ingest"].wait()
    processes.start("ingest", "ingest", str(clip.video), "--stream-id", "drone", *common)  # a new session
    assert processes.running["ingest"].wait(120) == 0, processes.log("ingest")[-3000:]

    bus = connect(f"kafka://{kafka_servers}", prefix, PARTITIONS)
    ingested = frames_ingested(bus)
    sessions = {session for _, session, _ in ingested}
    assert len(sessions) == 2 and len(ingested) >= clip.frame_count + 50
    wait_for(lambda: index_rows(archive) >= ingested, timeout_s=180, what="every ingested frame archived")
    assert set(scores(bus)) == ingested  # none lost, none invented
    assert index_rows(archive) == ingested and check_archive(archive) == len(ingested)
    assert_no_traceback(processes, "worker", "archive", "ingest")


# ---- the broker: restart on durable storage, then SIGTERM during an outage ----------------------------------
def test_broker_outages_on_durable_storage(s3_server, clip, tmp_path, processes):
    """Tansu keeps its log on SeaweedFS (``s3://``), so a restart on the same port loses nothing."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": s3_server.endpoint_url, "AWS_ALLOW_HTTP": "true"}
    port, brokers = free_port(), []

    def broker():
        return local_tansu(tmp_path, storage=f"s3://{s3_server.bucket}/", env=env, port=port, started=brokers)

    def kill_broker() -> None:
        brokers[-1].send_signal(signal.SIGKILL)
        brokers[-1].wait()

    prefix, archive = "fault-broker", tmp_path / "archive"
    parts = ("ingest", "worker", "archive", "alerts")
    with broker() as servers:
        common = flags(servers, prefix)
        processes.start("worker", "worker", *common, *MODEL)
        processes.start("archive", "sink", "archive", *common, "--archive", str(archive))
        processes.start("alerts", "sink", "alerts", *common, "--jsonl", str(tmp_path / "alerts.jsonl"))
        processes.wait_for_line("worker", WORKER_READY, timeout=300)
        processes.start("ingest", "ingest", str(clip.video), "--stream-id", "drone", "--realtime", *common)
        wait_for(lambda: len(index_rows(archive)) >= 10, timeout_s=120, what="10 frames archived")
        kill_broker()
        for name in parts:  # every part notices, and says so (once: asserted below)
            processes.wait_for_line(name, "unavailable", timeout=60)
    with broker():
        assert processes.running["ingest"].wait(120) == 0, processes.log("ingest")[-3000:]
        bus = connect(f"kafka://{servers}", prefix, PARTITIONS)
        ingested = frames_ingested(bus)
        assert len(ingested) == clip.frame_count  # ingest waited the outage out: nothing dropped
        wait_for(lambda: index_rows(archive) >= ingested, timeout_s=180, what="every frame archived")
        assert set(scores(bus)) == ingested and check_archive(archive) == clip.frame_count
        for name in parts:
            processes.wait_for_line(name, "is back after", timeout=60)
            assert outage_lines(processes.log(name), f"Kafka at {servers}") == (1, 1), processes.log(name)[-3000:]

        # the broker dies again with a second ingest mid-file: every part answers SIGTERM and exits 0
        processes.start("ingest-2", "ingest", str(clip.video), "--stream-id", "drone-2", "--realtime", *common)
        wait_for(lambda: published(processes, "ingest-2") >= 10, timeout_s=120, what="the second ingest under way")
        kill_broker()
        running = ("ingest-2", "worker", "archive", "alerts")
        for name in running:
            processes.wait_for_line(name, "unavailable", timeout=60, count=1 if name == "ingest-2" else 2)
        for name in running:
            processes.running[name].send_signal(signal.SIGTERM)
        for name in running:
            assert processes.running[name].wait(30) == 0, processes.log(name)[-3000:]
    assert_no_traceback(processes, *parts, "ingest-2")
    assert "not acknowledged" in processes.log("ingest-2")  # it says what it could not deliver
    check_archive(archive)


# ---- Redis --------------------------------------------------------------------------------------------------
def start_redis(port: int, log_dir: Path, password: str) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                "--requirepass", password, "--logfile", str(log_dir / "redis.log")],
                               stdout=subprocess.DEVNULL)
    assert wait_listening(process, port, "redis-server", 15), "redis-server exited (port taken?)"
    return process


def test_redis_outage_and_an_empty_restart(kafka_servers, tmp_path, processes):
    """Redis (with a password) killed under a running worker, then started again empty on the
    same port: scoring never stops, the worker writes its anchors back, the password is never
    printed."""
    import redis

    password, port = "hunter2-not-for-logs", free_port()
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path, password)
    try:
        prefix = "fault-redis"
        common = flags(kafka_servers, prefix)
        processes.start("worker", "worker", *common, *MODEL, "--redis-url", url)
        processes.wait_for_line("worker", WORKER_READY, timeout=300)
        client = redis.Redis.from_url(url)
        (key,) = client.keys("anchors:*")
        server.send_signal(signal.SIGKILL)
        server.wait()

        bus = connect(f"kafka://{kafka_servers}", prefix, PARTITIONS)
        producer = bus.producer()
        for seq in range(10):
            meta = FrameMeta(stream="cam", seq=seq, ts=1000.0 + seq, source="test", width=64, height=48)
            producer.send(bus.topics.frames, jpeg(seq), key=b"cam", headers=((META_HEADER, encode(meta)),))
        producer.flush()
        wait_for(lambda: len(scores(bus)) == 10, timeout_s=60, what="10 frames scored with Redis down")
        processes.wait_for_line("worker", "unavailable", timeout=60)  # the anchor upkeep noticed

        server = start_redis(port, tmp_path, password)  # empty: --save "" kept nothing
        wait_for(lambda: client.exists(key) == 1, timeout_s=60, what="the anchors written back to Redis")
        processes.wait_for_line("worker", "is back after", timeout=60)
        log = processes.log("worker")
        assert outage_lines(log, "Redis at redis://:***@127.0.0.1") == (1, 1), log[-3000:]
        assert password not in log
        assert processes.running["worker"].poll() is None
        assert_no_traceback(processes, "worker")
    finally:
        stop(server)


# ---- S3 ----------------------------------------------------------------------------------------------------
def test_s3_outage_under_the_archive_sink(kafka_servers, s3_server, tmp_path, processes):
    prefix = "fault-s3"
    common = flags(kafka_servers, prefix)
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    processes.start("archive", "sink", "archive", *common, "--archive", f"s3://{s3_server.bucket}/{prefix}", env=env)
    bus = connect(f"kafka://{kafka_servers}", prefix, PARTITIONS)
    producer = bus.producer()

    def stored() -> list[str]:
        listing = s3_server.client.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/")
        return [item["Key"] for item in listing.get("Contents", [])]

    def send(seqs) -> None:
        for seq in seqs:
            producer.send(bus.topics.scores, encode(score_msg(seq, 0.9)), key=b"cam")
        producer.flush()

    send(range(3))
    wait_for(lambda: len(stored()) == 3 * FILES_PER_FRAME, timeout_s=120, what="3 frames archived")
    s3_server.stop()
    try:
        send(range(3, 8))
        processes.wait_for_line("archive", "unavailable", timeout=60)
        assert processes.running["archive"].poll() is None  # was: a botocore traceback and exit 1
    finally:
        s3_server.start()
    wait_for(lambda: len(stored()) == 8 * FILES_PER_FRAME, timeout_s=120, what="all 8 frames archived")
    keys = stored()
    assert sorted(k for k in keys if k.endswith(".json")) == [f"{prefix}/cam/{seq:010d}.json" for seq in range(8)]
    processes.wait_for_line("archive", "is back after", timeout=30)
    assert outage_lines(processes.log("archive"), f"S3 bucket {s3_server.bucket}") == (1, 1)
    processes.running["archive"].send_signal(signal.SIGTERM)
    assert processes.running["archive"].wait(30) == 0
    assert_no_traceback(processes, "archive")


# ---- a broker that comes back empty (issue 22, item 3) ---------------------------------------
# A broker that comes back empty (issue 22, item 3): Tansu on ``memory://`` SIGKILLed mid-stream
# and started again on the same port with nothing: no topics, no groups, no producer state.
#
# Every part keeps running; every frame ingest publishes after the restart is scored, archived
# and alerted (counted against the frames topic of the new broker); the frames the old broker
# had acknowledged are reported as lost by ingest (not as published), and the worker says how
# many of them it never read. Processes and helpers as in ``test_faults.py``.

SUMMARY = re.compile(r"drone: published (\d+) of (\d+) read, lost (\d+) with the broker")
WORKER_LOST = re.compile(r"(\d+) record\(s\) of the old log were never read and are lost")


def alerted(jsonl: Path, session: str) -> set[int]:
    """Seqs of the session's frames in the alerts written to the JSONL output."""
    seqs: set[int] = set()
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            alert = json.loads(line)
            if f"@{session}:" in alert["event_id"]:
                seqs.update(alert["frames"])
    return seqs


def test_a_broker_restarted_empty_loses_nothing_silently(clip, tmp_path, processes):
    port, brokers = free_port(), []

    def broker():
        return local_tansu(tmp_path, storage="memory://tansu/", port=port, started=brokers)

    prefix, archive, jsonl = "empty-broker", tmp_path / "archive", tmp_path / "alerts.jsonl"
    parts = ("ingest", "worker", "archive", "alerts")
    with broker() as servers:
        common = flags(servers, prefix)
        processes.start("worker", "worker", *common, *MODEL)
        processes.start("archive", "sink", "archive", *common, "--archive", str(archive))
        processes.start("alerts", "sink", "alerts", *common, "--jsonl", str(jsonl))
        processes.wait_for_line("worker", WORKER_READY, timeout=300)
        processes.start("ingest", "ingest", str(clip.video), "--stream-id", "drone", "--realtime", *common)
        wait_for(lambda: len(index_rows(archive)) >= 10, timeout_s=120, what="10 frames archived")
        brokers[-1].send_signal(signal.SIGKILL)
        brokers[-1].wait()
        for name in parts:
            processes.wait_for_line(name, "unavailable", timeout=60)
    with broker():  # empty: memory:// kept nothing
        assert processes.running["ingest"].wait(180) == 0, processes.log("ingest")[-3000:]
        summaries = set(SUMMARY.findall(processes.log("ingest")))  # (logged, and printed at the end)
        assert len(summaries) == 1, processes.log("ingest")[-3000:]
        (summary,) = summaries
        published, read, lost = map(int, summary)
        assert read == clip.frame_count and lost > 0 and published + lost == read, summary

        bus = connect(f"kafka://{servers}", prefix, PARTITIONS)
        ingested = frames_ingested(bus)  # what the new broker has: the frames published after the restart
        assert len(ingested) == published, (len(ingested), summary)
        (session,) = {session for _, session, _ in ingested}
        wait_for(lambda: index_rows(archive) >= ingested, timeout_s=180, what="every frame published archived")
        assert set(scores(bus)) >= ingested
        wait_for(lambda: alerted(jsonl, session) >= {seq for _, _, seq in ingested}, timeout_s=120,
                 what="every frame published alerted")
        # the worker says what the broker lost: its consumer's records never read or, when kafka-python
        # rejoined the group before the coordinator was seen missing, its producer's lost scores
        worker = processes.log("worker")
        assert WORKER_LOST.findall(worker) or "they are lost with the broker" in worker, worker[-3000:]
        for name in ("worker", "archive", "alerts"):
            assert processes.running[name].poll() is None, processes.log(name)[-3000:]
    assert_no_traceback(processes, *parts)
