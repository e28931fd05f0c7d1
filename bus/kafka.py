"""Kafka bus through kafka-python: acks=all, idempotent producer, manual commits.

Install ``crc32c`` beside kafka-python (a dependency of linewatch): without it kafka-python
checksums record batches in pure Python, about 20x slower.
"""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
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


def _unreachable(servers: str, err: Exception) -> BusError:
    return BusError(f"cannot reach Kafka at {servers}: {err or type(err).__name__} "
                    "(is the broker running, and is --bootstrap-servers right?)")


class KafkaBus(Bus):
    def __init__(self, servers: str, topics: Topics = Topics(), partitions: int = 4,
                 session_timeout_ms: int = 10_000):
        super().__init__(topics, partitions)
        self.servers = servers.split(",")
        self.session_timeout_ms = session_timeout_ms
        self.ensure_topics(topics.all())

    def ensure_topics(self, names: list[str], partitions: int | None = None, compact: bool = False) -> None:
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.servers, client_id="linewatch-admin",
                                     bootstrap_timeout_ms=CONNECT_TIMEOUT_MS)
        except (KafkaError, OSError) as err:
            raise _unreachable(",".join(self.servers), err) from None
        try:
            existing = set(admin.list_topics())
            # frames and anomalous scores can exceed a broker's default 1 MB message size
            configs = {"max.message.bytes": str(MAX_MESSAGE_BYTES), **({"cleanup.policy": "compact"} if compact else {})}
            missing = [NewTopic(n, partitions or self.partitions, 1, topic_configs=configs)
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


class KafkaBusProducer(Producer):
    def __init__(self, bus: KafkaBus):
        self.servers = ",".join(bus.servers)
        try:
            self.producer = KafkaProducer(
                bootstrap_servers=bus.servers, acks="all", enable_idempotence=True, linger_ms=5,
                max_request_size=MAX_MESSAGE_BYTES, bootstrap_timeout_ms=CONNECT_TIMEOUT_MS)
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
        try:
            self.consumer = KafkaConsumer(
                *(topics if group is not None else ()), bootstrap_servers=bus.servers, group_id=group,
                enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=bus.session_timeout_ms, heartbeat_interval_ms=1000,
                max_partition_fetch_bytes=MAX_MESSAGE_BYTES, fetch_max_bytes=4 * MAX_MESSAGE_BYTES,
                bootstrap_timeout_ms=CONNECT_TIMEOUT_MS)
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

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    def assign(self, topic: str, partitions: list[int]) -> None:
        self.consumer.assign([TopicPartition(topic, p) for p in partitions])

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.consumer.seek(TopicPartition(topic, partition), offset)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
