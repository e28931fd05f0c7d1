"""A broker that comes back empty (issue 22, item 3): Tansu on ``memory://`` SIGKILLed mid-stream
and started again on the same port with nothing: no topics, no groups, no producer state.

Every part keeps running; every frame ingest publishes after the restart is scored, archived
and alerted (counted against the frames topic of the new broker); the frames the old broker
had acknowledged are reported as lost by ingest (not as published), and the worker says how
many of them it never read. Processes and helpers as in ``test_faults.py``.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

import test_faults as faults
from test_faults import clip  # noqa: F401 (the 8 s demo clip fixture)
from linewatch.bench.broker import free_port, local_tansu
from linewatch.pipeline.wiring import connect

from helpers import WORKER_READY, Processes, wait_for

pytestmark = pytest.mark.services

SUMMARY = re.compile(r"drone: published (\d+) of (\d+) read, lost (\d+) with the broker")
WORKER_LOST = re.compile(r"(\d+) record\(s\) of the old log were never read and are lost")


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def alerted(jsonl: Path, session: str) -> set[int]:
    """Seqs of the session's frames in the alerts written to the JSONL output."""
    seqs: set[int] = set()
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            alert = json.loads(line)
            if f"@{session}:" in alert["event_id"]:
                seqs.update(alert["frames"])
    return seqs


def test_a_broker_restarted_empty_loses_nothing_silently(clip, tmp_path, processes):
    port, brokers = free_port(), []

    def broker():
        return local_tansu(tmp_path, storage="memory://tansu/", port=port, started=brokers)

    prefix, archive, jsonl = "empty-broker", tmp_path / "archive", tmp_path / "alerts.jsonl"
    parts = ("ingest", "worker", "archive", "alerts")
    with broker() as servers:
        common = faults.flags(servers, prefix)
        processes.start("worker", "worker", *common, *faults.MODEL)
        processes.start("archive", "sink", "archive", *common, "--archive", str(archive))
        processes.start("alerts", "sink", "alerts", *common, "--jsonl", str(jsonl))
        processes.wait_for_line("worker", WORKER_READY, timeout=300)
        processes.start("ingest", "ingest", str(clip.video), "--stream-id", "drone", "--realtime", *common)
        wait_for(lambda: len(faults.index_rows(archive)) >= 10, timeout_s=120, what="10 frames archived")
        brokers[-1].send_signal(signal.SIGKILL)
        brokers[-1].wait()
        for name in parts:
            processes.wait_for_line(name, "unavailable", timeout=60)
    with broker():  # empty: memory:// kept nothing
        assert processes.running["ingest"].wait(180) == 0, processes.log("ingest")[-3000:]
        summaries = set(SUMMARY.findall(processes.log("ingest")))  # (logged, and printed at the end)
        assert len(summaries) == 1, processes.log("ingest")[-3000:]
        (summary,) = summaries
        published, read, lost = map(int, summary)
        assert read == clip.frame_count and lost > 0 and published + lost == read, summary

        bus = connect(f"kafka://{servers}", prefix, faults.PARTITIONS)
        ingested = faults.frames_ingested(bus)  # what the new broker has: the frames published after the restart
        assert len(ingested) == published, (len(ingested), summary)
        (session,) = {session for _, session, _ in ingested}
        wait_for(lambda: faults.index_rows(archive) >= ingested, timeout_s=180, what="every frame published archived")
        assert set(faults.scores(bus)) >= ingested
        wait_for(lambda: alerted(jsonl, session) >= {seq for _, _, seq in ingested}, timeout_s=120,
                 what="every frame published alerted")
        worker_lost = WORKER_LOST.findall(processes.log("worker"))
        assert worker_lost, processes.log("worker")[-3000:]  # it said where its position was, and what it lost
        for name in ("worker", "archive", "alerts"):
            assert processes.running[name].poll() is None, processes.log(name)[-3000:]
    faults.assert_no_traceback(processes, *parts)
