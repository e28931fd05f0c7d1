"""Operations on the in-process bus: the /metrics /healthz /readyz endpoint, the heartbeat that
fails when a loop is stuck, readiness that waits for the group's assignment, the metrics each
part counts, the worker's summary line and the log formats."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY

from linewatch.bus import Topics
from linewatch.bus.memory import MemoryBus
from linewatch.cli import main
from linewatch.synthetic.demo import write_demo_clip
from linewatch.ops.health import HEALTH, Health
from linewatch.ops.logs import setup_logging
from linewatch.ops.server import OpsServer
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.profiles import ProfileTable, StreamProfile
from linewatch.workers.telemetry import FIRST_BATCH_GRACE_S
from linewatch.workers.worker import ScoringWorker

from helpers import error_line, http_get, publish, wait_for

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def health():
    """The process's Health, emptied around the test (the parts under test report to it)."""
    HEALTH.reset()
    bound = HEALTH.bound_s
    yield HEALTH
    HEALTH.bound_s = bound
    HEALTH.reset()


@pytest.fixture
def server(health):
    with OpsServer("127.0.0.1", 0) as running:
        yield running


def make_worker(bus, tiny, **kwargs):
    worker = ScoringWorker(bus, tiny, ProfileTable(StreamProfile(threshold=0.5)), AnchorCache(), max_batch=4,
                           **kwargs)
    worker.prepare_all()
    return worker


class GatedConsumer:
    """A real in-process consumer whose ``poll`` can be held (a loop stuck on a call) and whose
    group assignment can be withheld (a member still joining)."""

    def __init__(self, consumer):
        self.consumer = consumer
        self.open = threading.Event()
        self.open.set()
        self.held = threading.Event()  # set while a poll is held
        self.assignment_received = True

    def poll(self, timeout_s, max_records=64):
        if not self.open.is_set():
            self.held.set()
            self.open.wait()
            self.held.clear()
        return self.consumer.poll(timeout_s, max_records)

    def assigned(self) -> bool:
        return self.assignment_received

    def __getattr__(self, name):
        return getattr(self.consumer, name)


def test_endpoint_serves_metrics_and_probes(server, health):
    status, text = http_get(f"{server.url}/metrics")
    assert status == 200 and "linewatch_frames_scored_total" in text and "process_cpu_seconds_total" in text
    health.expect("model")
    status, body = http_get(f"{server.url}/readyz")
    assert status == 503 and json.loads(body)["conditions"]["model"] == {"ok": False, "detail": "waiting"}
    health.set("model", True, "tiny")
    assert http_get(f"{server.url}/readyz")[0] == 200
    assert http_get(f"{server.url}/healthz")[0] == 200  # no loop has started: starting up is not a hang
    assert http_get(f"{server.url}/nothing")[0] == 404


def test_the_endpoint_binds_loopback_unless_told(server):
    assert server.host == "127.0.0.1"
    assert server.httpd.server_address[0] == "127.0.0.1"


def test_healthz_fails_while_the_worker_loop_is_stuck(tiny, server, health):
    health.bound_s = 0.3  # the loop must beat at least this often
    bus = MemoryBus(Topics("stuck"))
    worker = make_worker(bus, tiny)
    consumer = GatedConsumer(bus.consumer([bus.topics.frames], worker.group))
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), kwargs={"consumer": consumer}, daemon=True)
    publish(bus, "cam", 0)  # past its first batch, which has a longer grace (compilers, autotuning)
    loop.start()
    try:
        wait_for(lambda: worker.stats.batches == 1, what="the first batch")
        wait_for(lambda: json.loads(http_get(f"{server.url}/healthz")[1])["loops"].get("worker", {}).get("bound_s")
                 == 0.3, what="the worker's heartbeat with the configured bound")
        consumer.open.clear()  # the next poll never returns: the loop is stuck
        wait_for(consumer.held.is_set, what="the loop to block")
        wait_for(lambda: http_get(f"{server.url}/healthz")[0] == 503, what="/healthz to fail")
        body = json.loads(http_get(f"{server.url}/healthz")[1])
        assert body["loops"]["worker"]["alive"] is False
        consumer.open.set()  # unstuck: it beats again
        wait_for(lambda: http_get(f"{server.url}/healthz")[0] == 200, what="/healthz to recover")
    finally:
        consumer.open.set()
        stop.set()
        loop.join(10)
    assert "worker" not in json.loads(http_get(f"{server.url}/healthz")[1])["loops"]  # ended on purpose: not a hang


