"""Kafka bus through kafka-python: acks=all, idempotent producer, manual commits.

Install ``crc32c`` beside kafka-python (a dependency of linewatch): without it kafka-python
checksums record batches in pure Python, about 20x slower.

Security (``KafkaSecurity``): TLS and SASL settings reach every client, admin, producer and
consumer, through one function, ``KafkaSecurity.client_options``. Topics linewatch creates get
the configured replication factor (default -1: the broker's ``default.replication.factor``)
and, when set, ``min.insync.replicas``.
Outages (the broker down, restarting, unreachable) are ridden out here, for every part
alike: a send waits while the broker takes nothing, a flush waits for the acknowledgements
(records never expire in the producer), a commit is retried, a poll that fails returns
nothing; each outage is reported to ``health.OUTAGES`` (one warning when it begins, one line
when it ends) under the bus's ``part`` name. ``stop`` (the process's SIGTERM event) ends any
such wait within about a second with ``StopRequested``: what was not acknowledged is not
committed. Only the first connection fails at once (a wrong address is a user's mistake).

A broker that comes back without its state (in-memory storage, a rebuilt cluster, a topic
deleted and re-created) is ridden out too: a producer the broker no longer knows is replaced
and what it had not got acknowledged is sent again (downstream de-duplicates by stream,
session and seq); records acknowledged by the old broker whose offsets the new log hands out
again are counted as lost (``Producer.lost``) and said once; a consumer whose position lies
beyond its partition's end (as the last fetch reported it) starts the partition again from
the earliest offset and says how many records of the old log it had not read (``lost``);
topics that vanished are re-created with the bus's settings (clients never auto-create them,
which would give them the broker's defaults).
"""

from __future__ import annotations

from array import array
import bisect
import logging
from dataclasses import dataclass, field
from pathlib import Path
import threading
import time

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    CommitFailedError,
    InvalidProducerEpochError,
    InvalidProducerIdMappingError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumberError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
    UnknownProducerIdError,
)
from kafka.structs import OffsetAndMetadata

from . import (
    MAX_MESSAGE_BYTES,
    Bus,
    BusError,
    Consumer,
    Producer,
    Record,
    RecordTooLarge,
    Topics,
    check_size,
    next_offsets,
    records_behind,
)
from .outages import OUTAGES, SERVICE_BACKOFF, StopRequested, describe

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_MS = 10_000
WAIT_STEP_S = 1.0  # how long one blocking call may take before a stop is looked at again
PATIENCE_S = 5.0  # unacknowledged for this long, or no group coordinator: the broker is down
NEVER_MS = 2 ** 31 - 1  # records wait in the producer through any outage (the caller decides when to give up)
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# the broker does not know this producer (any more): it lost its state, or expired ours
PRODUCER_STATE = (UnknownProducerIdError, OutOfOrderSequenceNumberError, InvalidProducerEpochError,
                  InvalidProducerIdMappingError)
