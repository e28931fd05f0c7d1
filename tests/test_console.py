"""The console's server and parts without a browser: who may talk to it (token beyond loopback,
loopback names, JSON-only changes from its own origin), archive files only by id, the store
across restarts, replay compare, the flight exports, the one-action feedback, a stream's lag
and end on the live view, and the favicon."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET

import pytest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import AlertMsg, FrameRef, SessionEnd, Telemetry, encode
from linewatch.cli import main
from linewatch.console.compare import compare
from linewatch.console.service import serve
from linewatch.console.store import ConsoleStore
from linewatch.pipeline.settings import load_settings
from linewatch.sinks.events import AlertPolicy, AlertTracker
from linewatch.sinks.archive import Archive

from helpers import error_line, publish, score_msg, wait_for

TOKEN = "0123456789abcdef0123456789abcdef"


def raw(port: int, path: str, headers: dict | None = None, method: str = "GET", body: bytes | None = None,
        host: str = "127.0.0.1") -> tuple[int, bytes, dict]:
    """One request with ``path`` sent as written (no client-side normalisation of ``..``)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", (headers or {}).pop("Host", f"127.0.0.1:{port}"))
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def event_stream(bus, bits: str, stream: str = "drone-1", session: str = "s1", archive: Archive | None = None):
    """Scores of ``bits`` (1: anomalous) with telemetry, and the alerts an alert sink would raise."""
    producer, tracker = bus.producer(), AlertTracker(lambda s: AlertPolicy(k=2, n=3))
    for seq, bit in enumerate(bits):
        score = score_msg(seq, 0.9 if bit == "1" else 0.1, stream=stream,
                          telemetry=Telemetry(latitude=47.0 + seq * 1e-4, longitude=8.5 + seq * 1e-4, altitude=500))
        score = score.model_copy(update={"frame": score.frame.model_copy(update={"session": session})})
        producer.send(bus.topics.scores, encode(score), key=stream.encode())
        if archive is not None:
            archive.add(score)
        for alert in tracker.push(score):
            producer.send(bus.topics.alerts, encode(alert), key=stream.encode())
    for alert in tracker.end(SessionEnd(stream=stream, session=session, frames=len(bits), ts=5000.0)):
        producer.send(bus.topics.alerts, encode(alert), key=stream.encode())
    producer.flush()  # on Kafka: every record acknowledged before the caller looks for it
    producer.close()


@pytest.fixture
def demo_console(tmp_path):
    """A console on loopback over an in-process bus and a folder archive with one closed event."""
    references = tmp_path / "references"
    references.mkdir()
    settings = load_settings(None, {"archive": str(tmp_path / "archive"), "console": {"port": 0},
                                    "profile": {"references": str(references)}})
    bus, archive = MemoryBus(partitions=1), Archive(tmp_path / "archive")
    server = serve(settings, bus, lambda stream: AlertPolicy(k=2, n=3))
    event_stream(bus, "0011110000100000", archive=archive)  # frame 10: archived, in no event
    wait_for(lambda: server.console.store.events() and server.console.store.events()[0]["status"] == "closed",
             15, "the event in the console")
    yield server, references
    server.stop()
    archive.close()


def test_archive_files_are_served_by_id_only(demo_console):
    server, _ = demo_console
    event = server.console.store.events()[0]
    status, body, headers = raw(server.port, f"/api/events/{event['id']}/frames/{event['peak_seq']}/overlay")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert raw(server.port, f"/api/events/{event['id']}/frames/{event['peak_seq']}/mask")[0] == 200
    for path in ("/../../etc/passwd", "/api/events/../../etc/passwd", "/static/../../../../etc/passwd",
                 "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/api/events/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 f"/api/events/{event['id']}/frames/{event['peak_seq']}/..%2f..%2f..%2fetc%2fpasswd",
                 "/api/events/999/frames/2/overlay",  # unknown event
                 f"/api/events/{event['id']}/frames/10/overlay",  # archived, but not the event's
                 f"/api/events/{event['id']}/frames/{event['peak_seq']}/index.sqlite",  # not a kind
                 "/api/events/999", "/api/flights/999", "/api/flights/999/alerts.kml", "/api/streams/7/tile.jpg"):
        status, body, _ = raw(server.port, path)
        assert status == 404, (path, status)
        assert b"root:" not in body


