"""Service configuration: `config.yaml` overlaid by `MAILINTAKE_*` environment variables, and
the one YAML loader of the project.

`load_yaml_model` reads config.yaml, rules.yaml and templates.yaml alike: ruamel round-trip (so
every key keeps its line and column), then a pydantic model; every problem reads
`file:line:column: dotted.key: problem` (` — did you mean `x`?` for an unknown key), or
`environment MAILINTAKE_SMTP__PORT: smtp.port: problem` for a value an environment variable set.
Environment variables win over the file (`MAILINTAKE_DATABASE__URL` overrides `database.url`).

`timezone` is the service's one time zone (business hours, template times without a zone,
times shown to people); stored times are UTC.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypedDict, TypeVar, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


def re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the error goes into our message, not onto stderr
    return options


def compile_regex(pattern: str) -> re2._Regexp:
    """Compile with RE2 (linear time, so no pattern can hang intake); errors in plain words."""
    try:
        return re2.compile(pattern, re2_options())
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"bad regular expression `{pattern}`: {detail}") from None


DEFAULT_CONFIG_PATH = Path("config.yaml")
CONFIG_ENV_VAR = "MAILINTAKE_CONFIG"
DEFAULT_TIMEZONE = "Asia/Tokyo"


def zone_named(name: str) -> ZoneInfo:
    """The IANA time zone `name` (Asia/Tokyo); ValueError in plain words for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone `{name}` (write an IANA name, e.g. Asia/Tokyo)"
        ) from None


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


class EngineOptions(TypedDict):
    """What `storage.db.make_engine` takes besides the URL (storage reads no configuration)."""

    echo: bool
    busy_timeout_ms: int
    connect_timeout_seconds: int
    statement_timeout_ms: int
    lock_timeout_ms: int
    pool_timeout_seconds: float


class DatabaseSettings(Section):
    """Timeouts bound every wait on the database, so a frozen or unreachable database makes
    SMTP answer `451` and frees its threads instead of holding them (docs/reliability.md)."""

    url: str = "sqlite:///./data/mailintake.db"
    echo: bool = False
    busy_timeout_ms: int = Field(
        default=30_000,
        ge=0,
        description="SQLite: how long a write waits for another writer's lock, in ms.",
    )
    connect_timeout_seconds: int = Field(
        default=10,
        ge=1,
        description=(
            "PostgreSQL: how long opening a connection may take (libpq connect_timeout), and how "
            "long sent data may stay unacknowledged on a blackholed network (tcp_user_timeout)."
        ),
    )
    statement_timeout_ms: int = Field(
        default=60_000,
        ge=0,
        description="PostgreSQL: the server cancels a statement running longer (0: no limit).",
    )
    lock_timeout_ms: int = Field(
        default=10_000,
        ge=0,
        description="PostgreSQL: a statement waiting longer for a lock fails (0: no limit).",
    )
    pool_timeout_seconds: float = Field(
        default=30,
        gt=0,
        description="How long a thread waits for a free connection of the pool.",
    )

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            echo=self.echo,
            busy_timeout_ms=self.busy_timeout_ms,
            connect_timeout_seconds=self.connect_timeout_seconds,
            statement_timeout_ms=self.statement_timeout_ms,
            lock_timeout_ms=self.lock_timeout_ms,
            pool_timeout_seconds=self.pool_timeout_seconds,
        )


class TicketSettings(Section):
    key_prefix: str = Field(default="INQ", pattern=r"^[A-Z][A-Z0-9]{0,9}$")
    default_assignee: str | None = None
    default_priority: str = "normal"
    default_category: str = "inquiry"


class IntakeSettings(Section):
    max_message_bytes: int = Field(default=25 * 1024 * 1024, gt=0)


class DetectSettings(Section):
    """What marks a mail as machine-sent beyond its headers."""

    # Addresses our own notifications are sent from (e.g. the task tracker's): a mail from one of
    # them is a loop and never opens a ticket.
    own_senders: list[str] = []

    @field_validator("own_senders")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [address.strip().lower() for address in value]


