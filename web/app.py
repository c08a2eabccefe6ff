"""The web pages as one Starlette app, mounted by `serve` on the admin HTTP listener:
`routes(site)` gives the mount that cli.py passes to the listener."""

from __future__ import annotations

import logging
import string
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from web import dashboard, failures, ledger, playground, tickets
from web.auth import CSRF_FIELD, check_login, csrf_ok, current_user, log_in
from web.site import SecurityHeaders, Site, guarded
from web.throttle import retry_after

SESSION_COOKIE = "mailintake_session"
KEY_CHARACTERS = 200  # of a name tried, as the throttle remembers it

log = logging.getLogger(__name__)


PATH_CHARACTERS = frozenset(string.ascii_letters + string.digits + "/-_.")


def safe_next(target: str) -> str:
    """Where to go after login: only a plain path of this site (never `//host`, `/\\host` or
    anything a browser might read as another origin)."""
    plain = (
        target.startswith("/") and target[1:2] not in ("/", ".") and set(target) <= PATH_CHARACTERS
    )
    return target if plain else "/"


async def login_page(site: Site, request: Request) -> Response:
    if request.method == "GET":
        if current_user(site.settings, request) is not None:
            return RedirectResponse(safe_next(request.query_params.get("next", "/")), 303)
        return site.render(request, None, "login.html", next=request.query_params.get("next", "/"))
    async with request.form() as form:
        return await _log_in(site, request, form)


async def _log_in(site: Site, request: Request, form: FormData) -> Response:
    next_page = safe_next(str(form.get("next") or "/"))
    if not csrf_ok(request, form.get(CSRF_FIELD)):
        message = "The login form expired: try again."
        return site.render(
            request, None, "login.html", status_code=403, error=message, next=next_page
        )
    name = str(form.get("username") or "")
    address = request.client.host if request.client else "?"
    keys = (f"account:{name[:KEY_CHARACTERS]}", f"address:{address}")
    wait = site.throttle.wait(keys)
    if wait:
        log.warning("web login for %r from %s refused: too many failed logins", name, address)
        return _throttled(site, request, wait, next_page)
    user = check_login(site.settings, name, str(form.get("password") or ""))
    if user is None:
        site.throttle.failed(keys)
        log.info("web login for %r from %s failed", name, address)
        message = "Unknown name or wrong password."
        return site.render(
            request, None, "login.html", status_code=401, error=message, next=next_page
        )
    site.throttle.succeeded(keys[0])
    log_in(request, user)
    return RedirectResponse(next_page, 303)


def _throttled(site: Site, request: Request, wait: float, next_page: str) -> Response:
    """429 before any password is checked (so it says nothing about the password)."""
    message = (
        "Too many failed logins for this name or from this address: "
        f"try again in {retry_after(wait)} seconds."
    )
    refused = site.render(
        request, None, "login.html", status_code=429, error=message, next=next_page
    )
    refused.headers["Retry-After"] = retry_after(wait)
    return refused


async def logout(request: Request) -> Response:
    async with request.form() as form:
        if csrf_ok(request, form.get(CSRF_FIELD)):
            request.session.clear()
    return RedirectResponse("/login", 303)


def create_web_app(site: Site) -> Starlette:
    async def login(request: Request) -> Response:
        return await login_page(site, request)

    routes: list[BaseRoute] = [
        Route("/", guarded(site, dashboard.dashboard)),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/ledger", guarded(site, ledger.ledger)),
        Route("/messages/{inbound_id:int}", guarded(site, ledger.message)),
        Route("/messages/{inbound_id:int}/raw", guarded(site, ledger.export_raw)),
        Route("/attachments/{attachment_id:int}", guarded(site, ledger.attachment)),
        Route("/failures", guarded(site, failures.failures)),
        Route("/failures/replay", guarded(site, failures.replay_action, "admin"), methods=["POST"]),
        Route(
            "/failures/discard", guarded(site, failures.discard_action, "admin"), methods=["POST"]
        ),
        Route("/tickets", guarded(site, tickets.tickets)),
        Route("/tickets/{key}", guarded(site, tickets.ticket)),
        Route("/playground", guarded(site, playground.playground)),
        Route("/playground", guarded(site, playground.try_out), methods=["POST"]),
        Mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static"),
    ]
    secret = site.settings.web.secret
    assert secret is not None, "web.enabled is validated to come with web.secret"
    session = Middleware(
        SessionMiddleware,
        secret_key=secret.get_secret_value(),
        session_cookie=SESSION_COOKIE,
        max_age=site.settings.web.session_max_age_seconds,
        same_site="strict",
    )
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders), session])


def web_routes(site: Site) -> list[BaseRoute]:
    """What the admin HTTP listener adds after /metrics, /healthz and /readyz."""
    return [Mount("", app=create_web_app(site))]
