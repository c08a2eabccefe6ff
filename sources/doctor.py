"""`mailintake doctor`: is this installation ready to run? Each check reads the configuration
and reaches out for real (the database, the ports, the IMAP servers) and says OK, FAIL (with how
to fix it) or SKIP (with why); nothing is written anywhere.

The rules and templates are loaded by the very functions `rules check` and `serve` use, so
whatever they refuse, doctor refuses too.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from config import (
    ConfigError,
    ImapAccount,
    ListenerSettings,
    Problem,
    Settings,
    config_path,
    load_settings,
)
from ingest.extract import load_templates
from rules.load import RulesError, auth_without_authserv_id, load_rules
from sources.http import first_line
from sources.imap import CredentialError, FolderFetcher, Hooks, connect
from storage import db

NETWORK_TIMEOUT_SECONDS = 10.0  # at most this per IMAP server or /healthz, however configured


class Outcome(enum.StrEnum):
    OK = "OK"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def ok(name: str, detail: str) -> Check:
    return Check(name, Outcome.OK, detail)


def skip(name: str, why: str) -> Check:
    return Check(name, Outcome.SKIP, why)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, Outcome.FAIL, detail, fix)


def diagnose(config: Path | None) -> list[Check]:
    """Every check, in the order a person would fix them."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        fix = "correct the keys named (docs/config.md lists every key and its variable)"
        return [
            failed("config", str(exc), fix),
            skip("everything else", "needs a valid configuration"),
        ]
    chosen = config_path(config)
    where = f"{chosen}: valid" if chosen.exists() else f"no {chosen}: built-in defaults"
    if any(name.startswith("MAILINTAKE_") for name in os.environ):
        where += " (with MAILINTAKE_* variables)"
    checks = [ok("config", where)]
    checks += database_checks(settings)
    checks += rules_checks(settings)
    checks.append(templates_check(settings))
    checks += port_checks(settings)
    checks += imap_checks(settings)
    return checks


# --- database ----------------------------------------------------------------------------------


def database_checks(settings: Settings) -> list[Check]:
    url = settings.database.url
    if db.missing_sqlite_file(url):
        return [
            ok("database", "the SQLite file does not exist yet: `serve` creates it at start"),
            skip("database schema", "created at the newest migration with the file"),
        ]
    engine = db.make_engine(url, **settings.database.engine_options())
    try:
        current = db.current_revision(engine)
    except SQLAlchemyError as exc:
        fix = "check database.url (MAILINTAKE_DATABASE__URL) and that the server runs"
        return [
            failed("database", f"unreachable: {first_line(exc)}", fix),
            skip("database schema", "needs the database"),
        ]
    finally:
        engine.dispose()
    reached = ok("database", f"reachable ({engine.url.get_backend_name()})")
    head = db.head_revision()
    if current != head:
        detail = f"at {current or 'nothing'}, this version needs {head}"
        return [reached, failed("database schema", detail, "run `mailintake db upgrade`")]
    return [reached, ok("database schema", f"at the newest migration ({head})")]


# --- rules and templates ----------------------------------------------------------------------


def rules_checks(settings: Settings) -> list[Check]:
    path = settings.rules.path
    if path is None:
        why = "no rules.path: every ticket gets the `tickets:` defaults"
        return [skip("rules", why), skip("rules authserv_id", why)]
    unsure = auth_without_authserv_id(path, settings.authserv_id)
    try:
        rules = load_rules(path, settings.zone, settings.authserv_id)
    except RulesError as exc:
        fix = "correct the file; `mailintake rules check` lists every problem"
        authserv = (
            authserv_check(settings, unsure)
            if unsure
            else skip("rules authserv_id", "needs valid rules")
        )
        return [failed("rules", str(exc), fix), authserv]
    detail = f"{path}: {len(rules.rules)} rules, version {rules.version[:12]}"
    if rules.warnings:
        detail += f", {len(rules.warnings)} warnings (see `mailintake rules check`)"
    return [ok("rules", detail), authserv_check(settings, unsure)]


def authserv_check(settings: Settings, unsure: list[Problem]) -> Check:
    """FAIL while a rule tests `auth` and no `authserv_id` says whose headers to trust."""
    name = "rules authserv_id"
    if unsure:
        detail = "\n".join(str(problem) for problem in unsure)
        fix = (
            "set `authserv_id:` in the config (or MAILINTAKE_AUTHSERV_ID) to the name your MTA "
            "writes first in its Authentication-Results headers (docs/deploy.md)"
        )
        return failed(name, detail, fix)
    if settings.authserv_id is None:
        return ok(name, "no rule tests `auth`")
    return ok(name, f"Authentication-Results trusted from {settings.authserv_id}")


