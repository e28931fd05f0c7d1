"""The alert channels' registry (``sinks/channels/``): the bundled channels are found by name with
their settings and flags, which keep the keys and options they always had; a channel module
added to the package is the whole change: its settings become ``alerts.<field>``, its flag an
option of ``run`` and ``sink alerts``, its kind a key of ``alerts.channels``, and the wiring
builds it."""

from __future__ import annotations

import argparse
import sys
import typing
from types import SimpleNamespace

import pytest

from linewatch.cli import build_parser
from linewatch.cli.pipeline import add_channel_flags
from linewatch.pipeline.settings import AlertSettings, alert_settings, load_settings
from linewatch.pipeline.wiring import alert_channels
from linewatch.sinks import channels
from linewatch.sinks.channels import AlertChannel, base, registry

BEEPER = '''
from pydantic import BaseModel

from linewatch.sinks.channels.base import AlertChannel, Flag, register_channel


class BeeperSettings(BaseModel):
    beeper: str | None = None  # a pager number; None: off


@register_channel
class Beeper(AlertChannel):
    name = "beeper"
    Settings = BeeperSettings
    flags = (Flag("--beeper", "beeper", "page each alert to this number"),)

    @classmethod
    def from_settings(cls, settings, delivery):
        return [cls(settings.beeper)] if settings.beeper else []

    def __init__(self, number):
        self.number, self.sent = number, []

    def send(self, alert):
        self.sent.append(alert)
'''


def test_the_bundled_channels_are_registered_with_their_settings():
    found = registry.bundled()
    assert list(found) == ["apprise", "jsonl", "mqtt", "topic", "webhook"]
    for name, cls in found.items():
        assert issubclass(cls, AlertChannel) and cls.name == name
        assert set(cls.Settings.model_fields) <= set(AlertSettings.model_fields), name
    assert {"jsonl", "webhook", "webhook_headers", "webhook_secret", "webhook_secret_file", "publish", "mqtt",
            "apprise", "apprise_config", "plugins", "delivery", "channels"} <= set(AlertSettings.model_fields)
    with pytest.raises(ValueError, match="alerts.channels.topic"):  # the topic has no consumer to tune
        load_settings(None, {"alerts": {"channels": {"topic": {"attempts": 1}}}})


def test_the_channels_flags_set_what_they_always_set():
    parser = build_parser()
    args = vars(parser.parse_args(["sink", "alerts", "--jsonl", "a.jsonl", "--no-publish", "--webhook", "http://h/x",
                                   "--mqtt", "mqtt://b", "--mqtt-topic-prefix", "p", "--mqtt-discovery"]))
    assert {k: v for k, v in args.items() if k.startswith("alerts.")} == {
        "alerts.jsonl": "a.jsonl", "alerts.publish": False, "alerts.webhook": "http://h/x",
        "alerts.mqtt.url": "mqtt://b", "alerts.mqtt.topic_prefix": "p", "alerts.mqtt.discovery": True}
    run = vars(parser.parse_args(["run", "clip.mp4", "--webhook", "http://h/x", "--mqtt", "mqtt://b"]))
    assert (run["alerts.webhook"], run["alerts.mqtt.url"]) == ("http://h/x", "mqtt://b")
    for sink_only in ("--jsonl", "--no-publish"):  # `run` writes OUT/alerts.jsonl and publishes in-process
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "clip.mp4", sink_only, *(["x"] if sink_only == "--jsonl" else [])])


@pytest.fixture
def beeper(tmp_path, monkeypatch):
    """A module ``beeper.py`` in the channels package (a second folder of it, for the test)."""
    folder = tmp_path / "channels"
    folder.mkdir()
    (folder / "beeper.py").write_text(BEEPER)
    monkeypatch.setattr(channels, "__path__", [*channels.__path__, str(folder)])
    registry.bundled.cache_clear()
    yield
    base.BUNDLED.pop("beeper", None)
    sys.modules.pop("linewatch.sinks.channels.beeper", None)
    registry.bundled.cache_clear()


def test_adding_a_bundled_channel_is_adding_one_module(beeper):
    assert "beeper" in registry.bundled()
    alerts = alert_settings()  # what pipeline.settings builds when it loads, now with the module
    kinds = typing.get_args(typing.get_args(alerts.model_fields["channels"].annotation)[0])
    assert "beeper" in alerts.model_fields and "beeper" in kinds
    parser = argparse.ArgumentParser()
    add_channel_flags(parser)
    assert vars(parser.parse_args(["--beeper", "555"]))["alerts.beeper"] == "555"
    settings = SimpleNamespace(alerts=alerts.model_validate({"beeper": "555", "channels": {"beeper": {"attempts": 3}}}))
    [pager] = alert_channels(settings)
    assert (pager.name, pager.number, pager.delivery.attempts) == ("beeper", "555", 3)
    assert alert_channels(SimpleNamespace(alerts=alerts())) == []  # off unless its settings ask for it
