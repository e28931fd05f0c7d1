"""The Apprise channel: email, Slack, Teams, ... (``AppriseOutput``; settings ``alerts.apprise``,
a list of Apprise URLs, one channel each, or ``alerts.apprise_config``, an Apprise config file).
They hold tokens, so there is no flag. A short title and a plain-text body per alert."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, SecretStr

from ...bus.messages import AlertMsg
from ...bus.redact import register_url_secrets
from .base import AlertChannel, DeliveryPolicy, OutputError, register_channel


class AppriseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Apprise URLs (mailto://, slack://, msteams://, ...: one output each), or a file of them
    # (an Apprise config file, e.g. a mounted Secret): they hold tokens, so never a flag
    apprise: list[SecretStr] = []
    apprise_config: str | None = None


@register_channel
class AppriseOutput(AlertChannel):
    """One Apprise URL (``mailto://``, ``slack://``, ``msteams://``, ``json://`` ...) or one
    Apprise config file: a short title and a plain-text body per alert, open and closed. The
    name carries a hash of the URL, not the URL (it holds the service's token): stable across
    restarts, so alerts left undelivered are delivered to the same service by the next run."""

    name = "apprise"  # the kind; each one's own name is apprise-<hash>
    Settings = AppriseSettings

    @classmethod
    def from_settings(cls, settings: AppriseSettings, delivery: DeliveryPolicy) -> list[AlertChannel]:
        outputs = [cls(url.get_secret_value()) for url in settings.apprise]
        return outputs + ([cls(config_file=settings.apprise_config)] if settings.apprise_config else [])

    def __init__(self, url: str | None = None, config_file: str | None = None):
        import apprise

        if (url is None) == (config_file is None):
            raise ValueError("an Apprise output takes one URL or one config file")
        self.apprise = apprise.Apprise()
        if url is not None:
            if not self.apprise.add(url):
                raise ValueError("alerts.apprise: a URL Apprise does not understand (see its wiki for the "
                                 "services' URL forms; the URL is not shown, it may hold a token)")
            self.what = next(iter(self.apprise)).url(privacy=True)
        else:
            config = apprise.AppriseConfig()
            if not config.add(config_file) or not self.apprise.add(config) or not len(self.apprise):
                raise ValueError(f"alerts.apprise_config {config_file}: not an Apprise config file with URLs")
            self.what = f"Apprise config {config_file}"
        for service in self.apprise:  # each service's tokens, as Apprise itself spells the URL
            register_url_secrets(service.url(privacy=False))
        self.name = "apprise-" + hashlib.sha256((url or f"config:{config_file}").encode()).hexdigest()[:10]

    def send(self, alert: AlertMsg) -> None:
        title, body = message_text(alert)
        if not self.apprise.notify(title=title, body=body):
            raise OutputError(f"{self.what}: the notification was not accepted")


def message_text(alert: AlertMsg) -> tuple[str, str]:
    """(title, body) of a chat or email notification."""
    from datetime import datetime, timezone

    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    verb = "anomaly on" if alert.status == "open" else "cleared:"
    title = f"linewatch: {verb} {alert.stream}"
    lines = [f"event {alert.event_id} ({alert.status})",
             (f"{alert.class_name}, {alert.method}: peak score {alert.peak_score:.3f} "
              f"(threshold {alert.threshold:.3f}) at frame {alert.peak_seq}"),
             f"from {when(alert.start_ts)}" + (f" to {when(alert.end_ts)}" if alert.status == "closed" else ""),
             f"{len(alert.frames)} anomalous frame(s), {alert.start_seq}..{alert.end_seq}"]
    t = alert.telemetry
    if t is not None and t.latitude is not None and t.longitude is not None:
        lines.append(f"position {t.latitude:.6f}, {t.longitude:.6f}"
                     + (f", altitude {t.altitude:.1f} m" if t.altitude is not None else ""))
    return title, "\n".join(lines)