class TemplateSettings(Section):
    """The source templates file (see templates.yaml). A configured file must exist; the
    default one, never configured, may be missing (then there are no templates)."""

    path: Path = Path("templates.yaml")

    @property
    def required(self) -> bool:
        """Whether `path` was configured (in the file or the environment), not the default."""
        return "path" in self.model_fields_set


class RulesSettings(Section):
    """The routing rules file (see rules.yaml). None: every ticket gets the `tickets` defaults;
    a path that cannot be read or validated stops startup rather than routing wrongly."""

    path: Path | None = None


class RetrySettings(Section):
    """Automatic retry of transient failures (database errors, lock timeouts).

    The wait before retry n is backoff_seconds * 2**(n-1), at most max_backoff_seconds; after
    max_attempts processing attempts a message waits for `mailintake failed replay`.
    """

    max_attempts: int = Field(default=5, ge=1)
    backoff_seconds: float = Field(default=60, gt=0)
    max_backoff_seconds: float = Field(default=3600, gt=0)


class ProcessingSettings(Section):
    """Where `mailintake serve` turns stored messages into tickets.

    `process`: in `workers` processes of their own, so no message, however costly, delays the
    listener's replies and every core works; `thread`: in one thread of the listener process.
    """

    mode: Literal["process", "thread"] = "process"
    workers: int = Field(default=1, ge=1, le=64)
    rescan_seconds: float = Field(default=30, gt=0)  # also picks up due retries and leftovers
    # /readyz fails once the oldest unprocessed message has waited this long.
    stall_after_seconds: float = Field(default=600, gt=0)


class ListenerSettings(Section):
    """Where a listener binds; port 0 takes any free port (tests do)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)


class SmtpSettings(ListenerSettings):
    """The SMTP listener, and the acceptance policy the LMTP listener shares."""

    hostname: str | None = None  # greeting and trace name; default: this host's FQDN
    accept_domains: list[str] = Field(default_factory=lambda: ["wine-importer.example.jp"])
    accept_addresses: list[str] = Field(default_factory=list)
    accept_any_recipient: bool = False
    max_recipients: int = Field(default=50, ge=1)
    max_connections: int = Field(default=100, ge=1)
    timeout_seconds: float = Field(default=300, gt=0)
    allow_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    auth_users: dict[str, SecretStr] = Field(default_factory=dict)
    auth_required: bool = False
    auth_require_tls: bool = True
    shutdown_grace_seconds: float = Field(default=30, ge=0)
    # Per client address (as Postfix's anvil): concurrent connections, and connections admitted
    # per minute (0: no rate limit). Addresses in client_limit_exceptions are exempt; by default
    # loopback, where an MTA in front of us is the only client.
    max_connections_per_client: int = Field(default=20, ge=1)
    max_connections_per_client_per_minute: int = Field(default=120, ge=0)
    client_limit_exceptions: list[IPvAnyNetwork] = Field(
        default=["127.0.0.0/8", "::1/128"], validate_default=True
    )
    # Commands answered on one connection without a message being accepted; then 421 and close.
    command_call_limit: int = Field(default=100, ge=1)
    # The idle timeout once 3/4 of max_connections are in use (Postfix's stress timeout).
    overload_timeout_seconds: float = Field(default=10, gt=0)
    # Each failed AUTH is answered after this delay; after auth_max_failures: 421 and close.
    auth_failure_delay_seconds: float = Field(default=1, ge=0)
    auth_max_failures: int = Field(default=3, ge=1)
    # DATA is answered 451 when the commit has not returned by then (it may still finish).
    store_timeout_seconds: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> SmtpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.require_tls and self.tls_cert is None:
            raise ValueError("require_tls needs tls_cert and tls_key")
        if self.auth_required and not self.auth_users:
            raise ValueError("auth_required needs at least one entry in auth_users")
        if self.auth_users and self.auth_require_tls and self.tls_cert is None:
            raise ValueError("AUTH is offered only after STARTTLS: set tls_cert and tls_key")
        if self.command_call_limit < self.max_recipients + 10:
            raise ValueError(
                "command_call_limit must be at least max_recipients + 10 "
                "(one message's EHLO, STARTTLS, AUTH, MAIL, RCPTs and DATA)"
            )
        return self


class LmtpSettings(ListenerSettings):
    """The LMTP listener (for Postfix/Exim delivering with LMTP); off unless enabled."""

    enabled: bool = False
    port: int = Field(default=2424, ge=0, le=65535)


class ImapAccount(Section):
    """One mailbox to fetch from; exactly one of the four credential keys must be set."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    host: str
    port: int | None = Field(default=None, ge=1, le=65535)  # default: 993 for tls, else 143
    security: Literal["tls", "starttls", "none"] = "tls"
    ca_file: Path | None = None  # PEM CA bundle for a private CA; default: the system's
    username: str
    password: SecretStr | None = None
    password_env: str | None = None
    token_command: str | None = None  # prints an OAuth2 access token (XOAUTH2) on stdout
    token_file: Path | None = None  # holds an OAuth2 access token, kept fresh by another tool
    folders: list[str] = Field(default_factory=lambda: ["INBOX"], min_length=1)
    after: Literal["seen", "move", "delete"] = "seen"
    move_to: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ImapAccount:
        credentials = ("password", "password_env", "token_command", "token_file")
        given = [key for key in credentials if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(credentials)} (got {len(given)})")
        if self.after == "move" and not self.move_to:
            raise ValueError("after: move needs move_to (the folder to move fetched mail to)")
        if self.move_to and self.move_to in self.folders:
            raise ValueError(f"move_to {self.move_to!r} is one of the fetched folders")
        return self

    @property
    def server_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)


