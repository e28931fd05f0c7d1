"""Kafka and Redis security: TLS (mutual) between every Kafka client and the broker, SASL
settings and topic durability reaching every client, secrets from the environment or a file
and never logged, the anchor cache over rediss:// with a password.

Tansu 0.6 (the broker here) cannot serve TLS or SASL to a client: its ``--cert`` and ``--key``
flags are declared mutually exclusive, so a key cannot be given and the listener stays
plaintext; with ``--authentication`` it rejects every request before SASL, ``tansu user
create`` included, and a user created on a broker without it is not stored (its SCRAM
exchange then answers ``e=unknown-user``). So TLS is tested through a TLS-terminating proxy
in front of Tansu (the real kafka-python TLS stack, mutual TLS), and SASL by recording what
the clients are given."""

from __future__ import annotations

import io
import logging
from typing import ClassVar

import pytest
import torch

from linewatch.bus import BusError, Topics
from linewatch.bus import kafka as kafka_bus
from linewatch.bus.kafka import KafkaBus, KafkaSecurity
from linewatch.ops.logs import setup_logging
from linewatch.pipeline.settings import load_settings
from linewatch.pipeline.wiring import connect, kafka_options, redis_options
from linewatch.scoring.methods import create_method
from linewatch.workers.anchors import AnchorCache

from helpers import wait_for

PASSWORD = "pw-Zq81s3cret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from services import tls_files

    return tls_files(tmp_path_factory.mktemp("tls"))


@pytest.mark.services
def test_every_kafka_client_speaks_mutual_tls(tmp_path, certs):
    from services import TlsProxy, tansu_broker

    proxy = TlsProxy(certs)
    try:
        with tansu_broker(tmp_path, advertised=proxy.address) as plaintext:
            proxy.start(plaintext)
            security = KafkaSecurity("SSL", ssl_cafile=certs.ca, ssl_certfile=certs.client_cert,
                                     ssl_keyfile=certs.client_key)
            bus = KafkaBus(proxy.address, Topics("tls"), 2, session_timeout_ms=6000, security=security)  # admin
            consumer = bus.consumer([bus.topics.scores], "tls-group")
            producer = bus.producer()
            producer.send(bus.topics.scores, b"over tls", key=b"cam")
            producer.flush()
            got = []
            wait_for(lambda: got.extend(consumer.poll(0.5)) or got, timeout_s=60, what="the record over TLS")
            assert got[0].value == b"over tls"
            producer.close()
            consumer.close()
            assert proxy.handshakes >= 3  # admin, producer, consumer (each reaches the broker through TLS)
            # a client without a certificate is refused at the handshake: one clear error
            with pytest.raises(BusError, match="cannot reach Kafka"):
                KafkaBus(proxy.address, Topics("tls2"), security=KafkaSecurity("SSL", ssl_cafile=certs.ca))
    finally:
        proxy.close()


class Recorder:
    """Stands in for one of kafka-python's clients and keeps the options it was given."""

    made: ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, *args, **kwargs):
        Recorder.made.append((type(self).__name__, kwargs))
        self.created = []

    def list_topics(self):
        return []

    def create_topics(self, topics):
        self.created.extend(topics)
        Recorder.made.append(("create_topics", {"topics": topics}))

    def subscribe(self, topics, listener=None):
        pass

    def close(self, *args, **kwargs):
        pass


