"""Secrets out of text: the one function every log line (``RedactingFormatter``), dead-letter
reason (``DeadLetter``) and error line (the CLI) goes through.

What it hides, anywhere in the text:
- URL credentials: ``rtsp://admin:pw@cam`` -> ``rtsp://admin:***@cam``, ``redis://:pw@host``
  -> ``redis://:***@host``;
- secret-looking query parameters: ``?token=abc`` -> ``?token=***`` (token, key, secret,
  password, signature, auth, code, ...);
- token-like path segments of web URLs (webhooks put their secret in the path:
  ``https://hooks.slack.com/services/T0/B0/XXXX``): a segment of 16 or more characters
  mixing letters and digits becomes ``***`` (linewatch's session ids excepted);
- ``password=...``, ``token: ...``, ``Authorization: Bearer ...`` outside URLs.
Redacting twice gives the same text; plain text passes unchanged.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# names of secrets in a URL query, and (fewer: "key" or "code" alone are common words) in free text
_QUERY_NAMES = (r"pass(?:word|wd)?|pwd|secret|token|access[_-]?token|api[_-]?key|apikey|key|auth|authorization|sig"
                r"|signature|credentials?|session[_-]?token|x-amz-signature|x-amz-credential|x-amz-security-token|code")
_TEXT_NAMES = (r"pass(?:word|wd)?|pwd|secret|token|access[_-]?token|api[_-]?key|apikey|access[_-]?key|secret[_-]?key"
               r"|private[_-]?key|authorization|credentials?")
# scheme://user:password@ or scheme://:password@ (a password may hold '@': up to the last one)
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:?#'\"]*):(?P<secret>[^\s/?#'\"]+)@")
_QUERY_SECRET = re.compile(rf"(?P<head>[?&;](?:{_QUERY_NAMES})=)(?P<secret>[^&#\s'\"]+)", re.IGNORECASE)
_WEB_URL = re.compile(r"\bhttps?://[^\s/'\"]+(?P<path>/[^\s?#'\"]*)", re.IGNORECASE)
_TOKEN_SEGMENT = re.compile(r"(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{16,}")
_SESSION_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")  # linewatch's own ingest sessions: not secrets
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>(?!\*\*\*)[A-Za-z0-9._~+/=-]{8,})")
_KEY_VALUE = re.compile(rf"(?P<head>(?<![\w/?&;.-])(?:{_TEXT_NAMES})[\"']?\s*[=:]\s*[\"']?(?:(?:Basic|Bearer)\s+)?)"
                        rf"(?P<secret>(?!\*\*\*|(?:Basic|Bearer)\s)[^\s,;&'\"]+)", re.IGNORECASE)
_REQUIREPASS = re.compile(r"(?P<head>--requirepass[= ]\s*)(?P<secret>\S+)")


def redact(text: object) -> str:
    """``text`` (anything; ``str()`` of it) with every secret it carries masked."""
    text = str(text)
    if not text:
        return text
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", text)
    text = _WEB_URL.sub(_mask_path_tokens, text)
    text = _KEY_VALUE.sub(lambda m: f"{m['head']}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m['head']}{MASK}", text)
    return _REQUIREPASS.sub(lambda m: f"{m['head']}{MASK}", text)


def _mask_path_tokens(match: re.Match) -> str:
    url, path = match[0], match["path"]
    masked = "/".join(MASK if _TOKEN_SEGMENT.fullmatch(part) and not _SESSION_ID.fullmatch(part) else part
                      for part in path.split("/"))
    return url[: len(url) - len(path)] + masked


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line (message, arguments, traceback) went through ``redact``.
    A formatter rather than a filter: tqdm's logging redirect copies handlers' formatters."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