class ImapSettings(Section):
    """The IMAP fetchers run by `mailintake serve` and `mailintake fetch --once`."""

    accounts: list[ImapAccount] = Field(default_factory=list)
    idle: bool = True  # wait with IDLE when the server offers it, else poll
    idle_renew_seconds: float = Field(default=540, gt=0)
    poll_interval_seconds: float = Field(default=60, gt=0)
    batch_size: int = Field(default=50, ge=1)
    timeout_seconds: float = Field(default=60, gt=0)
    backoff_initial_seconds: float = Field(default=2, gt=0)
    backoff_max_seconds: float = Field(default=300, gt=0)
    stalled_after_seconds: float = Field(default=900, gt=0)
    # Several nodes: one fetches a folder at a time (a lease renewed every third of this); when
    # it dies another takes over this many seconds after its last renewal.
    failover_after: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> ImapSettings:
        names = [account.name for account in self.accounts]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise ValueError(f"account names must be unique: {', '.join(doubled)}")
        return self


class HttpSettings(ListenerSettings):
    """The admin HTTP listener of `mailintake serve`: /metrics, /healthz, /readyz (and the web
    pages when `web.enabled`)."""

    port: int = Field(default=9025, ge=0, le=65535)
    # The request header a reverse proxy puts the signed-in user's name in (e.g.
    # X-Forwarded-User); null: no header is trusted, people log in with `web.accounts`.
    trust_proxy_user: str | None = None


class WebAccount(Section):
    """One person allowed into the web pages; `mailintake web adduser` writes the entry."""

    role: Literal["admin", "viewer"] = "viewer"
    password_hash: SecretStr | None = None  # argon2; none: only through the proxy header


class WebSettings(Section):
    """The web pages on the admin HTTP listener: off unless enabled."""

    enabled: bool = False
    # Signs the session cookie; required when enabled (prefer MAILINTAKE_WEB__SECRET).
    secret: SecretStr | None = None
    accounts: dict[str, WebAccount] = {}
    session_max_age_seconds: int = Field(default=8 * 3600, gt=0)
    # A proxy user without an account entry gets this role.
    proxy_default_role: Literal["admin", "viewer"] = "viewer"
    # After this many failed logins within the window, an account name or a client address
    # is refused (429) until the window has passed since the oldest of them.
    login_failure_limit: int = Field(default=5, ge=1)
    login_failure_window_seconds: int = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _secret_when_enabled(self) -> WebSettings:
        if self.enabled and (self.secret is None or len(self.secret.get_secret_value()) < 16):
            raise ValueError("web.enabled needs web.secret, at least 16 characters")
        return self