def test_readyz_waits_for_the_group_assignment(tiny, server, health):
    health.expect("model", "assignment")
    health.set("model", True)
    bus = MemoryBus(Topics("ready"))
    worker = make_worker(bus, tiny)
    consumer = GatedConsumer(bus.consumer([bus.topics.frames], worker.group))
    consumer.assignment_received = False
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), kwargs={"consumer": consumer}, daemon=True)
    loop.start()
    try:
        wait_for(lambda: "worker" in json.loads(http_get(f"{server.url}/healthz")[1])["loops"], what="the loop to run")
        loops = json.loads(http_get(f"{server.url}/healthz")[1])["loops"]
        assert loops["worker"]["bound_s"] == FIRST_BATCH_GRACE_S  # no batch yet: compilers may take minutes
        status, body = http_get(f"{server.url}/readyz")
        assert status == 503
        assert json.loads(body)["conditions"]["assignment"]["detail"] == "waiting for the group to assign partitions"
        consumer.assignment_received = True
        wait_for(lambda: http_get(f"{server.url}/readyz")[0] == 200, what="ready after the assignment")
        consumer.assignment_received = False  # a rebalance takes it away again
        wait_for(lambda: http_get(f"{server.url}/readyz")[0] == 503, what="not ready during a rebalance")
    finally:
        stop.set()
        loop.join(10)


def test_worker_counts_frames_dead_letters_batches_and_lag(tiny, health):
    bus = MemoryBus(Topics("counts"))
    worker = make_worker(bus, tiny)
    before = {name: value(name) for name in ("linewatch_frames_received_total", "linewatch_frames_scored_total",
                                             "linewatch_batch_size_count", "linewatch_end_to_end_seconds_count",
                                             "linewatch_model_seconds_count")}
    bad = {name: value("linewatch_dead_letters_total", stage="worker", reason=name)
           for name in ("undecodable_frame", "bad_header")}
    for seq in range(6):
        publish(bus, "cam", seq)
    publish(bus, "cam", 6, value=b"not a jpeg")
    publish(bus, "cam", 7, meta=b'{"kind": "frame", "v": 99}')
    assert bus.consumer([bus.topics.frames], "look").lag() == {(bus.topics.frames, 0): 8}  # exact in process
    worker.telemetry.lag_every_s = 0  # refresh the lag gauge on every turn
    worker.run(threading.Event(), until_idle_s=0.3)
    assert value("linewatch_frames_received_total") - before["linewatch_frames_received_total"] == 8
    assert value("linewatch_frames_scored_total") - before["linewatch_frames_scored_total"] == 6
    assert value("linewatch_end_to_end_seconds_count") - before["linewatch_end_to_end_seconds_count"] == 6
    assert value("linewatch_batch_size_count") - before["linewatch_batch_size_count"] == worker.stats.batches
    assert value("linewatch_model_seconds_count") > before["linewatch_model_seconds_count"]
    for reason, count in bad.items():
        assert value("linewatch_dead_letters_total", stage="worker", reason=reason) - count == 1
    assert value("linewatch_consumer_lag_records", group=worker.group, topic=bus.topics.frames, partition="0") == 0


def test_summary_line_names_rate_lag_batch_and_percentiles(tiny, health, caplog):
    bus = MemoryBus(Topics("summary"))
    worker = make_worker(bus, tiny)
    for seq in range(5):
        publish(bus, "cam", seq)
    worker.telemetry.lag_every_s = 0
    worker.run(threading.Event(), until_idle_s=0.3)
    with caplog.at_level(logging.INFO, logger="linewatch"):
        text = worker.telemetry.summarise()
    assert "frames/s" in text and "lag 0" in text and "batch " in text and "p50 " in text and " ms p99 " in text
    record = [r for r in caplog.records if "frames/s" in r.getMessage()][-1]
    assert record.summary["frames_per_s"] > 0 and record.summary["p99_ms"] >= record.summary["p50_ms"]
    assert worker.telemetry.summarise().startswith("0.00 frames/s")  # per window: a second summary starts from zero