def test_review_survives_a_restart_and_changes_must_be_json_from_here(demo_console, tmp_path):
    server, _ = demo_console
    event = server.console.store.events()[0]
    path = f"/api/events/{event['id']}/review"
    body = json.dumps({"verdict": "false_alarm", "note": "bird on the crossarm"}).encode()
    assert raw(server.port, path, {"Content-Type": "text/plain"}, "POST", body)[0] == 415  # a form post: refused
    assert raw(server.port, path, {"Content-Type": "application/json", "Origin": "http://evil.example"},
               "POST", body)[0] == 403
    assert raw(server.port, path, {"Content-Type": "application/json", "Host": "evil.example"}, "POST", body)[0] == 403
    assert raw(server.port, path, {"Content-Type": "application/json"}, "POST",
               json.dumps({"verdict": "maybe"}).encode())[0] == 422
    status, _, _ = raw(server.port, path, {"Content-Type": "application/json",
                                           "Origin": f"http://127.0.0.1:{server.port}"}, "POST", body)
    assert status == 200
    settings = server.console.settings
    server.stop()
    again = serve(settings)  # no bus: the archive's index only
    try:
        status, listed, _ = raw(again.port, "/api/events")
        [row] = json.loads(listed)
        assert (row["event_id"], row["verdict"], row["note"]) == (event["event_id"], "false_alarm", "bird on the crossarm")
    finally:
        again.stop()


def test_a_false_alarm_feeds_its_frames_to_the_profile_in_one_action(demo_console):
    server, references = demo_console
    event = server.console.store.events()[0]
    feed = f"/api/events/{event['id']}/feedback"
    json_headers = {"Content-Type": "application/json"}
    status, body, _ = raw(server.port, feed, dict(json_headers), "POST", b'{"target": "references"}')
    assert status == 409 and b"false alarm" in body  # not reviewed yet
    raw(server.port, f"/api/events/{event['id']}/review", dict(json_headers), "POST", b'{"verdict": "false_alarm"}')
    status, body, _ = raw(server.port, feed, dict(json_headers), "POST", b'{"target": "references"}')
    assert status == 200, body
    added = json.loads(body)["added"]
    frames = json.loads(raw(server.port, f"/api/events/{event['id']}")[1])["alert"]["frames"]
    assert sorted(p.name for p in references.iterdir()) == sorted(added) and len(added) == len(frames)
    assert raw(server.port, feed, dict(json_headers), "POST", b'{"target": "calibration"}')[0] == 409  # no such folder


