"""The admin HTTP listener of `mailintake serve` (`http.host`/`http.port`, default
127.0.0.1:9025): an ASGI app (Starlette) served by uvicorn inside the service's own event loop,
as a background task; no thread of its own. Endpoints:

- `/metrics`: Prometheus text format (sources/metrics.py says where each number comes from).
- `/healthz`: 200 `{"alive": true}` while the process answers at all.
- `/readyz`: 200 `{"ready": true, "reasons": [], "checks": {...}}` while intake works; 503 with
  `"ready": false` and one plain sentence per problem in `reasons` when the database cannot be
  read, an IMAP fetcher has not synced for `imap.stalled_after_seconds`, or the oldest
  unprocessed message has waited longer than `processing.stall_after_seconds`.

Handlers that touch the database are plain functions: Starlette runs them in its thread pool,
so a slow database never holds the SMTP listener's event loop. The web pages (web/, when
`web.enabled`) come in as `extra` routes from the command line, which composes them: this
module never imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from config import Settings
from sources.metrics import Metrics, Parts, ledger_state
from storage import repo

log = logging.getLogger(__name__)

STARTUP_POLL_SECONDS = 0.01
SHUTDOWN_GRACE_SECONDS = 2.0  # scrapes in progress at shutdown


class Readiness:
    """Whether intake works: the checks behind /readyz."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], parts: Parts) -> None:
        self.settings = settings
        self.sessions = sessions
        self.parts = parts

    def check(self) -> dict[str, Any]:
        reasons: list[str] = []
        checks: dict[str, Any] = {}
        try:
            with self.sessions() as session:
                repo.ping(session)
                state = ledger_state(session)
        except SQLAlchemyError as exc:
            reason = f"database unreachable: {first_line(exc)}"
            reasons.append(reason)
            checks["database"] = reason
        else:
            checks["database"] = "ok"
            age = state.oldest_age()
            limit = self.settings.processing.stall_after_seconds
            checks["processing"] = {"backlog": state.backlog, "oldest_age_seconds": round(age, 1)}
            if state.backlog and age >= limit:
                reasons.append(
                    f"processing stalled: the oldest of {state.backlog} unprocessed messages has "
                    f"waited {age:.0f} s (processing.stall_after_seconds is {limit:g})"
                )
        fetchers: dict[str, str] = {}
        for fetcher in self.parts.fetchers:
            quiet = fetcher.seconds_since_success
            if fetcher.stalled:
                fetchers[fetcher.label] = "stalled"
                reasons.append(
                    f"imap {fetcher.label} stalled: no successful fetch for {quiet:.0f} s "
                    f"(imap.stalled_after_seconds is {self.settings.imap.stalled_after_seconds:g})"
                )
            else:
                fetchers[fetcher.label] = fetcher.state
        if fetchers:
            checks["imap"] = fetchers
        return {"ready": not reasons, "reasons": reasons, "checks": checks}


def first_line(exc: BaseException) -> str:
    """The database's own words (never the statement or its parameters), in one line."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__


def create_app(
    metrics: Metrics, readiness: Readiness, extra: Sequence[BaseRoute] = ()
) -> Starlette:
    """The admin endpoints, then `extra` (matched after them)."""

    def scrape(_request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"alive": True})

    def readyz(_request: Request) -> JSONResponse:
        body = readiness.check()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    routes: list[BaseRoute] = [
        Route("/metrics", scrape),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        *extra,
    ]
    return Starlette(routes=routes)


class _Server(uvicorn.Server):
    """uvicorn inside `serve`'s loop: the service handles SIGTERM/SIGINT, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """The app on a socket bound by us (so a taken port is reported like SMTP's)."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.host, self.port = host, port
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_SECONDS),
        )
        self.server = _Server(config)
        self.socket: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.socket is not None, "the listener is not started"
        host, port = self.socket.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        """Bind (OSError if it cannot) and serve in a task of the running loop."""
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        self.socket = socket.create_server((self.host, self.port), family=family)
        self.task = asyncio.create_task(self.server.serve([self.socket]), name="http")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError("the HTTP listener stopped at start")
            await asyncio.sleep(STARTUP_POLL_SECONDS)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), SHUTDOWN_GRACE_SECONDS * 2)
        except TimeoutError:
            self.task.cancel()
            log.warning("HTTP listener did not stop in time")
        except Exception:
            log.exception("HTTP listener stopped with an error")
        if self.socket is not None:
            self.socket.close()
