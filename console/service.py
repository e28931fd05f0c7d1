"""The console as a running thing: its parts (store, live view, archive files, bus readers)
and the web server (uvicorn on a thread of its own, on a socket bound here so a taken port is
one error line). ``linewatch console`` and ``linewatch run --console`` both use ``serve``."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable

from ..bus import Bus
from ..workers.profiles import ProfileTable
from .files import ArchiveFiles
from .guard import is_loopback
from .live import LiveState
from .readers import Readers
from .store import ConsoleStore

log = logging.getLogger(__name__)

TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
S3_INDEX = "~/.cache/linewatch/console.sqlite"


def console_token(settings) -> str | None:
    """The configured token (``console.token`` or ``console.token_file``), checked."""
    from ..pipeline.settings import secret

    c = settings.console
    token = secret(c.token, c.token_file, "console.token_file") or None  # empty (compose's default): none
    if token is not None and not TOKEN.fullmatch(token):
        raise ValueError("console token: at least 16 characters of letters, digits and ._~+/=- "
                         "(e.g. `openssl rand -hex 32`)")
    if token is None and not is_loopback(c.host):
        raise ValueError(f"the console binds {c.host}, beyond this machine: it needs a token "
                         "(LINEWATCH_CONSOLE__TOKEN or console.token_file), or bind 127.0.0.1")
    return token


class Console:
    """``bus``: where the live scores, frames and alerts come from (None: the archive and what
    the store kept only); ``policy_for``: the alert policies, for replay compare."""

    def __init__(self, settings, bus: Bus | None = None, policy_for: Callable | None = None):
        self.settings, self.bus, self.policy_for = settings, bus, policy_for
        c = settings.console
        self.token = console_token(settings)
        self.loopback = is_loopback(c.host)
        self.files = ArchiveFiles(settings.archive) if settings.archive else None
        if self.files is not None and not self.files.s3 and not self.files.folder.is_dir():
            raise ValueError(f"archive folder not found: {settings.archive}")
        index = c.index or (self.files.index_path if self.files is not None and not self.files.s3 else S3_INDEX)
        self.store = ConsoleStore(index)
        for review in self.files.kept_reviews() if self.files is not None else ():
            known = {r["event_id"]: r for r in self.store.reviews()}.get(review["event_id"])
            if known is None or (known["at"] or 0) < review.get("at", 0):
                self.store.review(review["event_id"], review.get("verdict"), review.get("note", ""), review.get("at"))
        self.profiles = ProfileTable(settings.profile, settings.streams, check=False)
        self.live = LiveState(c.history_s)
        self.stop = threading.Event()
        self.readers = Readers(bus, self.live, self.store, self.stop) if bus is not None else None

    def close(self, drain: bool = False) -> None:
        """``drain``: first read what the bus still holds (the end of a run being recorded)."""
        if self.readers is not None:
            self.readers.drain = drain
        self.stop.set()
        if self.readers is not None:
            self.readers.join()
        self.store.close()


def record(settings, bus: Bus) -> Console:
    """Records a run's events into its archive's index as a console would, serving nothing, so
    ``linewatch console --archive DIR`` shows them later; ``close(drain=True)`` once the run is done."""
    quiet = settings.console.model_copy(update={"host": "127.0.0.1"})  # serves nothing: no token to ask for
    console = Console(settings.model_copy(update={"console": quiet}), bus)
    console.readers.start()
    return console


class ConsoleServer:
    """Serves ``console`` on ``host:port`` (port 0: any free one; see ``url``)."""

    def __init__(self, console: Console, host: str, port: int):
        import uvicorn

        from .app import build_app

        self.console = console
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family, reuse_port=False)
        except OSError as err:
            raise OSError(f"cannot serve the console on {host}:{port}: {err.strerror or err} "
                          "(another process there? pick another --console-port / --port, or 0 for any free one)") from None
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(build_app(console), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="console-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> ConsoleServer:
        if self.console.readers is not None:
            self.console.readers.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise OSError(f"the console's web server did not start on {self.url}")
        if self.console.token is None:
            log.info("console at %s (loopback: no token)", self.url)
        else:
            log.info("console at %s: every request needs the token (Authorization: Bearer TOKEN, basic auth with "
                     "the token as password, or open %s?token=TOKEN once)", self.url, self.url)
        return self

    def stop(self) -> None:
        self.console.stop.set()  # ends the live streams
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
        self.console.close()

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(settings, bus: Bus | None = None, policy_for: Callable | None = None,
          port: int | None = None) -> ConsoleServer:
    """A started console server for these settings (``port`` overrides ``console.port``)."""
    console = Console(settings, bus, policy_for)
    try:
        return ConsoleServer(console, settings.console.host,
                             settings.console.port if port is None else port).start()
    except BaseException:
        console.close()
        raise

