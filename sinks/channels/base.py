"""The alert channel contract (``AlertChannel``): a name, a settings model, ``send``; the
outcomes of one attempt (``OutputError`` and its kinds) and the delivery policy around them.

A channel makes one delivery attempt per ``send``: ``OutputError`` means "not delivered, try
again later", ``OutputUnknown`` "the receiver may have it" (a timeout after the request was
sent, a connection dropped before the answer), ``OutputRefused`` "retrying cannot help".
``delivery.Channel`` runs each one as its own consumer of the alerts topic, with the retries,
the backoff and the dead letters. Its ``name`` must be stable: its consumer group is named
after it, so its backlog survives restarts.

Bundled channels are one module each in this package, registered with ``@register_channel``;
their settings are fields of ``alerts`` (``alerts.webhook``, ``alerts.mqtt.url``, ...) and their
``flags`` are options of ``linewatch run`` and ``linewatch sink alerts``. Channels of other
packages come through the entry-point group ``linewatch.alert_channels`` (``registry``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from ...bus.messages import AlertMsg
from ...bus.redact import register_secret


class DeliveryPolicy(BaseModel):
    """How hard a channel tries (settings ``alerts.delivery`` and ``alerts.channels.<kind>``)."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(10.0, gt=0)  # one attempt (webhook: for an answer; MQTT: for the broker's PUBACK)
    attempts: int = Field(10, ge=0)  # then a dead letter; 0: no limit (max_age_s still applies)
    max_age_s: float = Field(86400.0, ge=0)  # an alert decided longer ago is dead-lettered, not sent; 0: none
    backoff_s: float = Field(0.5, ge=0)  # before the second attempt, doubling ...
    max_backoff_s: float = Field(60.0, ge=0)  # ... up to this

    def backoff(self, attempt: int) -> float:
        """The wait after attempt number ``attempt`` (1, 2, ...)."""
        return min(self.backoff_s * 2 ** min(attempt - 1, 30), self.max_backoff_s)


class OutputError(RuntimeError):
    """One delivery attempt failed; worth trying again."""


class OutputUnknown(OutputError):
    """The attempt may have reached the receiver (no answer within the timeout, the connection
    dropped after sending): retried with the same idempotency key, never called "not delivered"."""


class OutputRefused(OutputError):
    """The receiver refused the alert: retrying cannot help, it is dead-lettered at once."""


@dataclass(frozen=True)
class Flag:
    """A command-line option a bundled channel adds to ``linewatch run`` and ``linewatch sink
    alerts``: it sets ``alerts.<field>`` (dotted into a section: ``mqtt.url``)."""

    option: str  # "--webhook"
    field: str  # "webhook"
    help: str
    metavar: str | None = None  # default: the field's last part, upper case
    const: Any = None  # a switch that sets the field to this value
    sink_only: bool = False  # only `linewatch sink alerts` (`run` chooses its own file and topic)


class AlertChannel(ABC):
    """One kind of alert channel. ``Settings``: its pydantic settings model (None: it takes
    none); ``from_settings`` builds the channels those settings ask for."""

    name: str = ""  # stable and unique among a sink's channels: its consumer group is named after it
    Settings: ClassVar[type[BaseModel] | None] = None
    flags: ClassVar[tuple[Flag, ...]] = ()  # bundled channels only
    consumer: ClassVar[bool] = True  # a consumer of the alerts topic, with alerts.channels.<name> overrides
    delivery: DeliveryPolicy = DeliveryPolicy()  # attempts, backoff, maximum age (wiring sets it from settings)

    @classmethod
    def from_settings(cls, settings: BaseModel | None, delivery: DeliveryPolicy) -> list[AlertChannel]:
        """The channels ``settings`` ask for, none if they leave it off. The default: one,
        ``cls(settings)`` (``cls()`` without a settings model)."""
        return [cls() if settings is None else cls(settings)]

    @abstractmethod
    def send(self, alert: AlertMsg) -> None:
        """One attempt to deliver ``alert`` (durably, as far as the channel can say)."""

    def close(self) -> None:
        pass


BUNDLED: dict[str, type[AlertChannel]] = {}


def register_channel(cls: type[AlertChannel]) -> type[AlertChannel]:
    """Class decorator of a bundled channel (a module of this package): ``registry.bundled()`` finds it."""
    if not cls.name or BUNDLED.get(cls.name, cls) is not cls:
        raise ValueError(f"{cls.__qualname__}: a bundled channel needs a name of its own, got {cls.name!r}")
    BUNDLED[cls.name] = cls
    return cls


def secret(value: SecretStr | None, file: str | None, what: str) -> str | None:
    """A secret from its setting, else from ``file`` (trailing newline dropped), registered with
    the redactor; never echoed. (Also the pipeline's: Kafka, Redis, the console.)"""
    if value is not None:
        register_secret(value)
        return value.get_secret_value()
    if file is None:
        return None
    try:
        text = Path(file).read_text().rstrip("\r\n")
        register_secret(text)
        return text
    except OSError as err:
        raise ValueError(f"{what}: cannot read {file}: {err.strerror}") from None