class LogSettings(Section):
    """Log lines on stderr: `human` text, or `json`, one object per line."""

    format: Literal["human", "json"] = "human"


class VerifySettings(Section):
    """mailintake's own DKIM, SPF, DMARC and ARC checks, for a setup with no MTA in front that
    writes Authentication-Results (ingest/verify.py, docs/deploy.md)."""

    enabled: bool = Field(
        default=False,
        description=(
            "Verify each mail in the parse stage and write the verdicts under `authserv_id`, "
            "replacing any header with that id the mail came with. Needs `authserv_id`."
        ),
    )
    dns_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="The longest one DNS lookup may take in all."
    )
    arc: bool = Field(default=True, description="Also check an ARC chain (`arc=` in the header).")


class Settings(BaseSettings):
    """The whole configuration; see the commented `config.yaml` for every key."""

    model_config = SettingsConfigDict(
        env_prefix="MAILINTAKE_", env_nested_delimiter="__", extra="forbid"
    )

    # The service's one time zone: business hours and due times in the rules, template times
    # written without a zone, and times shown to people. Stored times are UTC whatever it is.
    timezone: str = DEFAULT_TIMEZONE
    # The authserv-id (first word) of the Authentication-Results headers the MTA in front adds:
    # only those count, for rules that test `auth` and templates bound by `dkim`/`spf`/`dmarc`.
    # None: no such header is trusted (and rules that test `auth` are refused).
    authserv_id: str | None = Field(default=None, min_length=1, pattern=r"^[^\s;()]+$")
    verify: VerifySettings = VerifySettings()
    database: DatabaseSettings = DatabaseSettings()
    tickets: TicketSettings = TicketSettings()
    intake: IntakeSettings = IntakeSettings()
    detect: DetectSettings = DetectSettings()
    templates: TemplateSettings = TemplateSettings()
    rules: RulesSettings = RulesSettings()
    retry: RetrySettings = RetrySettings()
    processing: ProcessingSettings = ProcessingSettings()
    smtp: SmtpSettings = SmtpSettings()
    lmtp: LmtpSettings = LmtpSettings()
    imap: ImapSettings = ImapSettings()
    http: HttpSettings = HttpSettings()
    web: WebSettings = WebSettings()
    log: LogSettings = LogSettings()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        zone_named(value)
        return value

    @model_validator(mode="after")
    def _web_on_the_listener(self) -> Settings:
        if self.web.enabled and not self.http.enabled:
            raise ValueError("web.enabled needs http.enabled: the pages are on that listener")
        return self

    @model_validator(mode="after")
    def _verify_needs_authserv_id(self) -> Settings:
        if self.verify.enabled and not self.authserv_id:
            raise ValueError("verify.enabled needs authserv_id, the name our verdicts go under")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return zone_named(self.timezone)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; environment variables take precedence.
        return (env_settings, init_settings)


class ConfigError(Exception):
    """A file (or environment variable) that cannot be used. `problems` holds one entry per
    problem; each reads `file:line:column: dotted.key: problem`, or `environment NAME: dotted.key:
    problem` for a value that came from an environment variable."""

    def __init__(self, *problems: Problem | str) -> None:
        self.problems: list[Problem | str] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


