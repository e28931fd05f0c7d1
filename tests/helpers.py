"""Helpers shared by the test modules (tests never import each other): frames on a bus,
reading a topic whole, the one-line CLI error, waiting on a condition, a webhook receiver,
`linewatch` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from linewatch.bus.maps import encode_map
from linewatch.bus.messages import (
    META_HEADER,
    FrameMeta,
    Latency,
    ScoreMsg,
    Telemetry,
    encode,
)
from linewatch.sinks.events import AlertPolicy, AlertTracker


def jpeg(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    """A small JPEG of random pixels, fixed by ``seed``."""
    image = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def publish(bus, stream: str, seq: int, value: bytes | None = None, meta: bytes | None = None, ts: float = 1000.0):
    """One frame record on ``bus.topics.frames`` as ingest writes it (a 64x48 JPEG unless ``value``)."""
    header = meta if meta is not None else encode(FrameMeta(stream=stream, seq=seq, ts=ts + seq, source="test",
                                                            width=64, height=48))
    bus.producer().send(bus.topics.frames, value if value is not None else jpeg(seq), key=stream.encode(),
                        headers=((META_HEADER, header),), timestamp_ms=int((ts + seq) * 1000))


def read_all(bus, topic: str) -> list:
    """Every record still on ``topic`` of an in-process bus, outside any group."""
    reader = bus.consumer([], None)
    reader.assign(topic, list(range(bus.partitions)))
    return reader.poll(0.2, 10_000)


def read_topic(bus, topic: str) -> list:
    """Everything on ``topic`` of a Kafka bus, read outside any group (until two polls in a row
    come back empty: a broker may answer one fetch empty while records are there)."""
    reader = bus.consumer([], None)
    try:
        partitions = reader.partitions(topic)
        reader.assign(topic, partitions)
        for p in partitions:
            reader.seek(topic, p, 0)
        records, empty = [], 0
        while empty < 2:
            batch = reader.poll(1.0, 1000)
            records += batch
            empty = 0 if batch else empty + 1
        return records
    finally:
        reader.close()


def error_line(capsys) -> str:
    """The one ``linewatch: error:`` line a failed command printed (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("linewatch: error:")]
    assert len(lines) == 1, err
    return lines[0]


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET on loopback; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_for(condition, timeout_s: float = 30.0, what: str = "the condition", state=None) -> None:
    """Until ``condition()`` is true; the timeout is a liveness bound, never a measurement.
    ``state()``, when given, says what was seen instead (in the failure message)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (f"; saw {state()}" if state else "")
        time.sleep(0.02)


# ---- linewatch processes ------------------------------------------------------------------------
WORKER_READY = " ready ("  # the worker's "worker <id> ready (<model>, ...)" line (not the endpoint's "/readyz")


class Processes:
    """`linewatch` commands as processes, each logging to ``<logs>/<name>.log``."""

    def __init__(self, logs: Path):
        self.logs, self.running = logs, {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        """``linewatch ARGS`` as a process, its output (appended, across restarts) in ``<name>.log``."""
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "linewatch", *args], stdout=log,
                                   stderr=subprocess.STDOUT, env={**self.env, **(env or {})})
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str) -> None:
        process = self.running[name]
        assert process.poll() is None, f"{name} exited {process.returncode}:\n{self.log(name)[-3000:]}"

    def wait_for_line(self, name: str, text: str, timeout: float, count: int = 1) -> None:
        """Until ``name``'s log holds ``text`` ``count`` times (a restarted process appends)."""
        deadline = time.monotonic() + timeout
        while self.log(name).count(text) < count:
            self.alive(name)
            assert time.monotonic() < deadline, f"{name} never said {text!r}:\n{self.log(name)[-3000:]}"
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """SIGKILL: nothing flushed, nothing said."""
        self.running[name].kill()
        self.running[name].wait()

    def stop(self, name: str, timeout: float = 60) -> None:
        """SIGTERM, and a clean exit expected."""
        self.running[name].terminate()
        assert self.running[name].wait(timeout) == 0, self.log(name)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.kill()
                process.wait()


# ---- scores as a worker sends them ---------------------------------------------------------------
FRAME_W, FRAME_H = 64, 48
TS0, STEP = 1000.0, 0.25  # capture times exact in binary, so cool-down arithmetic is exact