ACKED_KEPT = 100_000  # acknowledged offsets remembered per partition (to count what a broker loses)
TOPICS_CHECK_S = 5.0  # vanished topics are looked for at most this often
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
    """``part`` names the process part in outage reports; ``stop`` (default: never) ends any
    wait for the broker with StopRequested."""

    def __init__(self, servers: str, topics: Topics = Topics(), partitions: int = 4,
                 session_timeout_ms: int = 10_000, *, security: KafkaSecurity = KafkaSecurity(),
                 replication_factor: int = -1, min_insync_replicas: int | None = None, part: str = "linewatch",
                 stop: threading.Event | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        super().__init__(topics, partitions, max_message_bytes)
        self.servers = servers.split(",")
        self.session_timeout_ms = session_timeout_ms
        self.options = {"bootstrap_servers": self.servers, "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS,
                        **security.client_options()}
        if replication_factor == 0 or replication_factor < -1:
            raise ValueError(f"kafka replication_factor {replication_factor}: use -1 (the broker's default) or >= 1")
        self.replication_factor, self.min_insync_replicas = replication_factor, min_insync_replicas
        self.part, self.stop = part, stop or threading.Event()
        self.dependency = f"Kafka at {servers}"
        OUTAGES.register(part)
        self.ensured: dict[str, tuple[int | None, bool]] = {}  # topic -> (partitions, compact), to re-create
        self.topics_lock, self.topics_checked = threading.Lock(), 0.0
        self.ensure_topics(topics.all())

    def ensure_topics(self, names: list[str], partitions: int | None = None, compact: bool = False) -> None:
        self._create_missing(names, partitions, compact)
        self.ensured.update({name: (partitions, compact) for name in names})

    def restore_topics(self) -> bool:
        """Re-create the topics this bus made sure of that the broker no longer has (it came
        back empty, or they were deleted); at most every TOPICS_CHECK_S, errors ignored (the
        broker may still be away: the caller's outage handling goes on). Whether it looked."""
        with self.topics_lock:
            if time.monotonic() - self.topics_checked < TOPICS_CHECK_S:
                return False
            self.topics_checked = time.monotonic()
            try:
                # a broker that auto-creates topics (Tansu does, whatever the client asks) may have
                # made some with its default count: the ones made here follow, so that a topic
                # partitioned like another (the alert sink's state) still has a partition for each
                widest = max(self._partition_counts().values(), default=0)
                for (partitions, compact), names in _grouped(self.ensured).items():
                    created = self._create_missing(names, max(partitions or self.partitions, widest), compact)
                    if created:
                        log.warning("%s: topic(s) %s had vanished from %s; re-created", self.part,
                                    ", ".join(created), self.dependency)
            except (BusError, KafkaError, OSError) as err:
                log.debug("topics not checked: %s", err)
                return False
            return True

    def _partition_counts(self) -> dict[str, int]:
        """Partitions of each topic of this bus the broker has now."""
        admin = KafkaAdminClient(client_id="linewatch-admin", **self.options)
        try:
            names = sorted(set(self.ensured) & set(admin.list_topics()))
            return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)} if names else {}
        finally:
            admin.close()

    def _create_missing(self, names: list[str], partitions: int | None, compact: bool) -> list[str]:
        try:
            admin = KafkaAdminClient(client_id="linewatch-admin", **self.options)
        except (KafkaError, OSError) as err:
            raise _unreachable(",".join(self.servers), err) from None
        try:
            existing = set(admin.list_topics())
            # frames and anomalous scores can exceed a broker's default 1 MB message size
            configs = {"max.message.bytes": str(self.max_message_bytes),
                       **({"cleanup.policy": "compact"} if compact else {})}
            if self.min_insync_replicas is not None:  # acks=all needs this many replicas in sync
                configs["min.insync.replicas"] = str(self.min_insync_replicas)
            missing = [NewTopic(n, partitions or self.partitions, self.replication_factor, topic_configs=configs)
                       for n in names if n not in existing]
            if missing:
                try:
                    admin.create_topics(missing)
                except TopicAlreadyExistsError:  # another process won the race
                    pass
            return [topic.name for topic in missing]
        finally:
            admin.close()

    def producer(self) -> Producer:
        return KafkaBusProducer(self)

    def consumer(self, topics: list[str], group: str | None) -> Consumer:
        return KafkaBusConsumer(self, topics, group)

    def end_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Where each partition's log ends now (0 for one that no longer exists); {} when the
        broker cannot say. (Tansu's are off by up to a batch.)"""
        if not partitions:
            return {}
        try:
            reader = KafkaConsumer(allow_auto_create_topics=False, **self.options)
        except (KafkaError, OSError) as err:
            log.debug("end offsets not read: %s", err)
            return {}
        try:
            known = {topic: reader.partitions_for_topic(topic) or set() for topic, _ in partitions}
            asked = [TopicPartition(t, p) for t, p in partitions if p in known[t]]
            ends = reader.end_offsets(asked) if asked else {}
            return {(t, p): ends.get(TopicPartition(t, p), 0) for t, p in partitions}
        except KafkaError as err:
            log.debug("end offsets not read: %s", err)
            return {}
        finally:
            reader.close()

    def topic_names(self) -> list[str]:
        try:
            admin = KafkaAdminClient(client_id="linewatch-admin", **self.options)
        except (KafkaError, OSError) as err:
            raise _unreachable(",".join(self.servers), err) from None
        try:
            return sorted(admin.list_topics())
        finally:
            admin.close()


def _forgets_producer(err: BaseException | None) -> bool:
    """The broker does not know the producer (any more), or could not give it a new id or
    epoch (Tansu answers kafka-python's epoch bump after its restart with UnknownError)."""
    return isinstance(err, PRODUCER_STATE) or "InitProducerId" in str(err)


def _grouped(ensured: dict[str, tuple[int | None, bool]]) -> dict[tuple[int | None, bool], list[str]]:
    groups: dict[tuple[int | None, bool], list[str]] = {}
    for name, settings in ensured.items():
        groups.setdefault(settings, []).append(name)
    return groups


class KafkaBusProducer(Producer):
    def __init__(self, bus: KafkaBus):
        self.bus, self.servers = bus, ",".join(bus.servers)
        try:
            self.producer = self._new_producer()
        except (KafkaError, OSError) as err:
            raise _unreachable(self.servers, err) from None
        self.pending: list[tuple] = []  # (future, send arguments): sent again if the broker forgets this producer
        # acknowledgements, watched from the producer's thread: records waiting PATIENCE_S with
        # none acknowledged is an outage (said at the next send or flush), the next one its end
        self.lock = threading.Lock()
        self.in_flight, self.progress_at = 0, time.monotonic()
        self.failures = False  # a record failed: looked at before the next send
        self.acked: dict[tuple[str, int], array] = {}  # offsets acknowledged, per partition, ascending
        self.generation = 0  # which KafkaProducer the callbacks are about (a new one when the broker forgets this one)
        self.dropped = 0  # records dropped unacknowledged at a stop
        self.lost = 0  # records acknowledged, then lost with the broker

    def _new_producer(self) -> KafkaProducer:
        return KafkaProducer(
            acks="all", enable_idempotence=True, linger_ms=5, max_request_size=self.bus.max_message_bytes,
            max_block_ms=int(WAIT_STEP_S * 1000), delivery_timeout_ms=NEVER_MS, allow_auto_create_topics=False,
            **self.bus.options)

    def _acknowledged(self, generation: int, metadata) -> None:
        if generation != self.generation:
            return
        with self.lock:
            self.in_flight -= 1
            self.progress_at = time.monotonic()
            lost = self._count_lost((metadata.topic, metadata.partition), metadata.offset)
        if lost:
            self._say_lost(metadata.topic, metadata.partition, lost)
        OUTAGES.up(self.bus.part, self.bus.dependency, "produce")

    def _count_lost_at_ends(self) -> None:
        """The broker forgot this producer: what it had acknowledged at or beyond each partition's
        end now is lost (a topic re-created with another partition count sends a stream's next
        records elsewhere, so waiting for an offset handed out again is not enough)."""
        ends = self.bus.end_offsets([tp for tp, offsets in self.acked.items() if offsets])
        with self.lock:
            for (topic, partition), end in ends.items():
                lost = self._count_lost((topic, partition), end, keep=False)
                if lost:
                    self._say_lost(topic, partition, lost)

    def _say_lost(self, topic: str, partition: int, lost: int) -> None:
        log.warning("%s: %s acknowledged %d record(s) on %s[%d] that it no longer has (it restarted empty, or the "
                    "topic was re-created): they are lost with the broker", self.bus.part, self.bus.dependency, lost,
                    topic, partition)

    def _count_lost(self, tp: tuple[str, int], offset: int, keep: bool = True) -> int:
        """An offset handed out again means the log lost what this producer had at and after it."""
        if offset < 0:  # no offset known (not an acks=all answer)
            return 0
        offsets = self.acked.setdefault(tp, array("q"))  # 8 bytes an offset
        lost = 0
        if offsets and offset <= offsets[-1]:
            at = bisect.bisect_left(offsets, offset)
            lost = len(offsets) - at
            del offsets[at:]
            self.lost += lost
        if keep:
            offsets.append(offset)
        if len(offsets) > 2 * ACKED_KEPT:
            del offsets[:-ACKED_KEPT]
        return lost

    def _failed(self, generation: int, _error) -> None:  # settled by the next send or flush (or dropped at a stop)
        if generation != self.generation:
            return
        with self.lock:
            self.in_flight -= 1
            self.failures = True

    def _stalled(self) -> bool:
        return self._idle_for(PATIENCE_S)

    def _idle_for(self, seconds: float) -> bool:
        """Records wait and none was acknowledged for ``seconds``."""
        with self.lock:
            return self.in_flight > 0 and time.monotonic() - self.progress_at >= seconds

    def send(self, topic, value, key=None, headers=(), timestamp_ms=None, partition=None) -> None:
        check_size(self.bus.max_message_bytes, topic, value, key, headers)
        if self.failures or self._forgotten():
            self._settle_failures()
        if len(self.pending) >= 1024:  # a long-lived producer (live ingest) must not hoard futures
            self._settle([f for f, _ in self.pending if f.is_done])
            self.pending = [(f, args) for f, args in self.pending if not f.is_done]
        if self._stalled():
            OUTAGES.down(self.bus.part, self.bus.dependency, f"nothing acknowledged for {PATIENCE_S:.0f} s", "produce")
        self._send((topic, value, key, list(headers), timestamp_ms, partition))

    def _send(self, args: tuple) -> None:
        topic, value, key, headers, timestamp_ms, partition = args
        attempt = 0
        while True:
            try:
                future = self.producer.send(topic, value=value, key=key, headers=headers,
                                            timestamp_ms=timestamp_ms, partition=partition)
                with self.lock:
                    if self.in_flight == 0:
                        self.progress_at = time.monotonic()
                    self.in_flight += 1
                future.add_callback(self._acknowledged, self.generation)
                future.add_errback(self._failed, self.generation)
                self.pending.append((future, args))
                return
            except KafkaTimeoutError as err:  # no metadata, or the buffer is full: the broker takes nothing
                self._waiting(err, attempt)
                attempt += 1
                self.bus.restore_topics()  # no metadata: the topic may have vanished with the broker's state
            except TOO_LARGE as err:
                raise RecordTooLarge(f"record for {topic} too large: {err}") from None
            except KafkaError as err:
                if not (self._forgotten() or _forgets_producer(err)):
                    raise BusError(f"cannot send to {topic}: {describe(err)}") from None
                self._settle_failures(err)

    def flush(self) -> None:
        while True:
            try:
                if self.failures or self._forgotten():
                    self._settle_failures()
                self.producer.flush(timeout=WAIT_STEP_S)
                if self.failures:  # a record failed while flushing: settled (or sent again) above
                    continue
                break
            except KafkaTimeoutError as err:
                if self._stalled():
                    OUTAGES.down(self.bus.part, self.bus.dependency, f"records not acknowledged ({describe(err)})",
                                "produce")
                if self.bus.stop.is_set() and self._idle_for(2 * WAIT_STEP_S):  # flushes what it can
                    self._stopping("stopped with records not yet acknowledged")
            except KafkaError as err:
                if not (self._forgotten() or _forgets_producer(err)):
                    raise BusError(f"Kafka at {self.servers} did not acknowledge a record: {describe(err)}") from None
                self._settle_failures(err)
        pending, self.pending = self.pending, []
        self._settle([f for f, _ in pending])

    def _forgotten(self) -> bool:
        """The producer can send nothing more: the broker lost its producer state and kafka-python
        could not take a new producer id (Tansu answers its epoch bump with UnknownError)."""
        try:
            return self.producer._transaction_manager.has_error()
        except AttributeError:  # another kafka-python: failed records show the state errors
            return False

    def _settle_failures(self, error: KafkaError | None = None) -> None:
        """Failed records: too large or refused, raised as before; failed because the broker does
        not know this producer (any more): a new producer sends every record not acknowledged
        again, in order (downstream de-duplicates what had arrived after all)."""
        with self.lock:
            self.failures = False
        failed = [f for f, _ in self.pending if f.is_done and f.failed()]
        state = [f for f in failed if _forgets_producer(f.exception)]
        if not state and error is None and not self._forgotten():
            self._settle(failed)
            self.pending = [(f, args) for f, args in self.pending if not f.is_done]
            return
        reason = describe(error or (state[0].exception if state else self.producer._transaction_manager.last_error)
                          or KafkaError("producer in error state"))
        self._settle([f for f in failed if f not in state])
        again = [args for f, args in self.pending if not (f.is_done and f.succeeded())]
        old, self.generation = self.producer, self.generation + 1  # the old one's callbacks count no more
        self._drop()  # its unsent records fail: sent again below
        try:
            old.close(timeout=0)
        except KafkaError as err:
            log.debug("producer close: %s", err)
        with self.lock:
            self.in_flight, self.failures = 0, False
        log.warning("%s: %s no longer knows this producer (%s; did it lose its state?): starting a new one and "
                    "sending the %d record(s) not acknowledged again", self.bus.part, self.bus.dependency, reason,
                    len(again))
        self.bus.restore_topics()  # before the new producer's first request (Tansu would create them with its defaults)
        self._count_lost_at_ends()
        attempt = 0
        while True:
            try:
                self.producer = self._new_producer()
                break
            except (KafkaError, OSError) as err:
                self._waiting(err, attempt)
                attempt += 1
        for args in again:
            self._send(args)

    def _waiting(self, err: Exception, attempt: int) -> None:
        OUTAGES.down(self.bus.part, self.bus.dependency, f"records not taken ({describe(err)})", "produce")
        if self.bus.stop.is_set() or self.bus.stop.wait(SERVICE_BACKOFF.delay(attempt)):
            self._stopping("stopped while Kafka was unavailable")

    def _stopping(self, why: str) -> None:
        """StopRequested, the unacknowledged records dropped first (kafka-python would otherwise
        print tracebacks at exit trying to flush them)."""
        dropped = self._drop()
        log.warning("%s: %s; %d record(s) not acknowledged by Kafka are dropped", self.bus.part, why, dropped)
        self.dropped += dropped
        raise StopRequested(why)

    def _settle(self, futures) -> None:
        for future in futures:
            if future.failed():
                if isinstance(future.exception, TOO_LARGE):
                    raise RecordTooLarge(f"Kafka at {self.servers} refused a record as too large: {future.exception}")
                raise BusError(f"Kafka at {self.servers} did not acknowledge a record: {describe(future.exception)}")

    def close(self) -> int:
        """Flush, then close; when that cannot finish (a stop during an outage), drop what is
        unacknowledged quietly (no kafka-python traceback at exit) and say how many."""
        try:
            self.flush()
        except StopRequested:
            pass
        except BusError as err:
            dropped = self._drop()
            log.warning("%s: closing with %d record(s) not acknowledged by Kafka (%s)", self.bus.part, dropped, err)
            self.dropped += dropped
        try:
            self.producer.close(timeout=0)
        except KafkaError as err:
            log.debug("producer close: %s", err)
        return self.dropped

    def _drop(self) -> int:
        dropped = sum(not future.is_done for future, _ in self.pending)
        try:
            self.producer._sender.force_close()
            self.producer._accumulator.abort_incomplete_batches()
        except AttributeError:  # another kafka-python: its close may then wait out its own timeout
            pass
        self.pending = []
        return dropped


class KafkaBusConsumer(Consumer):
    def __init__(self, bus: KafkaBus, topics: list[str], group: str | None):
        self.bus, self.servers, self.group = bus, ",".join(bus.servers), group
        self.rebalance = _Assignment()
        try:
            self.consumer = KafkaConsumer(
                group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=bus.session_timeout_ms, heartbeat_interval_ms=1000,
                max_partition_fetch_bytes=bus.max_message_bytes, fetch_max_bytes=4 * bus.max_message_bytes,
                allow_auto_create_topics=False, **bus.options)
            if group is not None:
                self.consumer.subscribe(topics, listener=self.rebalance)
        except (KafkaError, OSError) as err:
            raise _unreachable(self.servers, err) from None
        self.coordinator_lost: float | None = None  # monotonic time the group coordinator went missing
        self.polled_at = time.monotonic()
        self.disturbed = False  # the broker went away: once it answers again, vanished topics are re-created
        self.ends: dict[TopicPartition, int] = {}  # the highest end (high-water mark) each partition had
        self.reach: dict[TopicPartition, int] = {}  # the furthest position this consumer had in each partition
        self.committed: dict[TopicPartition, int] = {}  # the offsets this consumer committed last
        self.recheck = False  # after an outage: are the group's committed offsets still there?
        self.lost = 0  # records never read: the broker came back without them

    def poll(self, timeout_s: float, max_records: int = 64) -> list[Record]:
        try:
            batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as err:  # a connection error surfacing here: nothing read, try again later
            OUTAGES.down(self.bus.part, self.bus.dependency, describe(err), "consume")
            self.disturbed = True
            self.bus.stop.wait(min(timeout_s, WAIT_STEP_S))
            return []
        self._watch_coordinator()
        self._recheck()
        records = [Record(r.topic, r.value, r.key, tuple(r.headers or ()), r.partition, r.offset, r.timestamp)
                   for tp in sorted(batches) for r in batches[tp]]
        self._check_positions()
        return records

    def _recheck(self) -> None:
        """After the coordinator went missing: once it is back, re-create vanished topics and
        see whether the group's committed offsets survived."""
        if self.disturbed and not self.coordinator_lost:
            self.disturbed = not self.bus.restore_topics()
            self.recheck = True
        if self.recheck and self.assigned() and self.consumer.assignment() and not self.coordinator_lost:
            self.recheck = False
            self._check_committed()

    def _check_committed(self) -> None:
        """After an outage: a group whose committed offsets are gone (or went back) lives on a
        broker that lost its state; its log went with it, whatever the new one's end says."""
        for tp in self.consumer.assignment():
            ours = self.committed.get(tp)
            if not ours:
                continue
            try:
                theirs = self.consumer.committed(tp, timeout_ms=int(WAIT_STEP_S * 1000))
            except KafkaError:
                self.recheck = True  # not known yet: next poll
                return
            if theirs is not None and theirs >= ours:
                continue
            unread = max(0, self.ends.get(tp, ours) - self.reach.get(tp, ours))
            self.lost += unread
            self.reach[tp], self.ends[tp] = 0, 0
            del self.committed[tp]
            self.consumer.seek_to_beginning(tp)
            log.warning("%s: the group's committed offset on %s[%d] (%d) is gone from %s: the broker came back without "
                        "its state; reading the partition from its earliest offset; %d record(s) of the old log were "
                        "never read and are lost (%d in all)", self.bus.part, tp.topic, tp.partition, ours,
                        self.bus.dependency, unread, self.lost)

    def _check_positions(self) -> None:
        """A partition's end (as the last fetch reported it) below where this consumer had read
        to is a log the broker no longer has (it came back empty, or the topic was re-created):
        say so once, with the records of the old log never read, and go on from the earliest
        offset. Tansu answers a fetch beyond the end with an empty batch, not OffsetOutOfRange,
        so a position there would wait forever; a group that lost its committed offsets with
        the broker starts at the earliest offset by itself."""
        for tp in self.consumer.assignment():
            try:
                state = self.consumer._subscription.assignment[tp]
                position = state.position.offset if state.has_valid_position else None
            except (AttributeError, KeyError):  # another kafka-python, or a rebalance meanwhile
                continue
            end = self.consumer.highwater(tp)
            if position is None or end is None:
                continue
            reach = self.reach.get(tp, 0)
            if end >= reach:
                self.reach[tp], self.ends[tp] = max(reach, position), max(end, self.ends.get(tp, 0))
                continue
            unread = max(0, self.ends.get(tp, reach) - reach)
            self.lost += unread
            self.reach[tp], self.ends[tp] = min(position, end), end
            if position > end:
                self.consumer.seek_to_beginning(tp)
            log.warning("%s: %s[%d] ends at %d at %s, below offset %d this consumer had read to: the broker came back "
                        "without its log, or the topic was re-created; reading the partition from %s; %d record(s) "
                        "of the old log were never read and are lost (%d in all)", self.bus.part, tp.topic,
                        tp.partition, end, self.bus.dependency, reach,
                        "its earliest offset" if position > end else f"offset {position}", unread, self.lost)

    def _watch_coordinator(self) -> None:
        """A group member without a coordinator for PATIENCE_S of polls cannot commit: the broker
        is down. (Polls far apart prove nothing: the coordinator is found again by polling.)"""
        now, last, self.polled_at = time.monotonic(), self.polled_at, time.monotonic()
        if self.group is None:
            return
        try:
            lost = self.consumer._coordinator.coordinator_unknown()
        except AttributeError:  # another kafka-python: outages show through poll and commit only
            return
        if not lost:
            self.coordinator_lost = None
            OUTAGES.up(self.bus.part, self.bus.dependency, "consume")
        elif self.coordinator_lost is None or now - last > 2 * WAIT_STEP_S:
            self.coordinator_lost = now
            self.disturbed = True  # the coordinator may come back as a broker without our topics or offsets
        elif time.monotonic() - self.coordinator_lost >= PATIENCE_S:
            OUTAGES.down(self.bus.part, self.bus.dependency, "no group coordinator (broker down?)", "consume")

    def commit(self, records: list[Record]) -> None:
        if self.recheck or self.disturbed:  # before our own commit could hide that the group's offsets are gone
            self._recheck()
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets(records).items()}
        attempt = 0
        while offsets:
            try:
                self.consumer.commit(offsets, timeout_ms=int(WAIT_STEP_S * 1000))
                self.committed.update({tp: meta.offset for tp, meta in offsets.items()})
                OUTAGES.up(self.bus.part, self.bus.dependency, "consume")
                return
            except CommitFailedError as err:
                # after a rebalance: the new owner re-reads these records (at-least-once); sinks
                # de-duplicate by (stream, seq)
                log.warning("commit failed (%s); the records will be delivered again", describe(err))
                return
            except KafkaError as err:
                retriable = isinstance(err, KafkaTimeoutError) or getattr(err, "retriable", False)
                if not retriable:
                    log.warning("commit failed (%s); the records will be delivered again", describe(err))
                    return
                OUTAGES.down(self.bus.part, self.bus.dependency, f"cannot commit ({describe(err)})", "consume")
                if self.bus.stop.is_set() or self.bus.stop.wait(SERVICE_BACKOFF.delay(attempt)):
                    raise StopRequested("stopped before the commit went through") from None
                attempt += 1

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
                out[(tp.topic, tp.partition)] = records_behind(end, position)
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
        try:  # leaving the group waits for a broker that may be gone: briefly
            self.consumer.close(autocommit=False, timeout_ms=int(WAIT_STEP_S * 1000))
        except KafkaError as err:
            log.debug("consumer close: %s", err)


class _Assignment(ConsumerRebalanceListener):
    """Whether the group has given this member its partitions since it joined or last
    rebalanced (called from inside ``poll``, on the polling thread; it only sets a flag)."""

    def __init__(self):
        self.received = False

    def on_partitions_revoked(self, revoked) -> None:
        self.received = False

    def on_partitions_assigned(self, assigned) -> None:
        self.received = True