Loc = tuple[int | str, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a YAML file or an environment variable, and where it is."""

    where: str  # the file, or `environment MAILINTAKE_X__Y`
    line: int | None
    column: int | None
    key: str | None  # dotted: `smtp.port`, `rules.3.when.subject`
    message: str

    def __str__(self) -> str:
        place = f"{self.where}:{self.line}:{self.column}" if self.line else self.where
        return ": ".join(part for part in (place, self.key, self.message) if part)

    def sort_key(self) -> tuple[bool, str, int, int]:
        return (self.where.startswith("environment "), self.where, self.line or 0, self.column or 0)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """` — did you mean `x`?` when a candidate is close to `word`, else ``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" — did you mean `{close[0]}`?" if close else ""


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def position(data: Any, loc: Loc) -> tuple[int | None, int | None]:
    """1-based line and column of the deepest key of `loc` present in ruamel round-trip `data`.

    Parts that are not in the data (pydantic's names for union members, a key that is missing)
    are skipped, so ('rules', 0, 'then', 'assignee', 'team') still lands on a line.
    """
    line = column = None
    node = data
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if isinstance(part, str) and hasattr(node, "keys") and part in node:
                line, column = lc.key(part) if lc else (None, None)
            elif isinstance(part, int) and isinstance(node, list) and part < len(node):
                line, column = lc.item(part) if lc else (None, None)
            else:
                continue
        except (KeyError, IndexError, TypeError):
            continue
        node = node[part]
    return (line + 1, column + 1) if line is not None and column is not None else (None, None)


def _present(data: Any, loc: Loc) -> int:
    """How many leading parts of `loc` are keys (or indexes) present in `data`."""
    node = data
    for depth, part in enumerate(loc):
        in_mapping = isinstance(part, str) and isinstance(node, dict) and part in node
        in_list = isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node)
        if not (in_mapping or in_list):
            return depth
        node = node[part]
    return len(loc)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds directly or inside unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, UnionType):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def _step(annotation: Any, part: int | str) -> Any:
    """The annotation of `annotation[part]`, or None if `part` cannot be followed."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        steps = [_step(arg, part) for arg in args if arg is not type(None)]
        return next((s for s in steps if s is not None), None)
    if origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    for model in _models_in(annotation):
        for name, info in model.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
    return None


def keys_at(model: type[BaseModel], loc: Loc) -> set[str]:
    """The keys a mapping at `loc` may have, as written in the file (aliases)."""
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return set()
    return {
        info.alias or name for m in _models_in(annotation) for name, info in m.model_fields.items()
    }


def all_keys(model: type[BaseModel]) -> set[str]:
    """Every key of `model` and of the models inside it (the fallback for "did you mean")."""
    seen: set[type[BaseModel]] = set()
    keys: set[str] = set()

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                return
            seen.add(annotation)
            for name, info in annotation.model_fields.items():
                keys.add(info.alias or name)
                visit(info.annotation)
        for arg in get_args(annotation):  # list[X], dict[str, X], X | None
            visit(arg)

    visit(model)
    return keys


def _plain(err: Any, model: type[BaseModel]) -> str:
    """Pydantic's message in plain words."""
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        key = str(loc[-1])
        return "unknown key" + did_you_mean(key, keys_at(model, loc[:-1]) or all_keys(model))
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    if kind == "literal_error":
        return f"`{err['input']}` is not allowed here: write {err['ctx']['expected']}"
    return str(err["msg"])


def _joined(messages: list[str]) -> str:
    """`Input should be a valid string`, `Input should be a valid integer` -> one sentence."""
    unique = list(dict.fromkeys(messages))
    lead = "Input should be "
    if len(unique) > 1 and all(m.startswith(lead) for m in unique):
        return lead + " or ".join(m.removeprefix(lead) for m in unique)
    return "; or ".join(unique)


