"""The distributed pipeline on real services: Tansu (Kafka protocol) and Redis on loopback;
ingest, two workers and both sinks as separate `linewatch` processes.

Two drone streams of a synthetic clip with a known defect segment are scored few-shot with
references taken from the clip's normal views (a real signal even with random weights).
Mid-stream one worker is killed with SIGKILL: its group partner takes over its partitions
from the last committed offset, so every frame is still scored (some twice, which the sinks
de-duplicate). Then: exactly one alert per stream, inside the defect segment, none in the
normal part; the anomalous frames' masks archived; a corrupt frame dead-lettered.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

from kafka.partitioner import murmur2

from linewatch.bus.messages import (
    META_HEADER,
    DeadLetter,
    FrameMeta,
    ScoreMsg,
    SessionEnd,
    decode,
    encode,
)
from linewatch.synthetic.demo import write_demo_clip
from linewatch.pipeline.wiring import connect

from helpers import WORKER_READY, wait_for

PARTITIONS = 4
PREFIX = "itest"
MODEL = ["--arch", "ViT-B-16", "--max-batch", "4", "--option", "text_weight=0"]


def stream_ids_on_two_partitions() -> list[str]:
    """Two stream ids Kafka's partitioner puts on different partitions, so both workers work."""
    first = "drone-a"
    for letter in "bcdefghijklmnopqrstuvwxyz":
        other = f"drone-{letter}"
        if murmur2(other.encode()) % PARTITIONS != murmur2(first.encode()) % PARTITIONS:
            return [first, other]
    raise AssertionError("no second partition found")


def test_distributed_pipeline_survives_a_killed_worker(kafka_servers, redis_url, tmp_path, processes):
    clip = write_demo_clip(tmp_path / "clip", seconds=8, fps=5, size=(320, 180), references=8)
    first, last = clip.defect_frames
    streams = stream_ids_on_two_partitions()
    common = ["--bootstrap-servers", kafka_servers, "--topic-prefix", PREFIX, "--partitions", str(PARTITIONS)]
    scoring = [*common, "--redis-url", redis_url, "--references", str(clip.references[0].parent), *MODEL]

    alerts_file, archive = tmp_path / "alerts.jsonl", tmp_path / "archive"
    processes.start("alerts", "sink", "alerts", *common, "--jsonl", str(alerts_file), "--k", "3", "--n", "10")
    processes.start("archive", "sink", "archive", *common, "--archive", str(archive))
    workers = {}
    for name in ("worker-1", "worker-2"):  # one after the other: the second finds the first's anchors and memory cached
        workers[name] = processes.start(name, "worker", *scoring)
        processes.wait_for_line(name, WORKER_READY, timeout=600)

    bus = connect(f"kafka://{kafka_servers}", PREFIX, PARTITIONS)
    # a corrupt frame and a wrong-schema frame on the topic: dead letters, not crashes
    producer = bus.producer()
    meta = FrameMeta(stream=streams[0], seq=999, ts=time.time(), source="test", width=8, height=8)
    producer.send(bus.topics.frames, b"not a jpeg", key=b"broken", headers=((META_HEADER, encode(meta)),))
    producer.send(bus.topics.frames, b"\xff\xd8", key=b"broken", headers=((META_HEADER, b'{"kind":"frame","v":7}'),))
    producer.flush()

    ingest = processes.start("ingest", "ingest", str(clip.video), str(clip.video), "--stream-id", streams[0],
                             "--stream-id", streams[1], "--realtime", *common)

    reader = bus.consumer([], None)
    reader.assign(bus.topics.scores, reader.partitions(bus.topics.scores))
    scored: dict[tuple[str, int], list[ScoreMsg]] = {}
    killed = None
    wanted = {(s, seq) for s in streams for seq in range(clip.frame_count)}
    deadline = time.monotonic() + 600
    while not wanted <= scored.keys():
        assert time.monotonic() < deadline, f"missing frames: {sorted(wanted - scored.keys())[:10]}..."
        for record in reader.poll(1.0, 256):
            score = decode(record.value, ScoreMsg, SessionEnd)
            if isinstance(score, ScoreMsg):  # (a session's end comes after its scores)
                scored.setdefault((score.frame.stream, score.frame.seq), []).append(score)
        if killed is None and len(scored) >= 10:
            # kill the busiest worker mid-stream, with frames in flight and uncommitted
            busiest = max(workers, key=lambda n: sum(s[0].worker.endswith(f":{workers[n].pid}")
                                                      for s in scored.values()))
            workers[busiest].send_signal(signal.SIGKILL)
            killed = busiest
    assert killed is not None and ingest.wait(120) == 0, processes.log("ingest")
    survivor = next(n for n in workers if n != killed)
    assert any(s.worker.endswith(f":{workers[survivor].pid}") for group in scored.values() for s in group)
    assert scored.keys() == wanted  # every frame scored (after de-duplication), nothing else

    # the alert sink closes each stream's event on its session's end marker; then stop the sinks politely
    def closed_streams() -> set:
        lines = alerts_file.read_text().splitlines() if alerts_file.exists() else []
        return {a["stream"] for a in map(json.loads, lines) if a["status"] == "closed"}

    wait_for(lambda: closed_streams() == set(streams), timeout_s=120, what="both streams' events to close")
    for name in ("alerts", "archive"):
        processes.running[name].send_signal(signal.SIGTERM)
        assert processes.running[name].wait(60) == 0, processes.log(name)

    alerts = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    for stream in streams:
        closed = [a for a in alerts if a["stream"] == stream and a["status"] == "closed"]
        assert len(closed) == 1, (stream, alerts)
        frames = closed[0]["frames"]
        assert frames and first <= min(frames) and max(frames) <= last, (stream, frames, (first, last))
    assert {a["event_id"] for a in alerts} == {c["event_id"] for c in alerts if c["status"] == "closed"}

    with sqlite3.connect(archive / "index.sqlite") as db:
        rows = db.execute("SELECT stream, seq, mask_path FROM frames").fetchall()
    archived = {(stream, seq) for stream, seq, _ in rows}
    for stream in streams:
        assert any(first <= seq <= last for s, seq in archived if s == stream)
    assert all((archive / path).is_file() or Path(path).is_file() for _, _, path in rows)

    dead_reader = bus.consumer([], None)
    dead_reader.assign(bus.topics.dead, dead_reader.partitions(bus.topics.dead))
    dead = [decode(r.value, DeadLetter) for r in dead_reader.poll(2.0, 100)]
    reasons = " | ".join(d.reason for d in dead)
    assert "undecodable jpeg" in reasons and "schema version" in reasons