@lru_cache(maxsize=None)
def frame_jpeg() -> bytes:
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
    image = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def score_msg(seq: int, score: float = 0.1, *, stream: str = "cam", threshold: float = 0.5,
              ts: float | None = None, anomaly_map: np.ndarray | None = None,
              telemetry: Telemetry | None = None) -> ScoreMsg:
    """A ScoreMsg as a worker would send it: the frame JPEG only when anomalous."""
    anomalous = score >= threshold
    if anomaly_map is None:
        anomaly_map = np.zeros((FRAME_H // 2, FRAME_W // 2), np.float32)
        anomaly_map[4:12, 8:20] = score
    meta = FrameMeta(stream=stream, seq=seq, ts=TS0 + seq * STEP if ts is None else ts, pts=seq * STEP,
                     source="test.mp4", width=FRAME_W, height=FRAME_H, telemetry=telemetry)
    return ScoreMsg(frame=meta, image_score=score, threshold=threshold, anomalous=anomalous,
                    map=encode_map(anomaly_map), method="winclip", class_name="power line", anchor_key="a1",
                    model="tiny", worker="w0", latency=Latency(queue_ms=1, decode_ms=1, model_ms=1, batch_size=1),
                    frame_jpeg=frame_jpeg() if anomalous else None)


class Webhook:
    """A real HTTP receiver on loopback. ``statuses`` are answered in turn (the last one
    repeats); with ``answer`` (an Event), every request hangs until it is set: a webhook that
    never answers; with ``delay_s``, each answer comes that late (after the client's timeout: a
    slow receiver that still took the alert). ``port``: listen there (0: any free port).
    ``requests`` holds (headers, body) in arrival order."""

    def __init__(self, statuses: list[int], answer: threading.Event | None = None, *, port: int = 0,
                 delay_s: float = 0.0):
        self.statuses, self.answer, self.requests = statuses, answer, []
        self.closed = threading.Event()
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    hook.requests.append((dict(self.headers), body))
                    status = hook.statuses[min(len(hook.requests), len(hook.statuses)) - 1]
                if hook.answer is not None:
                    hook.answer.wait()
                if delay_s:
                    hook.closed.wait(delay_s)  # the receiver's slowness, not a test's synchronisation
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the client gave up waiting
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def bodies(self) -> list[bytes]:
        with self.lock:
            return [body for _, body in self.requests]

    @property
    def keys(self) -> list[str]:
        """The ``Idempotency-Key`` of each request, in arrival order."""
        with self.lock:
            return [headers["Idempotency-Key"] for headers, _ in self.requests]

    def close(self):
        self.closed.set()
        if self.answer is not None:
            self.answer.set()
        self.server.shutdown()
        self.server.server_close()


# ---- a tiny MVTec-layout category ---------------------------------------------------------------
def _texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Smooth stripes plus mild noise: a stand-in for a normal surface."""
    y, x = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    base = 110 + 50 * np.sin(x / 3.0 + phase)[..., None] * np.array([1.0, 0.8, 0.6])
    return np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)


def make_category(root: Path, name: str, seed: int, masks: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    cat = root / name
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (cat / folder).mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(cat / "train/good" / f"{i:03d}.png"), _texture(rng))
    for i in range(4):
        cv2.imwrite(str(cat / "test/good" / f"{i:03d}.png"), _texture(rng))
    for i in range(4):
        image, mask = _texture(rng), np.zeros((64, 64), np.uint8)
        top, left = rng.integers(8, 40, size=2)
        image[top:top + 16, left:left + 16] = (20, 240, 240)
        mask[top:top + 16, left:left + 16] = 255
        cv2.imwrite(str(cat / "test/scratch" / f"{i:03d}.png"), image)
        if masks:
            cv2.imwrite(str(cat / "ground_truth/scratch" / f"{i:03d}_mask.png"), mask)
    return cat


def defect_training_set(class_name: str):
    """A ``TrainingSet`` of 4 normal and 4 defective 64 px images of ``class_name``: flat grey
    texture; defect = a bright noisy 16 px square (seeded: the same in every test)."""
    import torch

    from linewatch.scoring.training import TrainingSet

    rng = np.random.default_rng(7)
    images = (0.45 + 0.03 * rng.standard_normal((8, 3, 64, 64))).astype(np.float32)
    masks = np.zeros((8, 64, 64), bool)
    for i in range(4, 8):
        top, left = rng.integers(4, 44, 2)
        images[i, :, top:top + 16, left:left + 16] = rng.uniform(0.8, 1.0, (3, 16, 16))
        masks[i, top:top + 16, left:left + 16] = True
    return TrainingSet(torch.from_numpy(images.clip(0, 1)), torch.from_numpy(masks),
                       torch.tensor([0] * 4 + [1] * 4), [class_name] * 8)


def installed_package(root: Path, module: str, source: str, dist: str, version: str, entry_points: str,
                      monkeypatch) -> Path:
    """A package as pip leaves it (``module/__init__.py`` holding ``source``, and its dist-info with
    ``entry_points``), written under ``root`` and put on this process's path and, through
    PYTHONPATH, its children's. Returns the module's folder."""
    import os

    from linewatch.scoring.plugins import installed

    package = root / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    installed.cache_clear()  # entry points are read once per process
    return package


# ---- alerts raised from scores: what a sink and its channels must deliver ----------------------------
ALERT_EVENT = "0110000"  # frames 1..2 anomalous: an event opened and closed within seven frames


def scores_of(streams: list[str], events: int) -> list[ScoreMsg]:
    """``events`` events per stream, the streams interleaved frame by frame."""
    per_stream = [[score_msg(i, 0.9 if bit == "1" else 0.1, stream=s) for i, bit in enumerate(ALERT_EVENT * events)]
                  for s in streams]
    return [m for frame in zip(*per_stream) for m in frame]


def expected_alerts(scores: list[ScoreMsg]) -> dict[str, list[tuple[str, str]]]:
    """stream -> its alerts in order, as the sink's tracker (default policy) raises them."""
    tracker, out = AlertTracker(lambda stream: AlertPolicy()), defaultdict(list)
    for score in scores:
        for alert in tracker.push(score):
            out[alert.stream].append((alert.event_id, alert.status))
    return dict(out)


def publish_scores(bus, messages) -> None:
    """Score messages onto the scores topic, keyed by stream."""
    producer = bus.producer()
    for m in messages:
        producer.send(bus.topics.scores, encode(m), key=m.frame.stream.encode())
    producer.close()


def by_stream(rows: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    out = defaultdict(list)
    for event_id, status in rows:
        out[event_id.split(":")[0]].append((event_id, status))
    return dict(out)


def jsonl_rows(path: Path) -> list[tuple[str, str]]:
    """The file's complete lines (the channel may be writing the next one)."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    return [(r["event_id"], r["status"]) for r in map(json.loads, lines)]
