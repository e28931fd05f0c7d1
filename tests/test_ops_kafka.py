"""A `linewatch worker` process on the real Tansu broker, watched as Prometheus and Kubernetes
would: /readyz turns ready only once the group has assigned it partitions, /metrics counters
move with the frames sent, mid-stream, and its JSON log carries the periodic summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from linewatch.bus.messages import META_HEADER, FrameMeta, encode
from linewatch.pipeline.wiring import connect

from helpers import http_get, jpeg, wait_for

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]
PREFIX = "opsk"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    out = {}
    for family in text_string_to_metric_families(http_get(f"{url}/metrics")[1]):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def send_frames(bus, stream: str, seqs, corrupt: bool = False) -> None:
    producer = bus.producer()
    for seq in seqs:
        meta = FrameMeta(stream=stream, seq=seq, ts=1000.0 + seq, source="test", width=64, height=48)
        producer.send(bus.topics.frames, b"not a jpeg" if corrupt else jpeg(seq), key=stream.encode(),
                      headers=((META_HEADER, encode(meta)),))
    producer.close()


def test_worker_probes_and_metrics_on_tansu(kafka_servers, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        cv2.imwrite(str(refs / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    bus = connect(f"kafka://{kafka_servers}", PREFIX, 2)
    stalled = bus.consumer([bus.topics.frames], bus.topics.group("workers"))  # a member of the workers' group
    wait_for(lambda: stalled.poll(0.2) == [] and stalled.assigned(), timeout_s=60, what="the first member's assignment")
    log = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LINEWATCH_OPS__SUMMARY_S": "1"}
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "linewatch", "worker", "--bootstrap-servers", kafka_servers, "--topic-prefix",
             PREFIX, "--partitions", "2", "--references", str(refs), "--threshold", "0.5", "--max-batch", "4",
             *TINY, "--metrics-port", "0", "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def endpoint() -> str | None:
            assert worker.poll() is None, log.read_text()[-3000:]
            for row in json_lines(log):
                if row["message"].startswith("metrics and health on "):
                    return row["message"].split()[4]
            return None

        wait_for(endpoint, timeout_s=60, what="the worker's endpoint")
        url = endpoint()

        def loop_running() -> bool:
            assert worker.poll() is None, log.read_text()[-3000:]
            return "worker" in json.loads(http_get(f"{url}/healthz")[1])["loops"]

        # The group's other member stops polling: a rebalance cannot finish without it, so the
        # worker's loop runs but gets no partitions, and must not report ready.
        wait_for(loop_running, timeout_s=180, what="the worker's loop to run")
        status, body = http_get(f"{url}/readyz")
        conditions = json.loads(body)["conditions"]
        assert status == 503, body
        assert [name for name, c in conditions.items() if not c["ok"]] == ["assignment"], body
        assert http_get(f"{url}/healthz")[0] == 200  # alive, only not ready

        def ready() -> bool:
            assert worker.poll() is None, log.read_text()[-3000:]
            stalled.poll(0.2)  # the other member rejoins: the rebalance completes
            return http_get(f"{url}/readyz")[0] == 200

        wait_for(ready, timeout_s=120, what="/readyz to turn ready")
        assigned = json.loads(http_get(f"{url}/readyz")[1])["conditions"]["assignment"]
        assert assigned == {"ok": True, "detail": "partitions assigned by the group"}
        stalled.close()  # it leaves (having taken no frames): the worker gets both partitions

        send_frames(bus, "cam-1", range(6))
        wait_for(lambda: sample(scrape(url), "linewatch_frames_scored_total") == 6, timeout_s=120,
                 what="6 frames scored")
        first = scrape(url)
        assert sample(first, "linewatch_frames_received_total") == 6
        assert sample(first, "linewatch_end_to_end_seconds_count") == 6

        send_frames(bus, "cam-1", range(6, 10))
        send_frames(bus, "cam-2", [0], corrupt=True)
        wait_for(lambda: sample(scrape(url), "linewatch_frames_scored_total") == 10, timeout_s=120,
                 what="10 frames scored")
        wait_for(lambda: sample(scrape(url), "linewatch_dead_letters_total", stage="worker",
                                reason="undecodable_frame") == 1, what="the corrupt frame dead-lettered")
        second = scrape(url)
        assert sample(second, "linewatch_frames_received_total") == 11
        assert sample(second, "linewatch_batch_size_count") >= 3  # 11 frames in batches of at most 4
        assert sample(second, "linewatch_batch_size_sum") == 11
        # lag is exported once kafka-python has a high-water mark from a fetch (Tansu's are approximate)
        wait_for(lambda: any(name == "linewatch_consumer_lag_records" and dict(labels)["topic"] == f"{PREFIX}.frames"
                             for name, labels in scrape(url)), what="the consumer lag gauge")
        wait_for(lambda: any(row.get("summary", {}).get("frames_per_s", 0) > 0 for row in json_lines(log)),
                 what="a summary line with frames")
        assert all({"time", "level", "logger", "message"} <= set(row) for row in json_lines(log))
    finally:
        stalled.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, log.read_text()[-3000:]