@dataclass(frozen=True)
class YamlSource:
    """A parsed YAML file: its exact bytes (for a version hash) and ruamel round-trip data
    (for positions); `env` maps key paths to the environment variables that set them."""

    path: Path
    raw: bytes
    data: Any
    env: dict[tuple[str, ...], str] = field(default_factory=dict)
    # What a location is part of, put before the message: rules.yaml says "rule `fax-order`".
    about: Callable[[Any, Loc], str | None] | None = None

    def problem(self, loc: Loc, message: str) -> Problem:
        """A problem at `loc`: in the environment variable that set it, else in the file."""
        part_of = self.about(self.data, loc) if self.about else None
        if part_of:
            message = f"{part_of}: {message}"
        variable = self._variable_for(loc)
        if variable is not None:
            return Problem(f"environment {variable}", None, None, dotted(loc), message)
        line, column = position(self.data, loc)
        below = self._variables_below(loc)
        if below and not _present(self.data, loc):
            where = f"environment {', '.join(below)}"
            return Problem(where, None, None, dotted(loc), message)
        if below:
            message += f" (with environment {', '.join(below)})"
        return Problem(str(self.path), line, column, dotted(loc), message)

    def _variable_for(self, loc: Loc) -> str | None:
        parts = tuple(str(p).lower() for p in loc)
        for n in range(len(parts), 0, -1):
            if parts[:n] in self.env:
                return self.env[parts[:n]]
        return None

    def _variables_below(self, loc: Loc) -> list[str]:
        parts = tuple(str(p).lower() for p in loc)
        return sorted(v for k, v in self.env.items() if k[: len(parts)] == parts)

    def validation_problems(self, exc: ValidationError, model: type[BaseModel]) -> list[Problem]:
        """One problem per location, in file order; union members' complaints are joined."""
        grouped: dict[Loc, list[str]] = {}
        for err in exc.errors():
            loc = tuple(err["loc"])
            if (
                err["type"] not in ("missing", "extra_forbidden")
                and self._variable_for(loc) is None
            ):
                loc = loc[: max(_present(self.data, loc), 1)]  # drop pydantic's member names
            grouped.setdefault(loc, []).append(_plain(err, model))
        problems = [self.problem(loc, _joined(messages)) for loc, messages in grouped.items()]
        return sorted(problems, key=Problem.sort_key)