def test_the_console_refuses_requests_without_the_token_beyond_loopback(tmp_path, monkeypatch, capsys):
    (tmp_path / "archive").mkdir()
    code = main(["console", "--archive", str(tmp_path / "archive"), "--host", "0.0.0.0", "--port", "0",
                 "--metrics-port", "off"])
    assert code == 2 and "needs a token" in error_line(capsys)
    settings = load_settings(None, {"archive": str(tmp_path / "archive"),
                                    "console": {"host": "0.0.0.0", "port": 0, "token": TOKEN}})
    server = serve(settings)
    try:
        assert raw(server.port, "/api/events")[0] == 401
        assert raw(server.port, "/")[0] == 401
        assert raw(server.port, "/api/events", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert raw(server.port, "/api/events", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        basic = base64.b64encode(f"operator:{TOKEN}".encode()).decode()
        assert raw(server.port, "/api/events", {"Authorization": f"Basic {basic}"})[0] == 200
        status, _, headers = raw(server.port, f"/?token={TOKEN}")  # a browser's first visit
        assert status == 303 and headers["location"] == "/" and "HttpOnly" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        assert raw(server.port, "/api/events", {"Cookie": cookie})[0] == 200
        assert raw(server.port, "/api/events", {"Host": "console.example:8400", "Cookie": cookie})[0] == 200
        assert raw(server.port, "/../../etc/passwd", {"Authorization": f"Bearer {TOKEN}"})[0] == 404
    finally:
        server.stop()


def test_a_taken_port_is_one_error_line(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["console", "--archive", str(tmp_path), "--port", str(taken.getsockname()[1]),
                     "--metrics-port", "off"])
    assert code == 2 and "cannot serve the console" in error_line(capsys)


def test_store_keeps_the_latest_status_and_is_idempotent(tmp_path):
    store = ConsoleStore(tmp_path / "index.sqlite")
    opened = AlertMsg(event_id="cam@s:3", status="open", stream="cam", start_seq=3, end_seq=4, start_ts=1.0, end_ts=2.0,
                      peak_score=0.9, peak_seq=4, threshold=0.5, frames=[3, 4], method="m", class_name="c")
    closed = opened.model_copy(update={"status": "closed", "end_seq": 8, "frames": [3, 4, 8]})
    first = store.upsert_event(opened)
    assert store.upsert_event(closed) == first and store.upsert_event(opened) == first  # a late open: no change
    [event] = store.events()
    assert (event["status"], event["end_seq"], event["session"]) == ("closed", 8, "s")
    store.review("cam@s:3", "confirmed", "cracked disc")
    store.close()
    again = ConsoleStore(tmp_path / "index.sqlite")
    assert again.events(status="closed")[0]["verdict"] == "confirmed" and again.events(status="open") == []
    with pytest.raises(ValueError):
        again.review("cam@s:3", "maybe", "")


def test_compare_tells_which_events_each_results_topic_raised():
    bus = MemoryBus(partitions=2)
    replay = f"{bus.topics.prefix}.replay.winclip-1"
    bus.ensure_topics([replay])
    producer = bus.producer()

    def scores(topic: str, stream: str, bits: str) -> None:
        for seq, bit in enumerate(bits):
            producer.send(topic, encode(score_msg(seq, 0.9 if bit == "1" else 0.1, stream=stream)), key=stream.encode())
        producer.send(topic, encode(SessionEnd(stream=stream, frames=len(bits), ts=5000.0)), key=stream.encode())

    scores(bus.topics.scores, "a", "0011000000001100")  # two events
    scores(replay, "a", "0001110000000000")  # the first only, found a frame later
    scores(replay, "b", "1100000000")  # one the live method missed
    from linewatch.console.compare import results_topics

    assert results_topics(bus) == [replay, bus.topics.scores]
    result = compare(bus, bus.topics.scores, replay, lambda s: AlertPolicy(k=2, n=3))
    assert result["counts"] == {"a": 2, "b": 2}
    assert [(p["a"]["event_id"], [b["event_id"] for b in p["b"]]) for p in result["both"]] == [("a:2", ["a:3"])]
    assert [e["event_id"] for e in result["only_a"]] == ["a:12"]
    assert [e["event_id"] for e in result["only_b"]] == ["b:0"]


def test_flight_exports_are_valid_geojson_and_kml(demo_console):
    server, _ = demo_console
    [flight] = server.console.store.flights()
    with urllib.request.urlopen(f"{server.url}api/flights/{flight['id']}/alerts.geojson", timeout=10) as response:
        geo = json.load(response)
    kinds = [f["geometry"]["type"] for f in geo["features"]]
    assert kinds == ["LineString", "Point"]
    lon, lat, alt = geo["features"][1]["geometry"]["coordinates"]
    assert (round(lat, 4), round(lon, 4), alt) == (47.0002, 8.5002, 500)  # longitude first (RFC 7946)
    assert geo["features"][1]["properties"]["event_id"] == "drone-1@s1:2"
    with urllib.request.urlopen(f"{server.url}api/flights/{flight['id']}/alerts.kml", timeout=10) as response:
        kml = ET.fromstring(response.read())
    ns = {"k": "http://www.opengis.net/kml/2.2"}
    assert [p.find("k:name", ns).text for p in kml.iter("{http://www.opengis.net/kml/2.2}Placemark")] == \
        ["flight path", "drone-1@s1:2"]


def test_the_live_stream_carries_tiles_and_new_points_only(demo_console):
    server, _ = demo_console
    with urllib.request.urlopen(f"{server.url}api/live?after=3", timeout=10) as response:
        lines = iter(response)
        data = next(line for line in lines if line.startswith(b"data: "))
    update = json.loads(data[len(b"data: "):])
    [stream] = update["streams"]
    assert stream["name"] == "drone-1" and [p[0] for p in stream["points"]] == list(range(4, 17))
    assert stream["latest"]["seq"] == 15 and stream["tile"] == "s1:10"  # the newest frame with an image and a map
    assert raw(server.port, f"/api/streams/{stream['id']}/tile.jpg")[0] == 200
    # a browser reconnecting names the last update it had: it gets only what came after
    request = urllib.request.Request(f"{server.url}api/live", headers={"Last-Event-ID": "12"})
    with urllib.request.urlopen(request, timeout=10) as response:
        lines = iter(response)
        ident = next(line for line in lines if line.startswith(b"id: "))
        data = next(lines)
    assert ident == b"id: 16\n" and [p[0] for p in json.loads(data[6:])["streams"][0]["points"]] == [13, 14, 15, 16]


def test_threads_of_a_stopped_console_end(demo_console):
    server, _ = demo_console
    server.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("console-")]


def test_the_console_reads_kafka_outside_any_group(kafka_servers, tmp_path):
    """On Tansu: scores from before the console started and after are on the timeline, alerts in
    the store, the replay topic offered for compare; the sinks' groups are untouched."""
    from linewatch.pipeline.wiring import connect

    prefix = f"console{time.monotonic_ns()}"
    bus = connect(f"kafka://{kafka_servers}", prefix, 2)
    bus.ensure_topics([f"{prefix}.replay.winclip-1"])
    event_stream(bus, "00111000")
    settings = load_settings(None, {"archive": str(tmp_path), "console": {"port": 0}, "topic_prefix": prefix,
                                    "bootstrap_servers": kafka_servers})
    server = serve(settings, bus, lambda stream: AlertPolicy(k=2, n=3))
    try:
        event_stream(bus, "0000", stream="drone-2")
        wait_for(lambda: [e["status"] for e in server.console.store.events()] == ["closed"], 60, "the alert")
        wait_for(lambda: {s["name"]: len(s["points"]) for s in server.console.live.update(0)["streams"]}
                 == {"drone-1": 8, "drone-2": 4}, 60, "both streams' scores")
        offer = json.loads(raw(server.port, "/api/topics")[1])
        assert offer["topics"] == sorted([f"{prefix}.replay.winclip-1", f"{prefix}.scores"]) and offer["bus"] == "kafka"
        assert offer["replay"].startswith(f"linewatch replay --bootstrap-servers {kafka_servers} --topic-prefix {prefix} ")
    finally:
        server.stop()
        bus.close()


def test_an_s3_archive_serves_the_events_frames_and_keeps_the_reviews_in_the_bucket(s3_server, tmp_path, monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_ACCESS_KEY_ID": s3_server.access_key,
                        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    root = f"s3://{s3_server.bucket}/console-test"
    archive = Archive(root)
    settings = load_settings(None, {"archive": root, "console": {"port": 0, "index": str(tmp_path / "one.sqlite")}})
    bus = MemoryBus(partitions=1)
    server = serve(settings, bus, lambda stream: AlertPolicy(k=2, n=3))
    try:
        event_stream(bus, "0011000000", archive=archive)
        wait_for(lambda: [e["status"] for e in server.console.store.events()] == ["closed"], 30, "the event")
        event = server.console.store.events()[0]
        status, body, headers = raw(server.port, f"/api/events/{event['id']}/frames/{event['peak_seq']}/overlay")
        assert status == 200 and headers["content-type"] == "image/jpeg"
        assert raw(server.port, f"/api/events/{event['id']}/frames/{event['peak_seq']}/../../x")[0] == 404
        raw(server.port, f"/api/events/{event['id']}/review", {"Content-Type": "application/json"}, "POST",
            b'{"verdict": "confirmed", "note": "cracked"}')
    finally:
        server.stop()
    # a console with a new, empty local index (a new pod) finds the review in the bucket
    fresh = serve(load_settings(None, {"archive": root, "console": {"port": 0, "index": str(tmp_path / "two.sqlite")}}))
    try:
        assert [(r["event_id"], r["verdict"], r["note"]) for r in fresh.console.store.reviews()] == \
            [(event["event_id"], "confirmed", "cracked")]
    finally:
        fresh.stop()


def live_stream(server, name: str) -> dict:
    return next((s for s in server.console.live.update(0)["streams"] if s["name"] == name), {})


def test_a_streams_lag_counts_as_the_workers_and_its_end_replaces_rate_and_lag(tmp_path):
    """Lag is one count (``bus.records_behind``): the console's, from the newest score's frame
    offset, equals the worker group's, from its consumer's position, over the same frames."""
    bus = MemoryBus(partitions=1)
    worker = bus.consumer([bus.topics.frames], "linewatch-workers")
    server = serve(load_settings(None, {"console": {"port": 0}}), bus)
    try:
        for seq in range(7):
            publish(bus, "drone-1", seq)
        taken = worker.poll(1.0, 3)  # the worker has taken frames 0..2 of 7
        producer = bus.producer()
        for record in taken:
            score = score_msg(record.offset, stream="drone-1").model_copy(
                update={"frame_ref": FrameRef(topic=record.topic, partition=record.partition, offset=record.offset)})
            producer.send(bus.topics.scores, encode(score), key=b"drone-1")
        wait_for(lambda: live_stream(server, "drone-1").get("lag") == 4, 15, "the lag of 4 frames",
                 lambda: live_stream(server, "drone-1"))
        assert worker.lag() == {(bus.topics.frames, 0): 4}  # what the metric and the summary line report
        assert live_stream(server, "drone-1")["ended"] is None

        at_ms = 1_800_000_000_000
        producer.send(bus.topics.scores, encode(SessionEnd(stream="drone-1", frames=3, ts=1003.0, reason="stopped")),
                      key=b"drone-1", timestamp_ms=at_ms)
        wait_for(lambda: live_stream(server, "drone-1").get("ended"), 15, "the stream's end")
        assert live_stream(server, "drone-1")["ended"] == {"at": at_ms / 1000, "reason": "stopped"}
        # a new session of the stream is live again
        again = score_msg(0, stream="drone-1")
        again = again.model_copy(update={"frame": again.frame.model_copy(update={"session": "s2"})})
        producer.send(bus.topics.scores, encode(again), key=b"drone-1")
        wait_for(lambda: live_stream(server, "drone-1").get("latest", {}).get("session") == "s2", 15, "session s2")
        assert live_stream(server, "drone-1")["ended"] is None
    finally:
        server.stop()
        worker.close()


def test_the_favicon_is_served_and_compare_says_what_it_can_read(tmp_path):
    (tmp_path / "archive").mkdir()
    archive_only = serve(load_settings(None, {"archive": str(tmp_path / "archive"), "console": {"port": 0}}))
    try:
        status, body, headers = raw(archive_only.port, "/favicon.ico")
        assert status == 200 and headers["content-type"] == "image/x-icon" and body[:4] == b"\x00\x00\x01\x00"
        status, body, headers = raw(archive_only.port, "/static/favicon.svg")
        assert status == 200 and headers["content-type"].startswith("image/svg+xml") and b"<svg" in body
        assert b'href="/static/favicon.svg"' in raw(archive_only.port, "/")[1]
        assert json.loads(raw(archive_only.port, "/api/topics")[1]) == \
            {"topics": [], "bus": None, "scores": None, "replay": None}
    finally:
        archive_only.stop()
    embedded = serve(load_settings(None, {"console": {"port": 0}}), MemoryBus())
    try:
        offer = json.loads(raw(embedded.port, "/api/topics")[1])
        assert offer["topics"] == ["linewatch.scores"] and offer["bus"] == "embedded"
        assert offer["replay"] == ("linewatch replay --bootstrap-servers localhost:9094 --method winclip "
                                   "--results-topic linewatch.replay.winclip")
    finally:
        embedded.stop()
