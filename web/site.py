"""What every page shares: the service's parts (`Site`), the Jinja2 templates and their
filters, the guard that checks login, role and CSRF token, and the security headers."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import FormData, MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import Settings
from pipeline.context import PipelineContext
from rules.engine import CompiledRules, RulesRouter
from sources.metrics import Parts
from web.auth import CSRF_FIELD, Role, User, csrf_ok, csrf_token, current_user
from web.throttle import LoginThrottle

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
SECURITY_HEADERS = {
    # No script, no inline style, no foreign origin: mail text shown here cannot act.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Site:
    """The service's parts the pages read and act with."""

    settings: Settings
    sessions: sessionmaker[Session]
    parts: Parts = field(default_factory=Parts)  # the rules and templates in force
    clock: Callable[[], float] = time.monotonic  # for the login throttle (tests move it)
    templates: Jinja2Templates = field(init=False)
    throttle: LoginThrottle = field(init=False)

    def __post_init__(self) -> None:
        env = Environment(
            loader=PackageLoader("web", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        env.filters["when"] = self.when
        env.filters["lang"] = lang_of
        self.templates = Jinja2Templates(env=env)
        web = self.settings.web
        self.throttle = LoginThrottle(
            web.login_failure_limit, web.login_failure_window_seconds, self.clock
        )

    def pipeline(self) -> PipelineContext:
        """The pipeline with the rules and templates the service has now (reloads included),
        as `failed replay` would build it from the files."""
        ctx = PipelineContext(self.settings, self.sessions)
        if self.parts.rules is not None:
            ctx.router = RulesRouter(self.parts.rules.current)
        if self.parts.templates is not None:
            ctx.template_source = self.parts.templates.current
        return ctx

    def rules(self) -> CompiledRules | None:
        """The rules the service routes with now (None without a rules file)."""
        holder = self.parts.rules
        return holder.current() if holder is not None else None

    def when(self, moment: datetime | None) -> str:
        """A stored (UTC) time in the configured zone."""
        return moment.astimezone(self.settings.zone).strftime(TIME_FORMAT) if moment else ""

    def render(
        self,
        request: Request,
        user: User | None,
        name: str,
        status_code: int = 200,
        **values: Any,
    ) -> HTMLResponse:
        context = {"user": user, "csrf": csrf_token(request), "zone": self.settings.timezone}
        response = self.templates.TemplateResponse(
            request, name, context | values, status_code=status_code
        )
        return response


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response of the web pages (downloads included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def lang_of(text: str | None) -> str:
    """`ja` for text with kana or kanji (so the browser picks Japanese glyphs), else `en`."""
    for char in text or "":
        name = unicodedata.name(char, "")
        if name.startswith(("CJK", "HIRAGANA", "KATAKANA", "FULLWIDTH", "HALFWIDTH KATAKANA")):
            return "ja"
    return "en"


def searchable(text: str) -> str:
    """Text compared by the search box: NFKC (full-width ＡＢＣ and half-width ｶﾅ match their
    usual forms) and case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


Handler = Callable[[Site, Request, User], Awaitable[Response]]


def form_of(request: Request) -> FormData:
    """The POST's form, read (and its CSRF token checked) by `guarded`."""
    form: FormData = request.state.form
    return form


def guarded(
    site: Site, handler: Handler, role: Role = "viewer"
) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint: login required (GETs go to the login page), on POST a valid CSRF token,
    and `role` (admin actions refuse viewers with 403)."""

    async def endpoint(request: Request) -> Response:
        user = current_user(site.settings, request)
        if user is None:
            if request.method == "GET":
                return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)
            return refusal(site, request, None, 401, "Log in first.")
        if request.method != "POST":
            return await allowed(request, user)
        async with request.form() as form:  # uploads (spooled files) are closed after
            if not csrf_ok(request, form.get(CSRF_FIELD)):
                message = "The form's CSRF token is missing or wrong: reload the page and retry."
                return refusal(site, request, user, 403, message)
            request.state.form = form
            return await allowed(request, user)

    async def allowed(request: Request, user: User) -> Response:
        if role == "admin" and not user.is_admin:
            return refusal(site, request, user, 403, "This needs the admin role.")
        return await handler(site, request, user)

    return endpoint


def refusal(site: Site, request: Request, user: User | None, status: int, message: str) -> Response:
    return site.render(request, user, "refused.html", status_code=status, message=message)
