"""Secrets never reach a log line, a dead-letter reason or an error line (issue 13, item 6):
one function, ``bus.redact.redact``, used by all three."""

from __future__ import annotations

import logging

import pytest

from linewatch.bus.messages import DeadLetter
from linewatch.bus.redact import RedactingFormatter, redact
from linewatch.cli import main
from linewatch.workers.anchors import AnchorCache

from helpers import error_line

SECRETS = ["hunter2", "s3cr3t-pw", "T0AB12CD3xyzB0XY45Z67abcdefGHIJKL", "tok_9f8e7d6c5b4a", "eyJhbGciOiJIUzI1NiJ9"]


@pytest.mark.parametrize("text, expected", [
    ("rtsp://admin:hunter2@cam.local:554/live", "rtsp://admin:***@cam.local:554/live"),
    ("redis://:hunter2@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("redis://user:p@ss@h:1/0 and then x@y", "redis://user:***@h:1/0 and then x@y"),
    ("POST https://hooks.slack.com/services/T0AB12CD3/B0XY45Z67/abcdefGHIJKL1234mnop failed",
     "POST https://hooks.slack.com/services/T0AB12CD3/B0XY45Z67/*** failed"),
    ("https://ops.example/hook?token=tok_9f8e7d6c5b4a&stream=cam", "https://ops.example/hook?token=***&stream=cam"),
    ("https://x.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x",
     "https://x.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("login failed: password=hunter2, user=bob", "login failed: password=***, user=bob"),
    ('{"password": "hunter2"}', '{"password": "***"}'),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x", "Authorization: Bearer ***"),
    ("redis-server --requirepass hunter2 --port 1", "redis-server --requirepass *** --port 1"),
    # issue 22: the URL pattern took the colon after the URL into the last segment, which then
    # was no token: path tokens are found up to any URL delimiter
    ("alerts output webhook is failing (webhook http://127.0.0.1:59671/hooks/x8Kq2Lm9Pz4Wn7Rt1Vb: [Errno 111] "
     "Connection refused)",
     "alerts output webhook is failing (webhook http://127.0.0.1:59671/hooks/***: [Errno 111] Connection refused)"),
    ("POST (https://h.example/a/x8Kq2Lm9Pz4Wn7Rt1Vb), then", "POST (https://h.example/a/***), then"),
    ("password: hunter2", "password: ***"), ("token:abc", "token:***"), ('"token": "abc"', '"token": "***"'),
])
def test_redact_masks_each_kind_of_secret(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


@pytest.mark.parametrize("text", [
    "kafka://127.0.0.1:9092", "s3://inspections/masks/cam/20261201T164824Z-a70cb7/0000000009.frame.jpg",
    "http://127.0.0.1:8333/bucket/cam/20261201T164824Z-a70cb7/0000000009.frame.jpg",
    "anchor key anchors:v1:0123abcd, a basic configuration", "frame 12 of drone-7 scored 0.93",
    "https://example.com/docs/page?lang=en",
    # issue 22: a lowercase word after "token: " is prose ("at" was masked)
    "console token: at least 16 characters of letters, digits and ._~+/=-", "token bucket at rate 5/s",
    "password: at least 8 characters",
])
def test_redact_leaves_plain_text_alone(text):
    assert redact(text) == text


def test_log_lines_are_redacted():
    formatter = RedactingFormatter("%(name)s: %(message)s")
    record = logging.LogRecord("linewatch.x", logging.WARNING, __file__, 1, "webhook %s failed: %s", (
        "https://ops.example/hook?token=tok_9f8e7d6c5b4a", "401 for user admin:hunter2@"), None)
    line = formatter.format(record)
    assert "tok_9f8e7d6c5b4a" not in line and "token=***" in line
    try:
        raise ValueError("cannot connect to redis://:hunter2@10.0.0.5:6379/0")
    except ValueError:
        import sys

        record = logging.LogRecord("linewatch.x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    assert "hunter2" not in formatter.format(record)  # the traceback too


def test_dead_letter_reasons_are_redacted():
    letter = DeadLetter(reason="WebhookOutput: POST https://hooks.slack.com/services/T0AB12CD3/B0XY45Z67/"
                               "abcdefGHIJKL1234mnop failed after 5 tries", stage="sink-alerts")
    assert "abcdefGHIJKL1234mnop" not in letter.reason and "/***" in letter.reason


def test_a_wrong_redis_password_is_never_printed(caplog):
    """Redis unreachable (here: nothing listens) with a password in the URL: the warning names
    Redis without the password (it was printed in full)."""
    from services import free_port

    cache = AnchorCache(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING):
        cache.republish()
        cache.local["k"] = object()  # something to write back, so Redis is asked
        cache.republish()
    text = " ".join(RedactingFormatter("%(message)s").format(r) for r in caplog.records)
    assert "unavailable" in text and "hunter2" not in text and "redis://:***@127.0.0.1" in text
    assert all("hunter2" not in r.getMessage() for r in caplog.records)  # even unformatted


def test_error_lines_are_redacted(capsys, monkeypatch):
    """Whatever a command fails with, its one error line goes through ``redact``."""
    from linewatch.cli import pipeline

    def fails(args):
        raise ValueError("cannot post to https://ops.example/hook?token=tok_9f8e7d6c5b4a (redis://:hunter2@r:6379)")

    monkeypatch.setitem(pipeline.HANDLERS, "worker", fails)
    assert main(["worker"]) == 2
    line = error_line(capsys)
    assert "tok_9f8e7d6c5b4a" not in line and "hunter2" not in line and "token=***" in line
    with pytest.raises(ValueError) as caught:  # and the messages themselves, where linewatch builds them
        AnchorCache("redis://:hunter2@[bad/0")
    assert "hunter2" not in str(caught.value)


def test_stream_urls_are_redacted_where_they_are_published():
    from linewatch.ingest.sources import mask_password

    for secret in SECRETS[:2]:
        assert secret not in mask_password(f"rtsp://admin:{secret}@cam/stream?token={secret}")


@pytest.mark.parametrize("url, secrets", [
    ("https://hooks.slack.com/services/T0AB12CD3/B0XY45Z67/abcdefGHIJKL1234mnop",
     ["T0AB12CD3", "B0XY45Z67", "abcdefGHIJKL1234mnop"]),  # "services" is a word, not a token
    ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/", ["A1BRTD4JD", "TIiajkdnlazkcOXrIdevi7FQ", "T1JJ3T3L2"]),
    ("rtsp://admin:pw12@cam:554/live2stream?token=abcd", ["pw12", "abcd"]),  # a camera's path is a name
    ("s3://inspections2026/runs2", []), ("redis://:pw5678@h:6379/0", ["pw5678"]),
    ("https://ops.example/hook?stream=cam-front&lang=en", []),
])
def test_the_secret_parts_of_a_url(url, secrets):
    from linewatch.bus.redact import url_secrets

    assert url_secrets(url) == secrets
