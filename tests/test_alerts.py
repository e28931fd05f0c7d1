"""The alert tracker: k-of-n events, cool-down, de-duplication, reordering, the end of a
session (marker or a gap in capture time), and its state resumed from JSON."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from linewatch.bus.messages import AlertMsg, ScoreMsg, SessionEnd, Telemetry
from linewatch.sinks.events import FINISHED_SESSIONS_KEPT, AlertPolicy, AlertTracker, StreamState

from helpers import STEP, TS0, score_msg


def end_of(scores: list[ScoreMsg], stream: str = "cam", session: str = "") -> SessionEnd:
    last = max((s for s in scores if s.frame.stream == stream and s.frame.session == session),
               key=lambda s: s.frame.seq)
    return SessionEnd(stream=stream, session=session, frames=last.frame.seq + 1, ts=last.frame.ts)


def run(scores: list[ScoreMsg], policy: AlertPolicy | None = None, end: bool = True) -> list[AlertMsg]:
    tracker = AlertTracker(lambda stream: policy or AlertPolicy())
    alerts = [a for s in scores for a in tracker.push(s)]
    if end:
        for stream in sorted({s.frame.stream for s in scores}):
            alerts += tracker.end(end_of(scores, stream))
    return alerts


def pattern(bits: str, **kwargs) -> list[ScoreMsg]:
    """'0110' -> seq 0..3 with scores 0.1 / 0.9 (threshold 0.5)."""
    return [score_msg(seq, 0.9 if bit == "1" else 0.1, **kwargs) for seq, bit in enumerate(bits)]


def summary(alerts: list[AlertMsg]) -> list[tuple]:
    return [(a.event_id, a.status, a.start_seq, a.end_seq, tuple(a.frames)) for a in alerts]


# ---- policy --------------------------------------------------------------------------------------------
def test_policy_validation_errors_are_clear():
    with pytest.raises(ValidationError, match="k=4 must not exceed n=3"):
        AlertPolicy(k=4, n=3)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        AlertPolicy(cooldown_s=-1)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AlertPolicy(k=0)
    with pytest.raises(ValidationError, match="greater than 0"):
        AlertPolicy(gap_s=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        AlertPolicy(treshold=0.5)


# ---- events --------------------------------------------------------------------------------------------
def test_k_of_n_opens_then_closes_after_n_normal_frames():
    scores = pattern("0110000000")
    tracker = AlertTracker(lambda stream: AlertPolicy(k=2, n=3))
    emitted = {s.frame.seq: tracker.push(s) for s in scores}
    assert [seq for seq, alerts in emitted.items() if alerts] == [2, 5]  # opens on the 2nd hit, closes 3 later
    opened, closed = emitted[2][0], emitted[5][0]
    assert (opened.status, opened.event_id, opened.frames) == ("open", "cam:1", [1, 2])
    assert (closed.status, closed.event_id, closed.start_seq, closed.end_seq) == ("closed", "cam:1", 1, 2)
    assert (closed.start_ts, closed.end_ts, closed.threshold) == (TS0 + STEP, TS0 + 2 * STEP, 0.5)
    assert tracker.end(end_of(scores)) == []


def test_peak_and_its_telemetry():
    scores = pattern("0111")
    scores[2] = score_msg(2, 0.95, telemetry=Telemetry(latitude=47.1, longitude=8.5))
    closed = run(scores)[-1]
    assert (closed.status, closed.peak_seq, closed.peak_score, closed.telemetry.latitude) == ("closed", 2, 0.95, 47.1)


def test_single_spike_does_not_alert_but_two_within_n_do():
    assert run(pattern("0100100010")) == []  # hits 3+ frames apart: never 2 of the last 3
    assert summary(run(pattern("0101")))[0] == ("cam:1", "open", 1, 3, (1, 3))


def test_policy_threshold_overrides_the_workers():
    scores = [score_msg(seq, 0.7) for seq in range(4)]  # anomalous by the worker's threshold 0.5
    assert run(scores, AlertPolicy(threshold=0.8)) == []
    assert run(scores, AlertPolicy(threshold=0.6))[0].threshold == 0.6


def test_cooldown_merges_a_retrigger_into_the_same_event():
    bits = "0110000011" + "0" * 20  # quiet at seq 5; re-fires at seq 9, 1 s of capture time later
    separate = run(pattern(bits), AlertPolicy(cooldown_s=0))
    assert summary(separate) == [("cam:1", "open", 1, 2, (1, 2)), ("cam:1", "closed", 1, 2, (1, 2)),
                                 ("cam:8", "open", 8, 9, (8, 9)), ("cam:8", "closed", 8, 9, (8, 9))]
    merged = run(pattern(bits), AlertPolicy(cooldown_s=2.0))
    assert summary(merged) == [("cam:1", "open", 1, 2, (1, 2)), ("cam:1", "closed", 1, 9, (1, 2, 8, 9))]


def test_cooldown_closes_after_its_capture_time_passes():
    tracker = AlertTracker(lambda stream: AlertPolicy(cooldown_s=2.0))
    emitted = {s.frame.seq: tracker.push(s) for s in pattern("011" + "0" * 15)}
    # quiet at seq 5 (3 normal frames after seq 2), closed 2 s = 8 frames later
    assert [(seq, a[0].status) for seq, a in emitted.items() if a] == [(2, "open"), (13, "closed")]


def test_a_lone_hit_during_cooldown_does_not_rearm():
    alerts = run(pattern("0110000100" + "0" * 10), AlertPolicy(cooldown_s=2.0))
    assert summary(alerts)[-1] == ("cam:1", "closed", 1, 2, (1, 2))


# ---- the end of a session ------------------------------------------------------------------------------
def test_the_end_marker_closes_the_event_and_what_follows_it_is_a_duplicate():
    scores = pattern("00111")
    tracker = AlertTracker(lambda stream: AlertPolicy())
    assert [a.status for s in scores for a in tracker.push(s)] == ["open"]
    closed = tracker.end(end_of(scores))
    assert summary(closed) == [("cam:2", "closed", 2, 4, (2, 3, 4))]
    # a worker that died before committing scores the last frames again, end included: ignored
    assert [a for s in scores[3:] for a in tracker.push(s)] == [] and tracker.end(end_of(scores)) == []
    assert tracker.duplicates == 3


def test_the_end_releases_scores_held_back_by_a_gap_in_seq():
    scores = [s for s in pattern("0011110") if s.frame.seq != 1]  # seq 1 was dead-lettered
    tracker = AlertTracker(lambda stream: AlertPolicy(reorder_window=16))
    assert [a for s in scores for a in tracker.push(s)] == []  # waiting for seq 1
    alerts = tracker.end(end_of(scores))
    assert summary(alerts) == [("cam:2", "open", 2, 3, (2, 3)), ("cam:2", "closed", 2, 5, (2, 3, 4, 5))]


def test_a_gap_in_capture_time_ends_a_live_session_without_a_marker():
    """A live camera drops out for longer than gap_s: its event closes on the first frame after
    the hole, which then starts afresh (same session, seq goes on)."""
    policy = AlertPolicy(gap_s=10.0)
    before = [score_msg(seq, 0.9 if seq >= 2 else 0.1, ts=100.0 + seq) for seq in range(5)]  # open at 3
    after = [score_msg(seq, 0.1, ts=130.0 + seq) for seq in range(5, 8)]
    tracker = AlertTracker(lambda stream: policy)
    assert [a.status for s in before for a in tracker.push(s)] == ["open"]
    first_after = tracker.push(after[0])
    assert summary(first_after) == [("cam:2", "closed", 2, 4, (2, 3, 4))]
    assert first_after[0].end_ts == 104.0  # the event ends at its last frame, not at the gap
    assert [a for s in after[1:] for a in tracker.push(s)] == []


def test_a_new_session_of_the_stream_ends_the_old_one_after_the_gap():
    """Live ingest killed mid-event (no marker), restarted later: the old session's event
    closes when the new session's capture time passes the gap; not before."""
    policy = AlertPolicy(gap_s=10.0)
    old = [score_msg(seq, 0.9 if seq >= 2 else 0.1, ts=100.0 + seq) for seq in range(5)]
    new = [score_msg(seq, 0.1, ts=105.0 + seq).model_copy(update={"frame": score_msg(
        seq, ts=105.0 + seq).frame.model_copy(update={"session": "s2"})}) for seq in range(12)]
    tracker = AlertTracker(lambda stream: policy)
    assert [a.status for s in old for a in tracker.push(s)] == ["open"]
    emitted = [(s.frame.ts, a.status, a.event_id) for s in new for a in tracker.push(s)]
    assert emitted == [(114.0, "closed", "cam:2")]  # 114 - 104 (the old session's last frame) = gap_s


