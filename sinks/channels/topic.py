"""The alerts topic as a channel: its setting (``alerts.publish``) and flag (``--no-publish``).

The alert sink writes every alert it decides to the alerts topic itself (``alert_sink``): the
topic is every other channel's source, so there is no consumer of it to build and no ``send``
to call. With ``publish`` off the sink writes to a topic of its own instead
(``<scores topic>.<group>.alerts``), read by its channels only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ...bus.messages import AlertMsg
from .base import AlertChannel, DeliveryPolicy, Flag, register_channel


class TopicSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    publish: bool = True  # alerts go to the shared alerts topic (else to the sink's own, for its channels only)


@register_channel
class AlertsTopic(AlertChannel):
    name = "topic"
    Settings = TopicSettings
    flags = (Flag("--no-publish", "publish", "do not publish alerts to the alerts topic", const=False, sink_only=True),)
    consumer = False  # no consumer group, no delivery overrides

    @classmethod
    def from_settings(cls, settings: TopicSettings, delivery: DeliveryPolicy) -> list[AlertChannel]:
        return []  # the sink publishes (``alert_sink``, ``publish=settings.alerts.publish``)

    def send(self, alert: AlertMsg) -> None:
        raise TypeError("the alert sink writes the alerts topic itself; it is not sent to")
