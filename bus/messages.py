"""The one message schema that crosses every hop: frame -> score -> alert (and dead letters).

Wire format, the same on the in-process bus and on Kafka (never pickle):
- frame: key = stream id, value = the JPEG bytes, header ``lw`` = ``FrameMeta`` as JSON;
- end of a session (``SessionEnd``): on the frames topic key = stream id, empty value, header
  ``lw`` = the message; the worker forwards it to the scores topic as a JSON value, after the
  scores of every frame that came before it on its partition;
- score, alert, dead letter: key = stream id, value = the message as JSON (bytes fields base64).
Every message carries ``v`` (schema version); a reader refuses versions it does not know.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
META_HEADER = "lw"
DEAD_PAYLOAD_LIMIT = 512 * 1024  # base64 in JSON stays under a Kafka broker's default 1 MB message

StreamId = Annotated[str, Field(min_length=1, max_length=128)]


class MessageError(ValueError):
    """A record that does not follow this schema (wrong kind, version or fields)."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")
    v: Literal[1] = SCHEMA_VERSION


class Telemetry(BaseModel):
    """Drone position for a frame, from a DJI-style SRT sidecar (fields the sidecar lacks stay None)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    time: str | None = None  # the sidecar's own clock, as written
    latitude: float | None = None
    longitude: float | None = None
    altitude: float | None = None  # absolute, metres
    relative_altitude: float | None = None


class FrameMeta(_Message):
    kind: Literal["frame"] = "frame"
    stream: StreamId
    seq: int = Field(ge=0)  # per stream and session, from 0, in capture order
    # One ingest run of the stream: seq restarts at 0 with every run, so (stream, session,
    # seq) names a frame; a replay of the same frames keeps their session.
    session: str = Field(default="", max_length=64)
    ts: float  # capture time, UNIX seconds (file sources: start of ingest + media time)
    pts: float = 0.0  # media time in seconds from the start of the source
    source: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
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
    frames: int = Field(ge=0)  # frames published in the session: seq 0 .. frames - 1
    ts: float = Field(allow_inf_nan=False)  # capture time of the session's last frame
    reason: Literal["end", "stopped", "failed", "replay"] = "end"  # source ended, ingest stopped or failed, replay range
    sent_at: float = Field(default_factory=time.time)


class FrameRef(BaseModel):
    """Where a frame sits on the bus, so a score or alert can point back at it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    topic: str
    partition: int
    offset: int


class EncodedMap(BaseModel):
    """An anomaly map as an 8-bit PNG at reduced resolution; value = lo + png / 255 * (hi - lo)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")
    png: bytes
    lo: float
    hi: float


class Latency(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    queue_ms: float  # published -> picked up by the worker
    decode_ms: float  # JPEG decode + resize, per frame share of the batch
    model_ms: float  # the method's forward pass, per frame share of the batch
    batch_size: int


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


class AlertMsg(_Message):
    """One anomalous event of a stream. Published when it opens and again when it closes,
    with the same ``event_id``; consumers keep the latest status per event."""

    kind: Literal["alert"] = "alert"
    event_id: str  # "<stream>@<session>:<first seq>", stable across replays of the same frames
    status: Literal["open", "closed"]
    stream: StreamId
    start_seq: int
    end_seq: int  # last anomalous frame seen so far
    start_ts: float
    end_ts: float
    peak_score: float
    peak_seq: int
    threshold: float
    frames: list[int]  # the anomalous frames' sequence numbers
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
    seq: int | None = None
    payload: bytes = b""  # the original value (truncated above 512 KiB to fit a default Kafka message)
    headers: dict[str, str] = {}
    at: float = Field(default_factory=time.time)

    @classmethod
    def from_record(cls, record, reason: str, stage: str, *, stream: str | None = None,
                    seq: int | None = None) -> DeadLetter:
        """The dead letter for a bus record that could not be handled: its bytes (truncated to
        DEAD_PAYLOAD_LIMIT), headers and position. ``stream`` defaults to the record's key."""
        if stream is None and record.key is not None:
            stream = record.key.decode("utf-8", "replace")
        return cls(reason=reason, stage=stage, stream=stream or None, seq=seq,
                   origin=FrameRef(topic=record.topic, partition=record.partition, offset=record.offset),
                   payload=record.value[:DEAD_PAYLOAD_LIMIT],
                   headers={name: value.decode("utf-8", "replace")[:4096] for name, value in record.headers})


_KINDS: dict[str, type[_Message]] = {"frame": FrameMeta, "score": ScoreMsg, "alert": AlertMsg, "dead": DeadLetter,
                                     "end": SessionEnd}


def encode(message: _Message) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def decode(data: bytes, expect: type[_Message], *more: type[_Message]) -> _Message:
    """Parse JSON bytes into ``expect`` (or one of ``more``, by its ``kind``); any mismatch
    becomes one MessageError line."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise MessageError(f"not JSON: {err}") from None
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
            return decode(value, FrameMeta, SessionEnd)
    raise MessageError(f"frame record has no {META_HEADER!r} header")