def test_slow_arrival_never_ends_an_event():
    """No clock in the tracker: however long the sink waits between scores, only capture time
    counts. Two halves of one defect stay one event."""
    scores = pattern("0011111111110000")
    tracker = AlertTracker(lambda stream: AlertPolicy())
    first = [a for s in scores[:6] for a in tracker.push(s)]
    # (any amount of wall time here)
    rest = [a for s in scores[6:] for a in tracker.push(s)]
    assert summary(first + rest) == [("cam:2", "open", 2, 3, (2, 3)),
                                      ("cam:2", "closed", 2, 11, tuple(range(2, 12)))]


def test_finished_sessions_are_remembered_within_a_bound():
    tracker = AlertTracker(lambda stream: AlertPolicy())
    for n in range(FINISHED_SESSIONS_KEPT + 5):
        marker = SessionEnd(stream="cam", session=f"s{n}", frames=1, ts=1000.0 + n)
        tracker.end(marker)
    assert len(tracker.streams["cam"].sessions) == FINISHED_SESSIONS_KEPT
    assert f"s{FINISHED_SESSIONS_KEPT + 4}" in tracker.streams["cam"].sessions


# ---- at-least-once input -------------------------------------------------------------------------------
def test_a_run_fed_twice_yields_its_events_once():
    scores = pattern("0110001110000")
    tracker = AlertTracker(lambda stream: AlertPolicy())
    first = [a for s in scores for a in tracker.push(s)]
    second = [a for s in scores for a in tracker.push(s)]
    assert len(first) == 4 and second == []
    assert (tracker.scores, tracker.duplicates) == (len(scores), len(scores))


