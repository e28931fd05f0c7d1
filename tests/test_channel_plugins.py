"""An alert channel from another package, registered through the entry-point group
``linewatch.alert_channels`` (a tiny package with its dist-info, written to a temporary folder),
switched on by ``alerts.plugins.<name>`` in a config file, receives every alert through
``linewatch sink alerts`` on Tansu, in order per stream; its secret never reaches the sink's log.
Mistakes in naming or configuring such a channel get one clear line."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from linewatch.pipeline.settings import load_settings
from linewatch.pipeline.wiring import alert_channels, connect
from linewatch.scoring.plugins import installed

from helpers import (
    Processes,
    by_stream,
    expected_alerts,
    installed_package,
    jsonl_rows,
    publish_scores,
    scores_of,
    wait_for,
)

PLUGIN = '''
import json
from pathlib import Path

from pydantic import BaseModel, SecretStr

from linewatch.bus.messages import encode
from linewatch.sinks.channels import AlertChannel, OutputRefused


class Settings(BaseModel):
    path: str
    token: SecretStr


class FileChannel(AlertChannel):
    """Appends each alert to a file: a stand-in for a pager or a ticket system."""

    name = "file-drop"
    Settings = Settings

    def __init__(self, settings):
        if len(settings.token.get_secret_value()) < 8:
            raise OutputRefused("token too short")
        self.path = Path(settings.path)

    def send(self, alert):
        with self.path.open("ab") as out:
            out.write(encode(alert) + b"\\n")
'''

ENTRY_POINTS = """[linewatch.alert_channels]
file-drop = linewatch_drop:FileChannel
gone = linewatch_drop_gone:Nothing
"""
PARTITIONS = 2
TOKEN = "drop-" + secrets.token_hex(8)


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    yield installed_package(tmp_path / "site", "linewatch_drop", PLUGIN, "linewatch-drop", "0.2", ENTRY_POINTS,
                            monkeypatch)
    installed.cache_clear()


@pytest.mark.services
def test_a_packaged_channel_gets_every_alert_through_the_alert_sink(plugin, kafka_servers, tmp_path):
    prefix = f"plug-{secrets.token_hex(3)}"
    bus = connect(f"kafka://{kafka_servers}", prefix, PARTITIONS)
    scores = scores_of([f"drone-{i}" for i in range(3)], events=4)
    expected = expected_alerts(scores)
    total = sum(map(len, expected.values()))
    dropped = tmp_path / "dropped.jsonl"
    config = tmp_path / "linewatch.yaml"
    config.write_text(json.dumps({"alerts": {"plugins": {"file-drop": {"path": str(dropped), "token": TOKEN}}}}))
    processes = Processes(tmp_path)
    try:
        processes.start("sink", "sink", "alerts", "--config", str(config), "--bootstrap-servers", kafka_servers,
                        "--topic-prefix", prefix, "--partitions", str(PARTITIONS), "--log-level", "debug")
        publish_scores(bus, scores)
        wait_for(lambda: len(jsonl_rows(dropped)) >= total and processes.alive("sink") is None, 300,
                 "every alert through the packaged channel", state=lambda: len(jsonl_rows(dropped)))
        processes.stop("sink")
    finally:
        processes.stop_all()
    assert by_stream(jsonl_rows(dropped)) == expected
    assert TOKEN not in processes.log("sink")


def test_naming_or_configuring_a_packaged_channel_wrong_gets_one_line(plugin, tmp_path):
    def refused(plugins: dict) -> str:
        with pytest.raises(ValueError) as caught:
            alert_channels(load_settings(None, {"alerts": {"plugins": plugins}}))
        return str(caught.value)

    assert "no package provides an alert channel 'pagr'" in refused({"pagr": {}})
    assert "file-drop" in refused({"pagr": {}})  # the installed ones are named
    assert "cannot be loaded (linewatch_drop_gone:Nothing): ModuleNotFoundError" in refused({"gone": {}})
    problem = refused({"file-drop": {"path": str(tmp_path / "x")}})
    assert problem.startswith("alerts.plugins.file-drop: token: Field required"), problem
    built = alert_channels(load_settings(None, {"alerts": {"plugins": {"file-drop": {"path": "x", "token": TOKEN}}}}))
    assert [c.name for c in built] == ["file-drop"]
