"""Kafka bus through kafka-python: acks=all, idempotent producer, manual commits.

Install ``crc32c`` beside kafka-python (a dependency of linewatch): without it kafka-python
checksums record batches in pure Python, about 20x slower.

Security (``KafkaSecurity``): TLS and SASL settings reach every client, admin, producer and
consumer, through one function, ``KafkaSecurity.client_options``. Topics linewatch creates get
the configured replication factor (default -1: the broker's ``default.replication.factor``)
and, when set, ``min.insync.replicas``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from . import Bus, BusError, Consumer, Producer, Record, Topics, next_offsets

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a 4K JPEG at high quality stays far below this
CONNECT_TIMEOUT_MS = 10_000
# kafka-python's fetch wait (500 ms) is kept on purpose. Apache Kafka answers a held fetch as
# soon as data arrives; Tansu holds it the whole wait, so there a frame reaching an idle worker
# waited up to 156 ms in 8 tries (16 ms with a 100 ms wait). But the idle consumers' empty
# fetches take CPU from the model: with 100 ms, `linewatch bench` put the Kafka pipeline's
# overhead on 2 cores at +7 % (winclip) and +14 % (aprilgan), against +4 % and +10 % with 500 ms.


PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How linewatch's Kafka clients connect: ``protocol`` as Kafka names it; SASL user and
    password (never logged: not in ``repr``, and kafka-python's own logger, which prints its
    configuration at DEBUG, is kept quiet); TLS trust (``ssl_cafile``, default: the system's
    CAs) and a client certificate for mutual TLS. Files are checked at construction, so a
    wrong path fails at start-up with its name."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"kafka security_protocol {self.protocol!r}: use one of {', '.join(PROTOCOLS)}")
        if self.protocol.startswith("SASL_"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(f"kafka security_protocol {self.protocol} needs sasl_mechanism, one of "
                                 f"{', '.join(SASL_MECHANISMS)}")
            if not self.sasl_username or not self.sasl_password:
                raise ValueError(f"kafka security_protocol {self.protocol} needs sasl_username and a password "
                                 "(LINEWATCH_KAFKA__SASL_PASSWORD or kafka.sasl_password_file)")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"kafka {name}: file not found: {path}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("kafka ssl_certfile and ssl_keyfile go together (a client certificate and its key)")

    def client_options(self) -> dict:
        """The keyword arguments every kafka-python client (admin, producer, consumer) gets."""
        options: dict = {"security_protocol": self.protocol}
        if self.protocol.startswith("SASL_"):
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        if self.protocol in ("SSL", "SASL_SSL"):
            options.update(ssl_check_hostname=self.ssl_check_hostname, ssl_cafile=self.ssl_cafile,
                           ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        return options


def _unreachable(servers: str, err: Exception) -> BusError:
    return BusError(f"cannot reach Kafka at {servers}: {err or type(err).__name__} "
                    "(is the broker running, and is --bootstrap-servers right?)")


class KafkaBus(Bus):
    def __init__(self, servers: str, topics: Topics = Topics(), partitions: int = 4,
                 session_timeout_ms: int = 10_000, security: KafkaSecurity = KafkaSecurity(),
                 replication_factor: int = -1, min_insync_replicas: int | None = None):
        super().__init__(topics, partitions)
        self.servers = servers.split(",")
        self.session_timeout_ms = session_timeout_ms
        self.options = {"bootstrap_servers": self.servers, "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS,
                        **security.client_options()}
        if replication_factor == 0 or replication_factor < -1:
            raise ValueError(f"kafka replication_factor {replication_factor}: use -1 (the broker's default) or >= 1")
        self.replication_factor, self.min_insync_replicas = replication_factor, min_insync_replicas
        self.ensure_topics(topics.all())

    def ensure_topics(self, names: list[str], partitions: int | None = None, compact: bool = False) -> None:
        try:
            admin = KafkaAdminClient(client_id="linewatch-admin", **self.options)
        except (KafkaError, OSError) as err:
            raise _unreachable(",".join(self.servers), err) from None
        try:
            existing = set(admin.list_topics())
            # frames and anomalous scores can exceed a broker's default 1 MB message size
            configs = {"max.message.bytes": str(MAX_MESSAGE_BYTES), **({"cleanup.policy": "compact"} if compact else {})}
            if self.min_insync_replicas is not None:  # acks=all needs this many replicas in sync
                configs["min.insync.replicas"] = str(self.min_insync_replicas)
            missing = [NewTopic(n, partitions or self.partitions, self.replication_factor, topic_configs=configs)
                       for n in names if n not in existing]
            if missing:
                try:
                    admin.create_topics(missing)
                except TopicAlreadyExistsError:  # another process won the race
                    pass
        finally:
            admin.close()

    def producer(self) -> Producer:
        return KafkaBusProducer(self)

    def consumer(self, topics: list[str], group: str | None) -> Consumer:
        return KafkaBusConsumer(self, topics, group)

    def topic_names(self) -> list[str]:
        try:
            admin = KafkaAdminClient(client_id="linewatch-admin", **self.options)
        except (KafkaError, OSError) as err:
            raise _unreachable(",".join(self.servers), err) from None
        try:
            return sorted(admin.list_topics())
        finally:
            admin.close()


class KafkaBusProducer(Producer):
    def __init__(self, bus: KafkaBus):
        self.servers = ",".join(bus.servers)
        try:
            self.producer = KafkaProducer(acks="all", enable_idempotence=True, linger_ms=5,
                                          max_request_size=MAX_MESSAGE_BYTES, **bus.options)
        except (KafkaError, OSError) as err:
            raise _unreachable(self.servers, err) from None
        self.pending = []

    def send(self, topic, value, key=None, headers=(), timestamp_ms=None, partition=None) -> None:
        if len(self.pending) >= 1024:  # a long-lived producer (live ingest) must not hoard futures
            self._settle([f for f in self.pending if f.is_done])
            self.pending = [f for f in self.pending if not f.is_done]
        try:
            self.pending.append(self.producer.send(topic, value=value, key=key, headers=list(headers),
                                                   timestamp_ms=timestamp_ms, partition=partition))
        except KafkaError as err:
            raise BusError(f"cannot send to {topic}: {err}") from None

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        try:
            self.producer.flush()
        except KafkaError as err:
            raise BusError(f"Kafka at {self.servers} did not acknowledge a record: {err}") from None
        self._settle(pending)

    def _settle(self, futures) -> None:
        for future in futures:
            if future.failed():
                raise BusError(f"Kafka at {self.servers} did not acknowledge a record: {future.exception}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close()


class KafkaBusConsumer(Consumer):
    def __init__(self, bus: KafkaBus, topics: list[str], group: str | None):
        self.servers = ",".join(bus.servers)
        self.group = group
        self.rebalance = _Assignment()
        try:
            self.consumer = KafkaConsumer(
                group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=bus.session_timeout_ms, heartbeat_interval_ms=1000,
                max_partition_fetch_bytes=MAX_MESSAGE_BYTES, fetch_max_bytes=4 * MAX_MESSAGE_BYTES, **bus.options)
            if group is not None:
                self.consumer.subscribe(topics, listener=self.rebalance)
        except (KafkaError, OSError) as err:
            raise _unreachable(self.servers, err) from None

    def poll(self, timeout_s: float, max_records: int = 64) -> list[Record]:
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [Record(r.topic, r.value, r.key, tuple(r.headers or ()), r.partition, r.offset, r.timestamp)
                for tp in sorted(batches) for r in batches[tp]]

    def commit(self, records: list[Record]) -> None:
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets(records).items()}
        if offsets:
            # CommitFailedError after a rebalance: the new owner re-reads these frames
            # (at-least-once); sinks de-duplicate by (stream, seq).
            try:
                self.consumer.commit(offsets)
            except KafkaError as err:
                log.warning("commit failed (%s); the records will be delivered again", err)

    def partitions(self, topic: str) -> list[int]:
        found = self.consumer.partitions_for_topic(topic)
        if not found:
            raise BusError(f"topic {topic!r} does not exist on {self.servers}")
        return sorted(found)

    def assigned(self) -> bool:
        return self.group is None or self.rebalance.received

    def lag(self) -> dict[tuple[str, int], int] | None:
        """From the high-water marks of the last fetch responses (no extra request). Tansu's
        end offsets are off by up to a batch, so there this is approximate."""
        out = {}
        for tp in sorted(self.consumer.assignment()):
            try:
                end, position = self.consumer.highwater(tp), self.consumer.position(tp, timeout_ms=100)
            except KafkaError:
                continue
            if end is not None and position is not None:
                out[(tp.topic, tp.partition)] = max(0, end - position)
        return out or None

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    def assign(self, topic: str, partitions: list[int]) -> None:
        self.consumer.assign([TopicPartition(topic, p) for p in partitions])

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.consumer.seek(TopicPartition(topic, partition), offset)

    def end_offsets(self, topic: str) -> dict[int, int] | None:
        try:  # Tansu's are off by up to a batch: good enough for where a reader starts
            ends = self.consumer.end_offsets([TopicPartition(topic, p) for p in self.partitions(topic)])
        except KafkaError:
            return None
        return {tp.partition: offset for tp, offset in ends.items()}

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class _Assignment(ConsumerRebalanceListener):
    """Whether the group has given this member its partitions since it joined or last
    rebalanced (called from inside ``poll``, on the polling thread)."""

    def __init__(self):
        self.received = False

    def on_partitions_revoked(self, revoked) -> None:
        self.received = False

    def on_partitions_assigned(self, assigned) -> None:
        self.received = True