def test_interleaved_duplicates_change_nothing():
    scores = pattern("0110001110000")
    doubled = [s for s in scores for _ in range(2)]
    assert summary(run(doubled)) == summary(run(scores))


def test_out_of_order_within_the_window_gives_the_same_events():
    scores = pattern("0110001110000011")
    shuffled = scores[:]
    rng = random.Random(7)
    for start in range(0, len(shuffled), 4):  # shuffle within blocks of 4 (< reorder_window)
        block = shuffled[start:start + 4]
        rng.shuffle(block)
        shuffled[start:start + 4] = block
    assert shuffled != scores
    assert summary(run(shuffled)) == summary(run(scores))


def test_a_gap_in_seq_does_not_stall_the_stream():
    scores = [s for s in pattern("0" * 10 + "11" + "0" * 10) if s.frame.seq != 5]  # seq 5 was dead-lettered
    tracker = AlertTracker(lambda stream: AlertPolicy(reorder_window=4))
    opened = [(s.frame.seq, a) for s in scores for a in tracker.push(s)]
    assert [(seq, a.status, a.event_id) for seq, a in opened] == [(11, "open", "cam:10"), (14, "closed", "cam:10")]
    assert tracker.push(score_msg(5, 0.9)) == [] and tracker.late == 1  # too late: it was given up on
    assert not tracker.streams["cam"].sessions[""].buffer


def test_streams_are_independent():
    a, b = pattern("0110000", stream="a"), pattern("0001100", stream="b")
    mixed = [s for pair in zip(a, b) for s in pair]
    assert sorted(summary(run(mixed))) == sorted(summary(run(a)) + summary(run(b)))


def test_a_session_joined_midway_waits_for_the_window_then_starts_at_its_lowest_seq():
    scores = [s for s in pattern("0" * 100 + "0110000000")][100:]  # no state: the sink joined at seq ~100
    scores[0], scores[1] = scores[1], scores[0]  # 101 arrives before 100
    tracker = AlertTracker(lambda stream: AlertPolicy(reorder_window=4))
    emitted = [(s.frame.seq, a.status, a.event_id) for s in scores for a in tracker.push(s)]
    assert emitted == [(104, "open", "cam:101"), (105, "closed", "cam:101")]  # held until 5 were buffered
    assert tracker.duplicates == tracker.late == 0


def test_a_non_finite_score_is_refused_before_it_touches_the_state():
    tracker = AlertTracker(lambda stream: AlertPolicy())
    tracker.push(score_msg(0, 0.9))
    with pytest.raises(ValueError, match="non-finite"):
        tracker.push(score_msg(1, 0.9).model_copy(update={"image_score": float("nan")}))
    assert tracker.push(score_msg(1, 0.9))[0].status == "open"  # seq 1 was not taken as seen


# ---- state ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", range(0, 31, 3))
def test_state_resumed_from_json_continues_exactly(cut):
    """A tracker stopped anywhere and rebuilt from its JSON state, fed again from a little
    before the cut (records not yet committed come again), raises exactly the alerts of an
    uninterrupted run: no event re-raised under a new id, none left open."""
    scores = pattern("0110000011100000111111100001100")
    shuffled = scores[:]
    random.Random(cut).shuffle(shuffled[4:8])
    policy = AlertPolicy(cooldown_s=0.5)
    whole = run(scores, policy)
    first = AlertTracker(lambda stream: policy)
    before = [a for s in scores[:cut] for a in first.push(s)]
    saved = [state.model_dump_json() for state in first.take_dirty()]
    second = AlertTracker(lambda stream: policy)
    for text in saved:
        second.load(StreamState.model_validate_json(text))
    again = scores[max(0, cut - 5):]  # at-least-once: the uncommitted tail comes again
    after = [a for s in again for a in second.push(s)] + second.end(end_of(scores))
    assert summary(before + after) == summary(whole)
    assert [a.event_id for a in before + after if a.status == "open"] == [
        a.event_id for a in before + after if a.status == "closed"]