def test_json_logs_are_one_object_per_line_with_time_and_level():
    stream = io.StringIO()
    setup_logging("json", "info", stream=stream)
    try:
        logging.getLogger("linewatch.test").info("scored %d frames", 3, extra={"summary": {"frames_per_s": 1.5}})
        logging.getLogger("linewatch.test").debug("not at info")
    finally:
        setup_logging("text", "info")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["message"] == "scored 3 frames" and row["level"] == "INFO" and row["logger"] == "linewatch.test"
    assert row["time"].endswith("Z") and row["summary"] == {"frames_per_s": 1.5}


def test_text_logs_have_utc_time_and_level():
    stream = io.StringIO()
    setup_logging("text", "warning", stream=stream, redact=lambda line: line.replace("s3cret", "***"))
    try:
        logging.getLogger("linewatch.test").warning("password s3cret")
    finally:
        setup_logging("text", "info")
    line = stream.getvalue().strip()
    date, level, rest = line.split(" ", 2)
    assert date.endswith("Z") and "T" in date and level == "WARNING" and rest == "linewatch.test: password ***"


def test_embedded_run_counts_every_part(tmp_path, capsys, health):
    """`linewatch run` serves the endpoint too; each part's counters move with the frames."""
    clip = write_demo_clip(tmp_path / "clip", seconds=2, fps=5, size=(160, 96), references=2)
    before = {"scored": value("linewatch_frames_scored_total"),
              "published": value("linewatch_ingest_frames_published_total", stream="d1"),
              "opened": value("linewatch_alerts_total", stream="d1", status="open"),
              "closed": value("linewatch_alerts_total", stream="d1", status="closed"),
              "archived": value("linewatch_archive_writes_total"),
              "alerts_in": value("linewatch_sink_scores_received_total", sink="sink-alerts")}
    code = main(["run", str(clip.video), "--stream-id", "d1", "--out", str(tmp_path / "out"), "--threshold", "0",
                 "--references", str(clip.references[0].parent), "--log-format", "json", *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frames = clip.frame_count
    assert value("linewatch_frames_scored_total") - before["scored"] == frames
    assert value("linewatch_ingest_frames_published_total", stream="d1") - before["published"] == frames
    assert value("linewatch_sink_scores_received_total", sink="sink-alerts") - before["alerts_in"] == frames
    assert value("linewatch_alerts_total", stream="d1", status="open") - before["opened"] == 1
    assert value("linewatch_alerts_total", stream="d1", status="closed") - before["closed"] == 1
    assert value("linewatch_archive_writes_total") - before["archived"] == frames  # threshold 0: all anomalous
    logged = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert any(row["message"].startswith("metrics and health on http://127.0.0.1:") for row in logged)
    assert all({"time", "level", "logger", "message"} <= set(row) for row in logged)


def test_a_taken_metrics_port_is_one_error_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["sink", "alerts", "--metrics-port", str(port)])
    assert code == 2
    assert f"cannot serve metrics and health on 127.0.0.1:{port}" in error_line(capsys)


def test_metrics_port_off_serves_nothing(capsys, monkeypatch, health):
    from linewatch.ops import server as ops_server

    started = []
    monkeypatch.setattr(ops_server.OpsServer, "start", lambda self: started.append(self) or self)
    code = main(["sink", "alerts", "--metrics-port", "off"])
    assert code == 2 and "no Kafka given" in error_line(capsys)  # it got as far as the bus
    assert started == []


def test_readiness_can_watch_another_registry():
    """How an outage registry joins /readyz: a check read at each probe."""
    health, outages = Health(), {}
    health.expect("model")
    health.set("model", True)
    health.watch("outages", lambda: (not outages, outages or "none"))
    assert health.readiness()[0]
    outages["Kafka at k:9092"] = "unreachable"
    ok, body = health.readiness()
    assert not ok and body["conditions"]["outages"] == {"ok": False, "detail": {"Kafka at k:9092": "unreachable"}}
    health.watch("broken", lambda: 1 / 0)
    outages.clear()
    ok, body = health.readiness()
    assert not ok and body["conditions"]["broken"]["detail"].startswith("check failed: ZeroDivisionError")


def test_liveness_bound_is_per_loop():
    now = [0.0]
    health = Health(clock=lambda: now[0])
    health.beat("fast", 1.0)
    health.beat("slow", 10.0)
    now[0] = 5.0
    ok, body = health.liveness()
    assert not ok and body["loops"]["fast"]["alive"] is False and body["loops"]["slow"]["alive"] is True
    health.stop_beating("fast")
    assert health.liveness()[0]



class _Capture:
    """Stands in for cv2.VideoCapture: ``frames`` good reads, then the connection drops."""

    def __init__(self, frames: int):
        self.left = frames

    def read(self):
        self.left -= 1
        return (True, np.zeros((8, 8, 3), np.uint8)) if self.left >= 0 else (False, None)

    def release(self):
        pass


def test_ingest_counts_published_frames_and_reconnects_per_stream(health):
    from linewatch.ingest.publisher import Ingestor
    from linewatch.ingest.sources import Backoff, LiveCapture

    class Camera(LiveCapture):  # 3 frames, a refused reconnect, 2 frames, then gone for good
        def __init__(self):
            self.script = [_Capture(3), None, _Capture(2)]
            super().__init__("rtsp://cam.example/live", "rtsp://cam.example/live", "cam",
                             backoff=Backoff(initial=0.001, cap=0.002, max_retries=1))

        def _open_once(self):
            return self.script.pop(0) if self.script else None

    before = {name: value(name, stream="ops-cam") for name in ("linewatch_ingest_frames_published_total",
                                                                "linewatch_ingest_reconnects_total")}
    stats = Ingestor(Camera(), MemoryBus(Topics("ingest-ops")), stream="ops-cam").run()
    assert stats.published == 5 and stats.error is not None  # it gave up after the second outage
    assert value("linewatch_ingest_frames_published_total", stream="ops-cam") - before[
        "linewatch_ingest_frames_published_total"] == 5
    assert value("linewatch_ingest_reconnects_total", stream="ops-cam") - before["linewatch_ingest_reconnects_total"] == 1
    assert "ingest:ops-cam" not in health.liveness()[1]["loops"]  # it ended: its silence is not a hang


def test_readyz_reports_the_outages_the_parts_ride_out(health):
    """The outage registry of issue 13 (Kafka, S3, the disk) joins /readyz: not ready while a
    part waits for one, ready again once it is back; Redis down only degrades."""
    from linewatch.bus.outages import OUTAGES
    from linewatch.cli.pipeline import _operations
    from linewatch.pipeline.settings import load_settings

    settings = load_settings(None, {"ops": {"port": 0}})
    with _operations(settings) as server:
        assert http_get(f"{server.url}/readyz")[0] == 200
        OUTAGES.down("worker", "Kafka at kafka:9092", "connection refused", "produce")
        status, body = http_get(f"{server.url}/readyz")
        down = json.loads(body)["conditions"]["outages"]
        assert status == 503 and not down["ok"]
        assert down["detail"]["worker"]["down"]["Kafka at kafka:9092"]["reason"] == "connection refused"
        OUTAGES.down("worker", "Redis at redis:6379", "timeout", "anchors", critical=False)
        OUTAGES.up("worker", "Kafka at kafka:9092", "produce")
        assert http_get(f"{server.url}/readyz")[0] == 200  # Redis down degrades, it does not unready
        OUTAGES.up("worker", "Redis at redis:6379", "anchors")


def test_no_summary_line_before_the_first_batch(tiny, health, caplog):
    """A worker with nothing scored yet has no figures: its summary line waits for the first batch
    (every run used to open with `0.00 frames/s, lag 0, batch -, latency p50 -`)."""
    bus = MemoryBus(Topics("quiet"))
    worker = make_worker(bus, tiny)
    worker.telemetry.summary_s = 0.01  # due at every loop turn
    with caplog.at_level(logging.INFO, logger="linewatch"):
        worker.run(threading.Event(), until_idle_s=0.6)  # empty polls only
        assert not [r for r in caplog.records if "frames/s" in r.getMessage()]
        for seq in range(3):
            publish(bus, "cam", seq)
        worker.run(threading.Event(), until_idle_s=0.6)
    lines = [r.getMessage() for r in caplog.records if "frames/s" in r.getMessage()]
    assert lines and "batch -" not in lines[0]
