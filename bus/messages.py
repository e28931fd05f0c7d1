"""The one message schema that crosses every hop: frame -> score -> alert (and dead letters).

Wire format, the same on the in-process bus and on Kafka (never pickle):
- frame: key = stream id, value = the JPEG bytes, header ``lw`` = ``FrameMeta`` as JSON;
- end of a session (``SessionEnd``): on the frames topic key = stream id, empty value, header
  ``lw`` = the message; the worker forwards it to the scores topic as a JSON value, after the
  scores of every frame that came before it on its partition;
- score, alert, dead letter: key = stream id, value = the message as JSON (bytes fields base64).
Every message carries ``v`` (schema version); a reader refuses versions it does not know.

A reader acts on nothing it has not validated: ``decode`` refuses (MessageError, never
RecursionError or a crash further on) values above ``MAX_VALUE_BYTES``, ``lw`` headers above
``MAX_HEADER_BYTES``, JSON nested deeper than ``MAX_DEPTH``, integers outside 0..2^63-1 (what
SQLite and Kafka hold), sizes outside 1..65535 px (JPEG's limit) and non-finite floats.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .redact import redact

SCHEMA_VERSION = 1
META_HEADER = "lw"
DEAD_PAYLOAD_LIMIT = 512 * 1024  # base64 in JSON stays under a Kafka broker's default 1 MB message
MAX_HEADER_BYTES = 64 * 1024  # a frame's ``lw`` header: its metadata is a few hundred bytes
MAX_VALUE_BYTES = 64 * 1024 * 1024  # any JSON message value (a score with its frame is a few MB)
MAX_DEPTH = 32  # JSON nesting; the schema needs 4
MAX_REASON_CHARS = 4096

# A stream id names files and folders (the archive), MQTT topic levels and URL paths: one rule,
# here, for every reader of a record and for ingest's --stream-id.
_STREAM_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
STREAM_ID_RULE = "use 1 to 128 characters from A-Z a-z 0-9 . _ - (not . or ..)"


def check_stream_id(stream: str) -> str:
    """``stream`` if it is a valid stream id, else ValueError naming it and the rule."""
    if not isinstance(stream, str) or not _STREAM_ID.fullmatch(stream) or stream in (".", ".."):
        raise ValueError(f"stream id {stream!r}: {STREAM_ID_RULE}")
    return stream


StreamId = Annotated[str, AfterValidator(check_stream_id)]
Count = Annotated[int, Field(ge=0, le=2 ** 63 - 1)]  # seq numbers, offsets: a signed 64-bit integer (SQLite, Kafka)
Side = Annotated[int, Field(gt=0, le=65535)]  # a frame's width or height in px: JPEG's limit


class MessageError(ValueError):
    """A record that does not follow this schema (wrong kind, version or fields)."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64",
                              allow_inf_nan=False)
    v: Literal[1] = SCHEMA_VERSION


class Telemetry(BaseModel):
    """Drone position for a frame, from a DJI-style SRT sidecar (fields the sidecar lacks stay None)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    time: str | None = Field(default=None, max_length=64)  # the sidecar's own clock, as written
    latitude: float | None = None
    longitude: float | None = None
    altitude: float | None = None  # absolute, metres
    relative_altitude: float | None = None


class FrameMeta(_Message):
    kind: Literal["frame"] = "frame"
    stream: StreamId
    seq: Count  # per stream and session, from 0, in capture order
    # One ingest run of the stream: seq restarts at 0 with every run, so (stream, session,
    # seq) names a frame; a replay of the same frames keeps their session.
    session: str = Field(default="", max_length=64)
    ts: float  # capture time, UNIX seconds (file sources: start of ingest + media time)
    pts: float = 0.0  # media time in seconds from the start of the source
    source: str = Field(max_length=4096)
    width: Side
    height: Side
    encoding: Literal["jpeg"] = "jpeg"
    telemetry: Telemetry | None = None
    sent_at: float = Field(default_factory=time.time)  # wall time when published, for latency


class SessionEnd(_Message):
    """The end of one ingest session of a stream: no frame of it follows. Ingest sends it when
    a file or folder ends or ingest stops (a live source too); replay sends one for each
    session its range cut short. The alert sink closes the session's open event on it."""

    kind: Literal["end"] = "end"
    stream: StreamId
    session: str = Field(default="", max_length=64)
    frames: Count  # frames published in the session: seq 0 .. frames - 1
    ts: float = Field(allow_inf_nan=False)  # capture time of the session's last frame
    reason: Literal["end", "stopped", "failed", "replay"] = "end"  # source ended, ingest stopped or failed, replay range
    sent_at: float = Field(default_factory=time.time)


class FrameRef(BaseModel):
    """Where a frame sits on the bus, so a score or alert can point back at it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    topic: str = Field(max_length=255)
    partition: Count
    offset: Count


class EncodedMap(BaseModel):
    """An anomaly map as an 8-bit PNG at reduced resolution; value = lo + png / 255 * (hi - lo)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64",
                              allow_inf_nan=False)
    png: bytes
    lo: float
    hi: float


