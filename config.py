"""Service configuration: `config.yaml` overlaid by `MAILINTAKE_*` environment variables.

The YAML file is read with ruamel.yaml so that a validation error can point at the line of the
offending key. Environment variables win over the file (`MAILINTAKE_DATABASE__URL` overrides
`database.url`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

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
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
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


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(Section):
    url: str = "sqlite:///./data/mailintake.db"
    echo: bool = False
    busy_timeout_ms: int = Field(default=30_000, ge=0)


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
    """The source templates file (see templates.yaml); a missing file means no templates."""

    path: Path = Path("templates.yaml")


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

    @model_validator(mode="after")
    def _unique_names(self) -> ImapSettings:
        names = [account.name for account in self.accounts]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise ValueError(f"account names must be unique: {', '.join(doubled)}")
        return self


class Settings(BaseSettings):
    """The whole configuration; see the commented `config.yaml` for every key."""

    model_config = SettingsConfigDict(
        env_prefix="MAILINTAKE_", env_nested_delimiter="__", extra="forbid"
    )

    database: DatabaseSettings = DatabaseSettings()
    tickets: TicketSettings = TicketSettings()
    intake: IntakeSettings = IntakeSettings()
    detect: DetectSettings = DetectSettings()
    templates: TemplateSettings = TemplateSettings()
    rules: RulesSettings = RulesSettings()
    retry: RetrySettings = RetrySettings()
    smtp: SmtpSettings = SmtpSettings()
    lmtp: LmtpSettings = LmtpSettings()
    imap: ImapSettings = ImapSettings()

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
    """A configuration file that cannot be used; the message says where and why."""


def load_yaml(path: Path) -> Any:
    """Parse a YAML file keeping line information (ruamel round-trip types)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_yaml(text, path)


def parse_yaml(text: str, path: Path) -> Any:
    """Parse YAML text read from `path`; the ConfigError's cause is ruamel's error (with marks)."""
    try:
        return YAML(typ="rt").load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc


def line_of(data: Any, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest key of `loc` found in ruamel round-trip `data`."""
    line = None
    node = data
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if lc is not None and isinstance(part, str) and hasattr(node, "keys"):
                line = lc.key(part)[0] + 1
            elif lc is not None and isinstance(part, int):
                line = lc.item(part)[0] + 1
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    return line


def describe_validation_error(exc: ValidationError, data: Any, path: Path) -> str:
    """One line per problem: `file:line: dotted.key: what is wrong`."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(data, loc)
        where = f"{path}:{line}" if line else str(path)
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {key}: {message}")
    return "\n".join(lines)


def config_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_settings(path: Path | None = None) -> Settings:
    """Load settings from `path` (or $MAILINTAKE_CONFIG, or ./config.yaml if it exists).

    A missing default file is fine (built-in defaults apply); a missing explicit file is not.
    """
    chosen = config_path(path)
    explicit = path is not None or CONFIG_ENV_VAR in os.environ
    data: Any = {}
    if chosen.exists() or explicit:
        data = load_yaml(chosen) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{chosen}: the top level must be a mapping of sections")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, data, chosen)) from exc
