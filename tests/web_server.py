"""The web pages on a real admin HTTP listener (uvicorn on a free 127.0.0.1 port) in a thread,
with an admin and a viewer account, and a small HTTP client that logs in like a browser."""

from __future__ import annotations

import asyncio
import functools
import http.client
import http.cookiejar
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from rules.reload import RulesHolder
from sources.http import HttpListener, Readiness, create_app
from sources.metrics import Metrics, Parts
from web.app import web_routes
from web.auth import hash_password
from web.site import Site

ADMIN, VIEWER = ("tanaka", "admin-password-1"), ("suzuki", "viewer-password-1")
SECRET = "test-secret-0123456789abcdef"
RULES = """\
people:
  yamada: {display_name: 山田 太郎, email: yamada@example.jp}
  sato: {display_name: 佐藤 花子, email: sato@example.jp}
categories: [inquiry, order]
priorities: [normal, high]
defaults: {category: inquiry, assignee: yamada, priority: normal}
rules:
  - name: order-by-subject
    when: {subject: {contains: 注文}}
    then: {category: order, assignee: sato, priority: high}
"""
_HASHES: dict[str, str] = {}


def web_settings(db_url: str, rules_path: Path, **http: object) -> Settings:
    for name, password in (ADMIN, VIEWER):
        _HASHES.setdefault(name, hash_password(password))  # argon2 is slow on purpose: once
    accounts = {
        ADMIN[0]: {"role": "admin", "password_hash": _HASHES[ADMIN[0]]},
        VIEWER[0]: {"role": "viewer", "password_hash": _HASHES[VIEWER[0]]},
    }
    return Settings(
        database={"url": db_url},
        rules={"path": rules_path},
        http={"port": 0, **http},
        web={"enabled": True, "secret": SECRET, "accounts": accounts},
    )


@dataclass
class WebServer:
    """The admin listener with the web routes, as `serve` composes them, in its own loop."""

    settings: Settings
    sessions: sessionmaker[Session]
    clock: Callable[[], float] = time.monotonic  # the login throttle's
    url: str = ""
    holder: RulesHolder = field(init=False)
    _loop: asyncio.AbstractEventLoop = field(init=False)
    _thread: threading.Thread = field(init=False)
    _listener: HttpListener = field(init=False)

    def start(self) -> WebServer:
        assert self.settings.rules.path is not None
        self.holder = RulesHolder.load(self.settings.rules.path, self.settings.zone)
        parts = Parts(rules=self.holder)
        site = Site(self.settings, self.sessions, parts, self.clock)
        app = create_app(
            Metrics(self.sessions, parts, None),
            Readiness(self.settings, self.sessions, parts),
            web_routes(site),
        )
        self._listener = HttpListener(app, "127.0.0.1", 0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listener.start(), self._loop).result()
        host, port = self._listener.address
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listener.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


CSRF_RE = re.compile(r'name="csrf-token" content="([^"]+)"')


@dataclass
class Reply:
    status: int
    body: str
    url: str


class FromAddress(urllib.request.HTTPHandler):
    """Connects from a given local address (any of 127.0.0.0/8 reaches the loopback server)."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(http.client.HTTPConnection, source_address=(self.address, 0))
        return self.do_open(connection, req)


class Client:
    """A cookie-keeping HTTP client: what a browser does, without the browser; `source` is
    the local address it connects from (another client address for the server)."""

    def __init__(
        self, base: str, headers: dict[str, str] | None = None, source: str | None = None
    ) -> None:
        self.base = base
        self.headers = headers or {}
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        ]
        if source is not None:
            handlers.append(FromAddress(source))
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, form: Mapping[str, object] | None = None) -> Reply:
        data = urllib.parse.urlencode(form, doseq=True).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers)
        try:
            with self.opener.open(req) as reply:
                return Reply(reply.status, reply.read().decode(), reply.url)
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read().decode(), exc.url)

    def csrf(self, path: str = "/login") -> str:
        match = CSRF_RE.search(self.request(path).body)
        assert match, f"no CSRF token on {path}"
        return match.group(1)

    def login(self, name: str, password: str) -> Reply:
        token = self.csrf()
        form = {"csrf": token, "username": name, "password": password, "next": "/"}
        return self.request("/login", form)