class Latency(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    queue_ms: float  # published -> picked up by the worker
    decode_ms: float  # JPEG decode + resize, per frame share of the batch
    model_ms: float  # the method's forward pass, per frame share of the batch
    batch_size: Count


class ScoreMsg(_Message):
    kind: Literal["score"] = "score"
    frame: FrameMeta
    frame_ref: FrameRef | None = None
    image_score: float
    threshold: float
    anomalous: bool
    map: EncodedMap
    method: str
    class_name: str
    anchor_key: str  # which text anchors (model + prompts) scored it
    model: str  # backbone identity
    worker: str
    latency: Latency
    scored_at: float = Field(default_factory=time.time)
    frame_jpeg: bytes | None = None  # only on anomalous frames, so the archive can draw overlays
    # "reduced": frame_jpeg is the frame re-encoded smaller (the original did not fit a message);
    # "dropped": an anomalous frame sent without its image (it could not be made to fit)
    frame_jpeg_note: Literal["reduced", "dropped"] | None = None


class AlertMsg(_Message):
    """One anomalous event of a stream. Published when it opens and again when it closes,
    with the same ``event_id``; consumers keep the latest status per event."""

    kind: Literal["alert"] = "alert"
    event_id: str  # "<stream>@<session>:<first seq>", stable across replays of the same frames
    status: Literal["open", "closed"]
    stream: StreamId
    start_seq: Count
    end_seq: Count  # last anomalous frame seen so far
    start_ts: float
    end_ts: float
    peak_score: float
    peak_seq: Count
    threshold: float
    frames: list[Count]  # the anomalous frames' sequence numbers
    method: str
    class_name: str
    telemetry: Telemetry | None = None  # at the peak frame
    raised_at: float = Field(default_factory=time.time)


class DeadLetter(_Message):
    kind: Literal["dead"] = "dead"
    reason: str
    stage: str  # ingest | worker | sink-alerts | sink-archive | ...
    origin: FrameRef | None = None
    stream: str | None = None
    seq: Count | None = None
    payload: bytes = b""  # the original value (truncated above 512 KiB to fit a default Kafka message)
    headers: dict[str, str] = {}
    at: float = Field(default_factory=time.time)

    @field_validator("reason", mode="before")
    @classmethod
    def _redacted(cls, reason: object) -> str:
        """Secrets never reach the dead-letter topic; nor does an unbounded exception text."""
        text = redact(reason)
        return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "…"

    def encoded(self, limit: int) -> bytes:
        """Its bytes; without the original payload and headers if with them it would exceed
        ``limit`` (a bus's max_message_bytes set below DEAD_PAYLOAD_LIMIT)."""
        data = encode(self)
        if len(data) + 1024 <= limit:
            return data
        return encode(self.model_copy(update={"payload": b"", "headers": {}}))

    @classmethod
    def from_record(cls, record, reason: str, stage: str, *, stream: str | None = None,
                    seq: int | None = None) -> DeadLetter:
        """The dead letter for a bus record that could not be handled: its bytes (truncated to
        DEAD_PAYLOAD_LIMIT), headers and position. ``stream`` defaults to the record's key."""
        if stream is None and record.key is not None:
            stream = record.key[:1024].decode("utf-8", "replace")
        return cls(reason=reason, stage=stage, stream=stream or None, seq=seq,
                   origin=FrameRef(topic=record.topic, partition=record.partition, offset=record.offset),
                   payload=record.value[:DEAD_PAYLOAD_LIMIT],
                   headers={name: value.decode("utf-8", "replace")[:4096] for name, value in record.headers})


_KINDS: dict[str, type[_Message]] = {"frame": FrameMeta, "score": ScoreMsg, "alert": AlertMsg, "dead": DeadLetter,
                                     "end": SessionEnd}


def encode(message: _Message) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def decode(data: bytes, expect: type[_Message], *more: type[_Message], max_bytes: int = MAX_VALUE_BYTES) -> _Message:
    """Parse JSON bytes into ``expect`` (or one of ``more``, by its ``kind``); any mismatch
    becomes one MessageError line."""
    if not isinstance(data, (bytes, bytearray)):  # a tombstone (None) or anything not a record value
        raise MessageError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageError(f"{len(data)} bytes: larger than the {max_bytes} a message may have")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise MessageError(f"not JSON: {err}") from None
    except RecursionError:
        raise MessageError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if _deeper_than(raw, MAX_DEPTH):
        raise MessageError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise MessageError(f"expected a JSON object, got {type(raw).__name__}")
    kind, version = raw.get("kind"), raw.get("v")
    kinds = {model.model_fields["kind"].default: model for model in (expect, *more)}
    if kind not in kinds:
        raise MessageError(f"expected a {' or '.join(kinds)} message, got kind={kind!r}")
    expect = kinds[kind]
    if version != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema version v={version!r} (this linewatch reads v={SCHEMA_VERSION})")
    try:
        return expect.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise MessageError(f"{expect.__name__}: {where}: {first['msg']} ({err.error_count()} error(s))") from None


def track(meta: FrameMeta) -> str:
    """The sequence a frame belongs to: its stream, within one ingest session."""
    return f"{meta.stream}@{meta.session}" if meta.session else meta.stream


def frame_meta(headers) -> FrameMeta:
    """The FrameMeta of a frame record, from its headers (a list of (name, bytes) pairs)."""
    header = frame_header(headers)
    if not isinstance(header, FrameMeta):
        raise MessageError("expected a frame, got the end of a session")
    return header


def frame_header(headers) -> FrameMeta | SessionEnd:
    """What a record on the frames topic carries in its ``lw`` header: a frame's metadata or
    the end of a session."""
    for name, value in headers or ():
        if name == META_HEADER:
            return decode(value, FrameMeta, SessionEnd, max_bytes=MAX_HEADER_BYTES)
    raise MessageError(f"frame record has no {META_HEADER!r} header")


def _deeper_than(value, limit: int) -> bool:
    """Whether parsed JSON nests lists and objects more than ``limit`` deep (iteratively: a
    hostile depth must not exhaust the stack here either)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