def read_yaml(path: Path) -> YamlSource:
    """Read and parse a YAML file with ruamel round-trip (which keeps every key's line and
    column). Unreadable, non-UTF-8 or malformed files raise ConfigError saying where."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            Problem(str(path), None, None, None, f"cannot read: {exc.strerror or exc}")
        ) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            Problem(str(path), line, column, None, f"not UTF-8: {exc.reason}")
        ) from exc
    return YamlSource(path, raw, parse_yaml(text, path))


def parse_yaml(text: str, path: Path) -> Any:
    """Parse YAML text read from `path`; the ConfigError's cause is ruamel's error (with marks)."""
    try:
        return YAML(typ="rt").load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            Problem(str(path), line, column, None, f"invalid YAML: {problem}")
        ) from exc


def _environment(model: type[BaseModel]) -> dict[tuple[str, ...], str]:
    """Key paths set by environment variables, for a settings model: ('smtp', 'port') ->
    'MAILINTAKE_SMTP__PORT'."""
    if not issubclass(model, BaseSettings):
        return {}
    prefix = str(model.model_config.get("env_prefix") or "").lower()
    delimiter = model.model_config.get("env_nested_delimiter") or ""
    found = {}
    for name in os.environ:
        lowered = name.lower()
        if not prefix or not lowered.startswith(prefix) or name == CONFIG_ENV_VAR:
            continue
        rest = lowered[len(prefix) :]
        path = tuple(rest.split(delimiter)) if delimiter else (rest,)
        if path[0] in model.model_fields:
            found[path] = name
    return found


def _undecodable(model: type[BaseSettings], source: YamlSource) -> list[Problem]:
    """Which environment variables pydantic-settings could not decode (malformed JSON)."""
    problems = []
    for path, name in sorted(source.env.items(), key=lambda item: item[1]):
        env = EnvSettingsSource(model)
        env.env_vars = {k: v for k, v in env.env_vars.items() if k.lower() == name.lower()}
        try:
            env()
        except SettingsError as exc:
            detail = exc.__cause__ or exc
            message = (
                f"not valid JSON ({detail}): lists and mappings in environment variables are "
                'JSON, e.g. ["a", "b"] or {"key": "value"}'
            )
            problems.append(Problem(f"environment {name}", None, None, dotted(path), message))
    return problems


def load_yaml_model(
    path: Path,
    model: type[M],
    *,
    missing_ok: bool = False,
    context: dict[str, Any] | None = None,
    about: Callable[[Any, Loc], str | None] | None = None,
) -> tuple[M, YamlSource]:
    """Load the YAML file at `path` and validate it against `model`: the one loader of
    config.yaml, rules.yaml and templates.yaml.

    Every problem found is raised at once in a ConfigError, one line each, as
    `file:line:column: dotted.key: problem`; an unknown key adds ` — did you mean `x`?` from the
    keys the model allows there. For a settings model (pydantic-settings), environment variables
    overlay the file and a problem with a value they set names the variable instead:
    `environment MAILINTAKE_SMTP__PROT: smtp.prot: unknown key — did you mean `port`?`.
    A missing file with `missing_ok` validates as empty (the defaults). `context` goes to the
    model's validators; `about(data, loc)` may name what a location belongs to ("rule `x`").
    Returns the model and the source (bytes, positions) for checks that need the whole file.
    """
    absent = missing_ok and not path.exists()
    source = YamlSource(path, b"", {}) if absent else read_yaml(path)
    if source.data is None:
        source = replace(source, data={})
    if not isinstance(source.data, dict):
        raise ConfigError(Problem(str(path), 1, 1, None, "the top level must be a mapping of keys"))
    source = replace(source, env=_environment(model), about=about)
    try:
        if issubclass(model, BaseSettings):
            return model(**source.data), source
        return model.model_validate(source.data, context=context), source
    except SettingsError as exc:
        assert issubclass(model, BaseSettings)
        problems = _undecodable(model, source)
        raise (ConfigError(*problems) if problems else ConfigError(str(exc))) from exc
    except ValidationError as exc:
        raise ConfigError(*source.validation_problems(exc, model)) from exc


def config_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_settings(path: Path | None = None) -> Settings:
    """Load settings from `path` (or $MAILINTAKE_CONFIG, or ./config.yaml if it exists), with
    MAILINTAKE_* environment variables over the file.

    A missing default file is fine (built-in defaults apply); a missing explicit file is not.
    """
    chosen = config_path(path)
    explicit = path is not None or CONFIG_ENV_VAR in os.environ
    settings, _ = load_yaml_model(chosen, Settings, missing_ok=not explicit)
    if chosen.exists():
        anchor_paths(settings, chosen.resolve().parent)
    return settings


def anchor_paths(settings: Settings, base: Path) -> None:
    """Make the relative paths of `settings` (files, the SQLite database) relative to `base`,
    the config file's folder, so every command reads the same files from any working directory
    (an MTA's pipe, cron, systemd)."""

    def at(value: Path | None) -> Path | None:
        return value if value is None or value.is_absolute() else base / value

    configured = settings.templates.required
    settings.templates.path = base / settings.templates.path  # an absolute path stays as it is
    if not configured:  # still the default: a missing file means no templates, not an error
        settings.templates.model_fields_set.discard("path")
    settings.rules.path = at(settings.rules.path)
    settings.smtp.tls_cert = at(settings.smtp.tls_cert)
    settings.smtp.tls_key = at(settings.smtp.tls_key)
    for account in settings.imap.accounts:
        account.ca_file, account.token_file = at(account.ca_file), at(account.token_file)
    from sqlalchemy.engine import make_url  # here: `mailintake --help` imports no SQLAlchemy

    url = make_url(settings.database.url)
    database = url.database or ""
    in_a_file = database not in ("", ":memory:") and not database.startswith("file:")
    if url.get_backend_name() == "sqlite" and in_a_file and not Path(database).is_absolute():
        anchored = url.set(database=str(base / database))
        settings.database.url = anchored.render_as_string(hide_password=False)