def templates_check(settings: Settings) -> Check:
    chosen = settings.templates
    try:
        templates = load_templates(chosen.path, required=chosen.required)
    except ConfigError as exc:
        fix = "correct the file; `mailintake templates test` shows what each template finds"
        return failed("templates", str(exc), fix)
    if not templates and not chosen.path.exists():
        return ok("templates", f"no {chosen.path} (optional): no fields are extracted")
    return ok("templates", f"{chosen.path}: {len(templates)} templates")


# --- ports -------------------------------------------------------------------------------------


def port_checks(settings: Settings) -> list[Check]:
    listeners: dict[str, ListenerSettings] = {
        "smtp": settings.smtp,
        "lmtp": settings.lmtp,
        "http": settings.http,
    }
    ours = ours_answers(settings)
    return [port_check(name, chosen, ours) for name, chosen in listeners.items()]


def port_check(name: str, chosen: ListenerSettings, ours: bool) -> Check:
    label = f"port {name}"
    if not chosen.enabled:
        return skip(label, f"{name}.enabled is false")
    where = f"{chosen.host}:{chosen.port}"
    if chosen.port == 0:
        return skip(label, f"{where}: port 0 takes any free port")
    try:
        family = socket.getaddrinfo(chosen.host, chosen.port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((chosen.host, chosen.port), family=family).close()
    except OSError as exc:
        if ours:
            return ok(label, f"{where} in use by a running mailintake (its /healthz answers)")
        variable = f"MAILINTAKE_{name.upper()}__PORT"
        fix = f"stop what holds it, or choose another {name}.port ({variable})"
        return failed(label, f"{where} cannot be bound: {exc.strerror or exc}", fix)
    return ok(label, f"{where} free")


def ours_answers(settings: Settings) -> bool:
    """Whether a running mailintake answers on the admin listener's /healthz."""
    chosen = settings.http
    if not chosen.enabled or chosen.port == 0:
        return False
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(chosen.host, chosen.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{chosen.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_SECONDS) as reply:
            return bool(json.loads(reply.read(1024)).get("alive"))
    except (OSError, ValueError):
        return False


# --- IMAP --------------------------------------------------------------------------------------


def imap_checks(settings: Settings) -> list[Check]:
    if not settings.imap.accounts:
        return [skip("imap", "no imap.accounts")]
    return [
        check for account in settings.imap.accounts for check in account_checks(settings, account)
    ]


def account_checks(settings: Settings, account: ImapAccount) -> Iterator[Check]:
    login, folders = f"imap {account.name} login", f"imap {account.name} folders"
    # A fetcher names the server and the setting at fault the way `serve` logs it.
    fetcher = FolderFetcher(
        settings, account, account.folders[0], sessionmaker(), Hooks(received=lambda _id: None)
    )
    timeout = min(settings.imap.timeout_seconds, NETWORK_TIMEOUT_SECONDS)
    try:
        client = connect(account, timeout)
    except Exception as exc:
        yield failed(login, fetcher.describe(exc), login_fix(account, exc))
        yield skip(folders, "needs a login")
        return
    yield ok(login, f"logged in as {account.username} at {fetcher.server}")
    try:
        missing = [folder for folder in account.folders if not client.folder_exists(folder)]
    except (IMAPClientError, OSError) as exc:
        yield failed(folders, fetcher.describe(exc), "check the server's log")
        return
    finally:
        close(client)
    if missing:
        fix = f"create them on the server, or correct imap.accounts `{account.name}` folders"
        yield failed(folders, f"missing on the server: {', '.join(missing)}", fix)
    else:
        yield ok(folders, f"{', '.join(account.folders)} exist")


def login_fix(account: ImapAccount, exc: Exception) -> str:
    if isinstance(exc, LoginError | CredentialError):
        return f"check username and credentials of imap account `{account.name}`"
    return f"check host, port, security and ca_file of imap account `{account.name}`"


def close(client: IMAPClient) -> None:
    try:
        client.logout()
    except (IMAPClientError, OSError):
        with suppress(OSError):
            client.shutdown()
