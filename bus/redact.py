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
- ``password=...``, ``token: ...``, ``Authorization: Bearer ...`` outside URLs (a value that
  is a plain lowercase word, as in ``token: at least 16 characters``, is prose, not a secret);
- every value registered with ``register_secret`` (settings, outputs and clients register
  theirs at start-up), wherever and however it appears: the patterns above guess at spellings,
  the registry follows the secret itself (``webhook https://h/hooks/<token>: refused``).
Pattern rules stop at URL delimiters (``:``, ``,``, ``)`` ... after a token). Redacting twice
gives the same text; plain text passes unchanged.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse

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
# a token inside a path segment, delimited by anything that is not a token character (so
# ``<token>:`` or ``<token>)`` at the end of a URL in prose is still found)
_TOKEN_SEGMENT = re.compile(r"(?<![A-Za-z0-9_-])(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Za-z])"
                            r"[A-Za-z0-9_-]{16,}(?![A-Za-z0-9_-])")
_SESSION_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")  # linewatch's own ingest sessions: not secrets
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>(?!\*\*\*)[A-Za-z0-9._~+/=-]{8,})")
_KEY_VALUE = re.compile(rf"(?P<head>(?<![\w/?&;.-])(?:{_TEXT_NAMES})[\"']?\s*[=:]\s*[\"']?(?:(?:Basic|Bearer)\s+)?)"
                        rf"(?P<secret>(?!\*\*\*|(?:Basic|Bearer)\s)[^\s,;&'\"]+)", re.IGNORECASE)
# ``token: at least ...``: a lowercase word after "name: " is prose, not a secret
_PROSE_WORD, _PROSE_SEPARATOR = re.compile(r"[a-z]{1,12}"), re.compile(r":\s+$")
MIN_SECRET_CHARS = 4  # shorter registered values are ignored: they would mask ordinary words
_REQUIREPASS = re.compile(r"(?P<head>--requirepass[= ]\s*)(?P<secret>\S+)")


def redact(text: object) -> str:
    """``text`` (anything; ``str()`` of it) with every secret it carries masked."""
    text = str(text)
    if not text:
        return text
    known = _registry.pattern
    if known is not None:
        text = known.sub(MASK, text)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", text)
    text = _WEB_URL.sub(_mask_path_tokens, text)
    text = _KEY_VALUE.sub(_mask_key_value, text)
    text = _BEARER.sub(lambda m: f"{m['head']}{MASK}", text)
    return _REQUIREPASS.sub(lambda m: f"{m['head']}{MASK}", text)


def _mask_path_tokens(match: re.Match) -> str:
    url, path = match[0], match["path"]
    masked = _TOKEN_SEGMENT.sub(lambda m: m[0] if _SESSION_ID.fullmatch(m[0]) else MASK, path)
    return url[: len(url) - len(path)] + masked


def _mask_key_value(match: re.Match) -> str:
    head, value = match["head"], match["secret"]
    if _PROSE_WORD.fullmatch(value) and _PROSE_SEPARATOR.search(head):
        return match[0]  # ``token: at least 16 characters``: prose; ``password=hunter``, ``"token": "x"`` stay masked
    return f"{head}{MASK}"


class _Registry:
    """The exact secret values this process holds, as one alternation (longest first, so a
    secret that contains another is masked whole). Swapped, never mutated: ``redact`` reads
    ``pattern`` without the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.values: set[str] = set()
        self.pattern: re.Pattern | None = None

    def add(self, value: str) -> None:
        spellings = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe=""),
                     urllib.parse.quote(value)}
        with self.lock:
            if spellings <= self.values:
                return
            self.values |= spellings
            ordered = sorted(self.values, key=len, reverse=True)
            self.pattern = re.compile("|".join(map(re.escape, ordered)))

    def clear(self) -> None:
        with self.lock:
            self.values, self.pattern = set(), None


_registry = _Registry()


def register_secret(value: object) -> None:
    """Mask ``value`` (a str, a pydantic SecretStr or bytes) wherever it appears in redacted
    text from now on, also URL-encoded. None, and values shorter than MIN_SECRET_CHARS (they
    would mask ordinary words), are ignored. Thread-safe."""
    if value is None:
        return
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = str(value).strip()
    if len(value) >= MIN_SECRET_CHARS:
        _registry.add(value)


def register_url_secrets(url: object) -> None:
    """Register the parts of ``url`` that are secrets: its password, its query values, and its
    host and path segments that look like tokens (``url_secrets``)."""
    for part in url_secrets(url):
        register_secret(part)


def url_secrets(url: object) -> list[str]:
    """The secret parts of a URL: the password of ``user:password@``, the values of secret-named
    query parameters (``?token=``), and each other query value, path segment (web and Apprise
    URLs, not linewatch's own services') and part of the host (Apprise's
    ``slack://TokenA/TokenB/TokenC`` carries its tokens there) that looks like a token: 8 or
    more characters mixing letters and digits, or 20 or more. Plain words (``services``) stay."""
    if hasattr(url, "get_secret_value"):
        url = url.get_secret_value()
    text = str(url or "")
    try:
        parts = urllib.parse.urlsplit(text)
        password = parts.password
    except ValueError:  # not a URL we can split: the whole value is the secret
        return [text]
    found = [password] if password else []
    candidates = []
    for name, value in urllib.parse.parse_qsl(parts.query):
        (found if re.fullmatch(_QUERY_NAMES, name, re.IGNORECASE) else candidates).append(value)
    scheme = parts.scheme.lower()
    if scheme not in _SERVICE_SCHEMES:  # a web hook's path; an Apprise URL's path and host
        candidates += [urllib.parse.unquote(p) for p in re.split(r"[/@:;,]", parts.path)]
        if scheme not in ("http", "https"):
            candidates += [urllib.parse.unquote(p) for p in re.split(r"[@:]", parts.netloc)]
    return found + [part for part in candidates if _looks_like_token(part)]


# linewatch's own services: their paths and hosts are names (a bucket, a camera's stream), not secrets
_SERVICE_SCHEMES = ("kafka", "redis", "rediss", "s3", "mqtt", "mqtts", "rtsp", "rtsps", "rtmp", "srt", "udp", "tcp")


def _looks_like_token(part: str) -> bool:
    mixed = any(c.isdigit() for c in part) and any(c.isalpha() for c in part)
    return (len(part) >= 8 and mixed) or len(part) >= 20


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line (message, arguments, traceback) went through ``redact``.
    A formatter rather than a filter: tqdm's logging redirect copies handlers' formatters."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
