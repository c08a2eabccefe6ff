"""Who is asking, and may they: accounts from `web.accounts` (argon2 hashes) or a trusted
reverse proxy's header (`http.trust_proxy_user`), a signed session cookie, and a CSRF token per
session that every form carries and every POST must return."""

from __future__ import annotations

import functools
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.requests import Request

from config import Settings

Role = Literal["admin", "viewer"]
CSRF_FIELD = "csrf"

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so a wrong name costs as long as a wrong
    password (made on first use: nothing is hashed at import)."""
    return _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class User:
    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_login(settings: Settings, name: str, password: str) -> User | None:
    """The account if `password` is its password; None otherwise (same work either way)."""
    account = settings.web.accounts.get(name)
    stored = account.password_hash if account is not None else None
    wanted = stored.get_secret_value() if stored is not None else _dummy_hash()
    try:
        _hasher.verify(wanted, password)
    except (VerificationError, InvalidHashError):
        return None
    return User(name, account.role) if account is not None and stored is not None else None


def current_user(settings: Settings, request: Request) -> User | None:
    """The proxy's user when a proxy header is trusted, else the session's; the role is read
    from the configuration on every request, so a removed account is out at once."""
    header = settings.http.trust_proxy_user
    if header:
        name = request.headers.get(header, "").strip()
        if name:
            account = settings.web.accounts.get(name)
            return User(name, account.role if account else settings.web.proxy_default_role)
    stored = request.session.get("user")
    account = settings.web.accounts.get(stored) if isinstance(stored, str) else None
    if account is None or account.password_hash is None or not isinstance(stored, str):
        return None
    return User(stored, account.role)


def csrf_token(request: Request) -> str:
    """This session's token, made on first use."""
    token = request.session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session[CSRF_FIELD] = token
    return token


def csrf_ok(request: Request, sent: object) -> bool:
    token = request.session.get(CSRF_FIELD)
    return isinstance(token, str) and isinstance(sent, str) and hmac.compare_digest(token, sent)


def log_in(request: Request, user: User) -> None:
    """A fresh session (no fixation) holding the user and a new CSRF token."""
    request.session.clear()
    request.session["user"] = user.name
    csrf_token(request)
