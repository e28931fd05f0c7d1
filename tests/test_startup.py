"""ops.startup: the start-up stage under way (what the console's live status shows) and one
log line per stage with its time."""

from __future__ import annotations

import logging

import pytest

from linewatch.ops.startup import Startup


def test_each_stage_is_named_with_its_step_then_logged_with_its_time(caplog):
    startup = Startup()
    assert startup.state() is None
    startup.begin(2)
    with caplog.at_level(logging.INFO, logger="linewatch.startup"):
        with startup.stage("loading model", "loading model ViT-B-16 (random weights)"):
            assert startup.state()["text"] == "starting: loading model (1/2)"
        with startup.stage("calibrating", "calibrating aprilgan/insulator"):
            assert startup.state() == {"stage": "calibrating", "step": 2, "steps": 2,
                                       "text": "starting: calibrating (2/2)"}
        with pytest.raises(RuntimeError), startup.stage("calibrating", "a stage that fails"):
            raise RuntimeError("no")
    startup.ready()
    assert startup.state() is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("loading model ViT-B-16 (random weights) ... ")
    assert lines[1].startswith("calibrating aprilgan/insulator ... ") and lines[1].endswith(" s")