def test_security_settings_reach_admin_producer_and_consumer(monkeypatch, tmp_path):
    Recorder.made = []
    for name in ("KafkaAdminClient", "KafkaProducer", "KafkaConsumer"):
        monkeypatch.setattr(kafka_bus, name, type(name, (Recorder,), {}))
    password_file = tmp_path / "kafka-password"
    password_file.write_text(PASSWORD + "\n")  # as a mounted Secret holds it
    monkeypatch.setenv("LINEWATCH_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("LINEWATCH_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LINEWATCH_KAFKA__SASL_USERNAME", "linewatch")
    monkeypatch.setenv("LINEWATCH_KAFKA__SASL_PASSWORD_FILE", str(password_file))
    monkeypatch.setenv("LINEWATCH_KAFKA__REPLICATION_FACTOR", "3")
    monkeypatch.setenv("LINEWATCH_KAFKA__MIN_INSYNC_REPLICAS", "2")
    settings = load_settings()
    bus = connect("kafka://broker-1:9093,broker-2:9093", "sec", 6, **kafka_options(settings))
    bus.producer()
    bus.consumer([bus.topics.frames], "linewatch-workers")
    clients = {name: options for name, options in Recorder.made if name.startswith("Kafka")}
    assert set(clients) == {"KafkaAdminClient", "KafkaProducer", "KafkaConsumer"}
    for name, options in clients.items():
        assert options["security_protocol"] == "SASL_SSL", name
        assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["sasl_plain_username"] == "linewatch", name
        assert options["sasl_plain_password"] == PASSWORD, name  # from the file, newline dropped
        assert options["bootstrap_servers"] == ["broker-1:9093", "broker-2:9093"], name
    topics = next(options["topics"] for name, options in Recorder.made if name == "create_topics")
    assert {t.name for t in topics} == set(bus.topics.all())
    assert all(t.replication_factor == 3 and t.topic_configs["min.insync.replicas"] == "2" for t in topics)
    assert PASSWORD not in repr(settings) and PASSWORD not in repr(kafka_options(settings))


def test_topics_default_to_the_brokers_replication_factor(monkeypatch):
    Recorder.made = []
    monkeypatch.setattr(kafka_bus, "KafkaAdminClient", type("KafkaAdminClient", (Recorder,), {}))
    connect("kafka://broker:9092", "durable", 4, **kafka_options(load_settings()))
    topics = next(options["topics"] for name, options in Recorder.made if name == "create_topics")
    assert all(t.replication_factor == -1 and "min.insync.replicas" not in t.topic_configs for t in topics)


def test_security_mistakes_are_named(tmp_path):
    with pytest.raises(ValueError, match="needs sasl_mechanism"):
        KafkaSecurity("SASL_SSL", sasl_username="u", sasl_password="p")
    with pytest.raises(ValueError, match="needs sasl_username and a password"):
        KafkaSecurity("SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u")
    with pytest.raises(ValueError, match="ssl_cafile: file not found"):
        KafkaSecurity("SSL", ssl_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="use -1"):
        KafkaBus("broker:9092", replication_factor=0)
    settings = load_settings(overrides={"kafka": {"sasl_password_file": str(tmp_path / "nothing")}})
    with pytest.raises(ValueError, match="kafka.sasl_password_file: cannot read"):
        kafka_options(settings)


@pytest.mark.services
def test_the_sasl_password_is_never_logged(kafka_servers, capsys):
    """kafka-python prints its whole configuration at DEBUG; linewatch at --log-level debug
    still keeps that logger quiet, and its own error names the broker, not the password."""
    stream = io.StringIO()
    setup_logging("text", "debug", stream=stream)
    try:
        logging.getLogger("kafka").debug("config: sasl_plain_password=%s", PASSWORD)  # what kafka-python does
        security = KafkaSecurity("SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="linewatch",
                                 sasl_password=PASSWORD)
        with pytest.raises(BusError) as failure:  # Tansu without --authentication refuses SASL
            KafkaBus(kafka_servers, Topics("sasl"), security=security)
    finally:
        setup_logging("text", "info")
    assert PASSWORD not in str(failure.value) and PASSWORD not in repr(security)
    assert PASSWORD not in stream.getvalue() + capsys.readouterr().err


@pytest.mark.services
def test_topics_get_the_configured_replication_factor(kafka_servers):
    from kafka import KafkaAdminClient

    KafkaBus(kafka_servers, Topics("rf2"), 2, replication_factor=2, min_insync_replicas=1)
    admin = KafkaAdminClient(bootstrap_servers=kafka_servers)
    try:
        described = admin.describe_topics(["rf2.frames"])[0]
    finally:
        admin.close()
    # Tansu has one broker and records the factor it was asked for (it does not return topic configs)
    assert all(len(p["replica_nodes"]) == 2 for p in described["partitions"])


def _anchors(tiny):
    method = create_method("aprilgan", tiny)
    return method.anchor_key("insulator"), lambda: method.build_anchors("insulator")


@pytest.mark.services
def test_anchor_cache_over_tls_with_a_password(tiny, tmp_path, certs, caplog):
    from services import redis_server

    with redis_server(tmp_path, password=PASSWORD, tls=certs) as url:
        plain_url = url.replace(f":{PASSWORD}@", "")
        assert plain_url.startswith("rediss://127.0.0.1:")
        settings = load_settings(overrides={"redis_url": plain_url, "redis": {
            "password": PASSWORD, "ssl_ca_file": certs.ca, "ssl_certfile": certs.client_cert,
            "ssl_keyfile": certs.client_key}})
        key, build = _anchors(tiny)
        first = AnchorCache(settings.redis_url, redis_options=redis_options(settings))
        built = first.get(key, build)
        assert first.stats == {**first.stats, "computed": 1, "redis_errors": 0}
        second = AnchorCache(settings.redis_url, redis_options=redis_options(settings))
        fetched = second.get(key, lambda: pytest.fail("the anchors must come from Redis"))
        assert second.stats["redis_hits"] == 1 and torch.equal(fetched.normal, built.normal)

        # the password in the URL works the same; a wrong one is an outage said once, without the secret
        in_url = AnchorCache(url, redis_options={k: v for k, v in redis_options(settings).items() if k != "password"})
        assert in_url.get(key, lambda: pytest.fail("from Redis")).key == key
        wrong = AnchorCache(url.replace(PASSWORD, "wrong-password"),
                            redis_options={k: v for k, v in redis_options(settings).items() if k != "password"})
        with caplog.at_level(logging.WARNING, logger="linewatch"):
            assert wrong.get(key, build).key == key
        assert wrong.stats["redis_errors"] >= 1 and wrong.stats["computed"] == 1
        warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
        where = plain_url.removeprefix("rediss://")  # host:port/db; the credentials show as ***
        assert len(warnings) == 1 and "wrong-password" not in warnings[0] and f":***@{where}" in warnings[0]


def test_redis_tls_files_need_a_rediss_url(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    settings = load_settings(overrides={"redis_url": "redis://cache:6379/0", "redis": {"ssl_ca_file": str(ca)}})
    with pytest.raises(ValueError, match="not rediss://"):
        redis_options(settings)
