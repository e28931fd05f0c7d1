"""Who may talk to the console (an ASGI middleware in front of every route).

- **Token.** Bound anywhere but loopback, the console refuses to start without a token, and
  every request must carry it: ``Authorization: Bearer <token>``, HTTP basic auth with the
  token as the password (the browser asks), or the ``lw_token`` cookie, which
  ``/?token=<token>`` sets once (HttpOnly, SameSite=Strict) before redirecting to ``/``.
  Refused: 401. On loopback no token is needed unless one is configured.
- **Loopback without a token** answers only requests whose ``Host`` is a loopback name, so a
  web page elsewhere cannot reach it through a DNS name that points at 127.0.0.1.
- **Changes** (POST) must be JSON and, when the browser names an ``Origin``, come from the
  console's own origin: no other site can submit a review from an operator's browser.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import urllib.parse
from http.cookies import SimpleCookie

COOKIE = "lw_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    def __init__(self, app, token: str | None, loopback: bool):
        self.app, self.token, self.loopback = app, token, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if self.token is None:
            try:
                host = urllib.parse.urlsplit("//" + headers.get("host", "")).hostname
            except ValueError:
                host = None
            if host not in LOOPBACK_NAMES:
                return await _answer(send, 403, "the console answers on a loopback name only (127.0.0.1, localhost)")
        else:
            given = query.get("token", [None])[0]
            if given is not None and scope["path"] == "/" and self._matches(given):
                return await _redirect_with_cookie(send, self.token)
            if not self._authorised(headers):
                return await _answer(send, 401, "this console needs its token", {
                    "www-authenticate": 'Basic realm="linewatch console", charset="UTF-8"'})
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            if not headers.get("content-type", "").startswith("application/json"):
                return await _answer(send, 415, "send JSON")
            origin = headers.get("origin")
            if origin is not None and urllib.parse.urlsplit(origin).netloc != headers.get("host"):
                return await _answer(send, 403, "a change from another site's page is refused")
        return await self.app(scope, receive, send)

    def _matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _authorised(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and self._matches(value.strip()):
            return True
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return self._matches(password)
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is no token
            return False
        return COOKIE in cookie and self._matches(cookie[COOKIE].value)


async def _answer(send, status: int, text: str, extra: dict | None = None) -> None:
    body = json.dumps({"detail": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _redirect_with_cookie(send, token: str) -> None:
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
