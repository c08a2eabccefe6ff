"""The `mailintake` command line. Exit codes: 0 ok, 1 some message failed or a check failed,
2 bad usage or configuration, 3 the database is unavailable or its schema is outdated."""

from __future__ import annotations

import enum
import json
import logging
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from sources import logs
from storage.states import Fate, Source, Stage

if TYPE_CHECKING:
    # The rest is imported by the commands that use it, so that `mailintake --help` (and a
    # command's --help) loads no SQLAlchemy, Alembic, aiosmtpd or imapclient: see docs/cli.md.
    from rich.progress import Progress
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from config import Settings
    from ingest.extract import Template
    from pipeline.context import PipelineContext
    from rules.engine import CompiledRules
    from rules.reload import Reloadable, RulesHolder, TemplatesHolder
    from sources.files import MessageSource
    from storage import repo
    from storage.models import InboundMessage, Ticket
    from triage.evaluate import Report

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EX_TEMPFAIL = 75  # sysexits.h; `ingest -` from an MTA pipe: the MTA queues and retries

VALUE_NAMES = {"str": "TEXT", "int": "INTEGER", "int range": "INTEGER", "datetime": "TIME"}


def readable_metavars(params: list[Any]) -> list[Any]:
    """Help that names values as words (`--since TEXT`, `PATHS...`), not as Python types
    (`<str>`, `<list[str]>`), and shows nothing after a flag (Typer writes `<bool>`)."""
    for param in params:
        if param.metavar is not None or not hasattr(param, "display_type"):
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx: None  # the name column says it all
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        else:
            label = param.display_type(None).strip("<>")
            choices = "|" in label
            param.metavar = f"[{label}]" if choices else VALUE_NAMES.get(label, label.upper())
    return params


class Group(TyperGroup):
    """A command group whose help, and its commands' help, uses `readable_metavars`."""

    def get_params(self, ctx: typer.Context) -> list[Any]:  # type: ignore[override]
        return readable_metavars(super().get_params(ctx))

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:  # type: ignore[override]
        command = super().get_command(ctx, cmd_name)
        if command is not None and not isinstance(command, Group):
            readable_metavars(command.get_params(ctx))
        return command


def group(help: str, **options: Any) -> typer.Typer:
    return typer.Typer(
        cls=Group, help=help, no_args_is_help=True, rich_markup_mode="markdown", **options
    )


app = group(
    "Turn incoming email into tickets.",
    epilog="Exit codes: 0 ok; 1 a message failed or a check failed; 2 bad usage or "
    "configuration; 3 database unavailable or schema outdated. See docs/cli.md.",
)
tickets_app = group("Look at tickets.")
messages_app = group("Look at the ledger of received messages.")
db_app = group("Manage the database schema.")
failed_app = group("See, export, replay or discard messages that failed.")
attachments_app = group("List a ticket's attachments (a FAX's PDF) and save them.")
rules_app = group("Check, try out and compare routing rules.")
templates_app = group("Try source templates on mails, and draft new ones from samples.")
web_app = group("Manage the web pages' accounts (`web.accounts`).")
triage_app = group("Train and evaluate the triage assistant (suggested category and assignee).")
app.add_typer(tickets_app, name="tickets")
app.add_typer(messages_app, name="messages")
app.add_typer(db_app, name="db")
app.add_typer(failed_app, name="failed")
app.add_typer(rules_app, name="rules")
app.add_typer(templates_app, name="templates")
app.add_typer(attachments_app, name="attachments")
app.add_typer(web_app, name="web")
app.add_typer(triage_app, name="triage")

log = logging.getLogger("mailintake")
out = Console()
err = Console(stderr=True, soft_wrap=True)


class WebRole(enum.StrEnum):
    admin = "admin"
    viewer = "viewer"


MIN_PASSWORD = 10


class LogFormat(enum.StrEnum):
    human = "human"
    json = "json"


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TicketKey = Annotated[str, typer.Argument(help="Ticket key, e.g. INQ-42.")]
LimitOption = Annotated[int, typer.Option(min=1, help="At most this many, newest first.")]


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    _rules: RulesHolder | None = field(default=None, init=False, repr=False)
    _templates: TemplatesHolder | None = field(default=None, init=False, repr=False)

    def pipeline(self) -> PipelineContext:
        """The pipeline, routed by the rules file when `rules.path` is configured. The template
        and rules files are read now, so a bad one stops the command (exit 2) before any mail
        is taken in, rather than failing every message."""
        from pipeline.context import PipelineContext
        from rules.engine import RulesRouter

        holder = self.rules_holder()
        if holder is None:
            ctx = PipelineContext(self.settings, self.sessions)
        else:
            router = RulesRouter(holder.current)
            ctx = PipelineContext(self.settings, self.sessions, router)
        ctx.template_source = self.templates_holder().current
        return ctx

    def templates_holder(self) -> TemplatesHolder:
        """The configured templates, loaded once per command; a bad file is a usage error."""
        from config import ConfigError
        from rules.reload import TemplatesHolder

        if self._templates is None:
            chosen = self.settings.templates
            required = chosen.required
            try:
                self._templates = TemplatesHolder.load(chosen.path, required=required)
            except ConfigError as exc:
                raise fail(f"templates file refused:\n{exc}", EXIT_USAGE) from exc
        return self._templates

    def rules_holder(self) -> RulesHolder | None:
        """The configured rules, loaded once per command; a bad file is a usage error."""
        from rules.load import RulesError
        from rules.reload import RulesHolder

        path = self.settings.rules.path
        if path is not None and self._rules is None:
            try:
                settings = self.settings
                self._rules = RulesHolder.load(path, settings.zone, settings.authserv_id)
            except RulesError as exc:
                raise fail(f"rules file refused:\n{exc}", EXIT_USAGE) from exc
        return self._rules


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Config file (default: $MAILINTAKE_CONFIG or ./config.yaml)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(
            "--log-format",
            help="Log lines as human text or JSON objects, one a line (default: log.format).",
        ),
    ] = None,
) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logs.setup(log_format.value if log_format else "human", level)
    logging.getLogger("mailparser").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("imapclient").setLevel(logging.WARNING)  # protocol traces hold mail
    ctx.obj = CliState(config, log_format is not None, level)


@dataclass
class CliState:
    """The global options; settings are loaded by the first command that needs them, so a
    command can decide what a bad configuration means for it (`ingest -` must not bounce)."""

    config: Path | None
    log_format_given: bool = False  # --log-format wins over log.format
    log_level: int = logging.INFO
    settings: Settings | None = None


def settings_of(ctx: typer.Context) -> Settings:
    """The configuration; a bad one is exit 2 with `file:line: key: problem`."""
    from config import ConfigError, load_settings

    state: CliState = ctx.obj
    if state.settings is None:
        try:
            state.settings = load_settings(state.config)
        except ConfigError as exc:
            raise fail(f"bad configuration:\n{exc}", EXIT_USAGE) from exc
        if not state.log_format_given and state.settings.log.format != logs.current_format():
            logs.setup(state.settings.log.format, state.log_level)
    return state.settings


@contextmanager
def runtime(
    ctx: typer.Context, *, migrate: bool = True, read_only: bool = False
) -> Iterator[Runtime]:
    """Engine and sessions for one command; database problems become exit code 3. A
    `read_only` command (a dry run) creates no SQLite file: without one it reads an empty store."""
    from sqlalchemy.exc import OperationalError

    from storage import db

    settings = settings_of(ctx)
    url = settings.database.url
    if read_only and db.missing_sqlite_file(url):
        url = "sqlite://"
    engine = db.make_engine(url, **settings.database.engine_options())
    try:
        if migrate:
            db.ensure_schema(engine)
        yield Runtime(settings, engine, db.make_session_factory(engine))
    except db.SchemaNotReady as exc:
        raise fail(str(exc), EXIT_DATABASE) from exc
    except OperationalError as exc:
        raise fail(f"database unavailable: {exc.orig}", EXIT_DATABASE) from exc
    finally:
        engine.dispose()


@contextmanager
def progress_bar(label: str) -> Iterator[Progress]:
    """A progress bar on a terminal; silent when stderr is a pipe or a file.

    While the bar is shown, log lines go through the bar's console, above it, instead of being
    written over it: Rich replaces sys.stderr with a proxy for the live display, and the log
    handlers that write to stderr are pointed at that proxy until the bar ends (they keep their
    level and format, whatever `main_options` configured). Lowering the level to WARNING
    instead would hide the INFO lines people watch during a long backfill.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
    )
    with bar, logs_through(sys.stderr) if err.is_terminal else nullcontext():
        yield bar


@contextmanager
def logs_through(stream: Any) -> Iterator[None]:
    """Point the root logger's stderr handlers at `stream` (the bar's stderr proxy) for a while."""
    moved = [
        (handler, handler.stream)
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler)
        and handler.stream is getattr(stream, "rich_proxied_file", None)
    ]
    for handler, _old in moved:
        handler.setStream(stream)
    try:
        yield
    finally:
        for handler, old in moved:
            handler.setStream(old)


def print_history(history: list[dict[str, Any]]) -> None:
    out.print("[bold]history[/bold]:")
    for entry in history:
        where = f" at {entry['stage']}" if entry["stage"] else ""
        error = f": {entry['error']}" if entry["error"] else ""
        who = f"{entry['username'] or '?'}@{entry['host']} pid {entry['pid']}: {entry['command']}"
        out.print(
            f"  {readable(entry['attempted_at'])} {entry['outcome']}{where}{error} ({who})",
            highlight=False,
            markup=False,
        )


def print_timings(timings: list[dict[str, Any]] | None) -> None:
    """The stages the last processing went through, with their milliseconds."""
    out.print("[bold]stages[/bold]:" + " (none recorded)" * (timings is None))
    for entry in timings or ():
        failed = "  failed here" if entry.get("failed") else ""
        out.print(f"  {entry['stage']:<10} {entry['ms']:>10.3f} ms{failed}", highlight=False)


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, ensure_ascii=False, default=json_value))


def json_value(value: Any) -> Any:
    """What JSON has no type for: times as ISO 8601 with their offset (UTC from the store)."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def display_zone() -> tzinfo:
    """The configured time zone, for times shown to people (the default one before a command
    has read the configuration)."""
    from config import DEFAULT_TIMEZONE, zone_named

    context = click.get_current_context(silent=True)
    state = context.find_root().obj if context else None
    settings = state.settings if isinstance(state, CliState) else None
    return settings.zone if settings else zone_named(DEFAULT_TIMEZONE)


def print_fields(view: dict[str, Any], names: Iterable[str]) -> None:
    """`name: value` lines for a human; values are printed literally, never as markup."""
    for name in names:
        out.print(f"[bold]{name}[/bold]: {escape(readable(view[name]))}", highlight=False)


def readable(value: Any) -> str:
    """A value as a person reads it: lists comma-separated, mappings as `key=value`, no reprs."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return (
            f"{value.astimezone(display_zone()):%Y-%m-%d %H:%M:%S %Z}"
            if value.tzinfo
            else str(value)
        )
    if isinstance(value, list | tuple):
        return ", ".join(readable(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={readable(v)}" for k, v in value.items())
    return str(value)


def print_rows(
    title: str, columns: list[str], rows: list[dict[str, Any]], json_output: bool
) -> None:
    """A listing: all of each row as JSON for scripts, else the chosen columns as a table."""
    from rich.table import Table

    if json_output:
        print_json(rows)
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if row[c] is None else readable(row[c]) for c in columns))
    out.print(table)


@app.command()
def ingest(
    ctx: typer.Context,
    paths: Annotated[
        list[str],
        typer.Argument(help=".eml files, directories of them, mbox files, Maildirs, or - (stdin)."),
    ],
    glob: Annotated[
        str, typer.Option(help="In directories, read only files matching this pattern.")
    ] = "*",
    json_output: JsonOption = False,
) -> None:
    """Store and process messages from files.

    Exits 1 if any message failed.
    With `-` alone (an MTA's pipe transport) the exit code follows sysexits: 0 once the message
    is stored (a processing failure then waits in `failed list`), 75 (EX_TEMPFAIL, the MTA
    queues and retries) if it could not be stored, never a code that makes the MTA bounce it.
    """
    from sources.files import STDIN, MessageSource

    from_mta = paths == [STDIN]
    run = IngestRun()
    try:
        sources = [MessageSource(p, glob) for p in paths]
        ingest_sources(ctx, sources, run)
    except (FileNotFoundError, OSError) as exc:
        if from_mta:
            raise fail(f"not stored, the sender should retry: {exc}", EX_TEMPFAIL) from exc
        raise fail(str(exc), EXIT_USAGE) from exc
    except (typer.Exit, Exception) as exc:
        if not from_mta or getattr(exc, "exit_code", 1) == 0:
            raise
        if run.stored:
            # Ours now: processing resumes with `serve`, the next run or `failed replay`.
            err.print(f"stored as ledger id {run.stored[-1]}; processing deferred: {exc!r}")
            raise typer.Exit(0) from exc
        err.print(f"not stored, the sender should retry (exit 75): {exc!r}")
        raise typer.Exit(EX_TEMPFAIL) from exc
    print_fates(run.fates, json_output)
    if run.fates.get(Fate.FAILED.value) and not from_mta:
        raise typer.Exit(EXIT_FAILED)


@dataclass
class IngestRun:
    """What an `ingest` did so far: ledger ids stored, and the fate of each message processed."""

    stored: list[int] = field(default_factory=list)
    fates: Counter[str] = field(default_factory=Counter)


def ingest_sources(ctx: typer.Context, sources: list[MessageSource], run: IngestRun) -> None:
    """Receive and process every message of `sources`, after any left over by a crash; files
    are stored in batches (sources/backfill.py), stdin's one message on its own."""
    from functools import partial

    from ingest.intake import receive
    from pipeline.process import process, process_in_order, process_pending
    from sources.backfill import backfill

    with runtime(ctx) as rt:
        pipeline = rt.pipeline()
        recovered = process_pending(pipeline)
        if recovered:
            err.print(f"processed {recovered} message(s) left over from an earlier run")
        with progress_bar("ingesting") as bar:
            task = bar.add_task("ingest", total=sum(len(s) for s in sources))
            for source in sources:
                if source.spec == "-":  # stored before anything else can go wrong (exit 0/75)
                    for item in source:
                        run.stored.append(receive(rt.sessions, item.raw, item.envelope()))
                        run.fates[process(pipeline, run.stored[-1]) or "skipped"] += 1
                        bar.advance(task)
                    continue
                batch = partial(process_in_order, pipeline)
                for inbound_id, fate in backfill(rt.sessions, source, batch):
                    run.stored.append(inbound_id)
                    run.fates[fate or "skipped"] += 1
                    bar.advance(task)


def print_fates(fates: Counter[str], json_output: bool, **extra: Any) -> None:
    """The summary of a run: how many messages met each fate, and how many were read."""
    summary: dict[str, Any] = {s.value: fates.get(s.value, 0) for s in Fate}
    summary.pop(Fate.RECEIVED.value)
    summary.pop(Fate.DISCARDED.value)
    summary["read"] = sum(fates.values())
    if json_output:
        print_json(summary | extra)
    else:
        out.print(", ".join(f"{v} {k}" for k, v in summary.items()))


@app.command()
def fetch(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="Fetch what is waiting now, then exit (for cron).")
    ] = False,
    account: Annotated[
        str | None, typer.Option("--account", help="Only this account (imap.accounts name).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Fetch mail from the configured IMAP accounts into tickets.

    Runs until SIGTERM/SIGINT (with IDLE or polling, as `serve` does), or with --once fetches
    what is waiting now, then exits. With --once, exits 1 if a message failed or a folder could
    not be fetched.
    """
    from pipeline.process import process, process_pending
    from sources.imap import Hooks, folder_fetchers

    names = [a.name for a in settings_of(ctx).imap.accounts]
    if not names:
        raise fail("no IMAP accounts configured (imap.accounts in the config)", EXIT_USAGE)
    if account is not None and account not in names:
        known = ", ".join(names)
        raise fail(f"no IMAP account {account} in the config (have: {known})", EXIT_USAGE)
    if not once:
        fetch_until_signalled(ctx, account)
        return
    fates: Counter[str] = Counter()
    errors: list[str] = []
    with runtime(ctx) as rt, progress_bar("fetching") as bar:
        pipeline = rt.pipeline()
        process_pending(pipeline)
        task = bar.add_task("fetch", total=0)

        def received(inbound_id: int) -> None:
            fates[process(pipeline, inbound_id) or "skipped"] += 1
            bar.advance(task)

        def unfetched(_inbound_id: int) -> None:
            fates[Fate.FAILED.value] += 1
            bar.advance(task)

        def found(count: int) -> None:
            bar.update(task, total=(bar.tasks[0].total or 0) + count)

        hooks = Hooks(received, found, unfetched)
        for fetcher in folder_fetchers(rt.settings, rt.sessions, hooks, account):
            try:
                fetcher.fetch_once()
            except Exception as exc:
                errors.append(f"imap {fetcher.label}: {fetcher.describe(exc)}")
    for error in errors:
        err.print(f"[red]error:[/red] {escape(error)}", highlight=False)
    print_fates(fates, json_output, errors=errors)
    if errors or fates.get(Fate.FAILED.value):
        raise typer.Exit(EXIT_FAILED)


def fetch_until_signalled(ctx: typer.Context, account: str | None) -> None:
    """The fetchers of `serve` without its listeners: each message is processed as it is
    committed, in its fetcher's thread; SIGTERM/SIGINT stop them after the message in hand."""
    from pipeline.process import process, process_pending
    from sources.imap import start_fetchers

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with runtime(ctx) as rt:
        pipeline = rt.pipeline()
        process_pending(pipeline)

        def received(inbound_id: int) -> None:
            process(pipeline, inbound_id)

        threads = start_fetchers(rt.settings, rt.sessions, received, stop, account=account)
        stop.wait()
        log.info("stopping the fetchers")
        for thread in threads:
            thread.join(rt.settings.imap.timeout_seconds)


@app.command("parse")
def parse_file(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="One message file (.eml).")],
    json_output: JsonOption = False,
) -> None:
    """Show what the pipeline reads from a message file.

    Prints the headers, text, attachments, defects, detected kind and extracted fields. Uses no
    database."""
    from sqlalchemy.orm import sessionmaker

    from config import ConfigError
    from ingest.intake import unstored_mail
    from ingest.mail import Envelope
    from ingest.parse import UnreadableMail
    from pipeline.context import PipelineContext
    from pipeline.stages import MessageTooLarge, examine
    from storage.models import utcnow
    from views.mail import parsed_view

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise fail(f"{path}: cannot read: {exc.strerror or exc}", EXIT_USAGE) from exc
    # An unbound session factory: the stages `examine` runs never touch the database.
    pipeline = PipelineContext(settings_of(ctx), sessionmaker())
    try:
        pipeline.source_templates()
    except ConfigError as exc:
        raise fail(f"templates file refused:\n{exc}", EXIT_USAGE) from exc
    mail = unstored_mail(raw, Envelope(source=Source.FILE, extra={"origin": str(path)}), utcnow())
    try:
        examine(mail, pipeline)
    except (UnreadableMail, MessageTooLarge) as exc:
        raise fail(f"{path}: {exc}", EXIT_FAILED) from exc
    view = parsed_view(mail)
    if json_output:
        print_json(view)
        return
    print_fields(
        view, ("message_id", "subject", "from", "date", "source_kind", "auto_reply", "fields")
    )
    for attachment in view["attachments"]:
        out.print(f"attachment: {attachment}", highlight=False, markup=False)
    for defect in view["defects"]:
        out.print(f"defect: {defect}", highlight=False, markup=False)
    out.print("--- headers", highlight=False)
    for name, value in view["headers"]:
        out.print(f"{name}: {value}", highlight=False, markup=False)
    out.print("--- text", highlight=False)
    out.print(view["text"], highlight=False, markup=False)


@tickets_app.command("list")
def tickets_list(
    ctx: typer.Context,
    limit: LimitOption = 50,
    status: Annotated[
        str | None,
        typer.Option(help="Only tickets in this status (`open`, or one the tracker has set)."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """List tickets, newest first."""
    from storage import repo
    from views.records import ticket_view

    with runtime(ctx) as rt, rt.sessions() as session:
        # The tracker owns ticket statuses after `open`: the valid ones are those in the store.
        known = sorted({"open", *repo.ticket_statuses(session)})
        if status is not None and status not in known:
            raise fail(
                f"--status {status}: no ticket has it (have: {', '.join(known)})", EXIT_USAGE
            )
        tickets = [ticket_view(t) for t in repo.list_tickets(session, limit, status)]
    columns = ["key", "created_at", "source_kind", "category", "assignee", "priority", "summary"]
    if not json_output:  # tickets made before the summary existed show their subject
        tickets = [{**t, "summary": t["summary"] or t["subject"]} for t in tickets]
    print_rows("tickets", columns, tickets, json_output)


def ticket_or_exit(session: Session, key: str) -> Ticket:
    """The ticket with key `key`, or exit 1 saying there is none."""
    from storage import repo

    ticket = repo.ticket_by_key(session, key)
    if ticket is None:
        raise fail(f"no ticket {key}", EXIT_FAILED)
    return ticket


@tickets_app.command("show")
def tickets_show(
    ctx: typer.Context,
    key: TicketKey,
    json_output: JsonOption = False,
) -> None:
    """Show one ticket with its body, comments and attachments."""
    from storage import repo
    from views.records import attachment_view, suggestion_view, ticket_view

    with runtime(ctx) as rt, rt.sessions() as session:
        ticket = ticket_or_exit(session, key)
        view = ticket_view(ticket) | {
            "body": ticket.body,
            "comments": [
                {"author_email": c.author_email, "created_at": c.created_at, "body": c.body}
                for c in ticket.comments
            ],
            "attachments": [
                attachment_view(a) for a in repo.attachments_of_ticket(session, ticket.id)
            ],
            "suggestion": suggestion_view(repo.suggestion_of(session, ticket.id)),
        }
    if json_output:
        print_json(view)
        return
    print_fields(view, (n for n in view if n not in ("body", "comments", "attachments")))
    out.print(f"\n{view['body']}\n", highlight=False, markup=False)
    for attachment in view["attachments"]:
        out.print(
            f"attachment {attachment['id']}: {attachment['filename']} ({attachment['size']} bytes)",
            highlight=False,
            markup=False,
        )
    for comment in view["comments"]:
        when = readable(comment["created_at"])
        out.print(f"--- comment from {comment['author_email']} at {when}", markup=False)
        out.print(comment["body"], highlight=False, markup=False)


@attachments_app.command("list")
def attachments_list(
    ctx: typer.Context,
    key: TicketKey,
    json_output: JsonOption = False,
) -> None:
    """List the attachments of a ticket and of its comments, with the ids `save` takes."""
    from storage import repo
    from views.records import attachment_view

    with runtime(ctx) as rt, rt.sessions() as session:
        ticket = ticket_or_exit(session, key)
        rows = [attachment_view(a) for a in repo.attachments_of_ticket(session, ticket.id)]
    print_rows(
        f"attachments of {key}", ["id", "filename", "content_type", "size"], rows, json_output
    )


@attachments_app.command("save")
def attachments_save(
    ctx: typer.Context,
    attachment_id: Annotated[int, typer.Argument(help="Attachment id, from `attachments list`.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write here; - for stdout (default: its file name)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Save an attachment's exact bytes to a file."""
    from storage import repo
    from storage.models import purged

    with runtime(ctx) as rt, rt.sessions() as session:
        found = repo.attachment_content(session, attachment_id)
    if found is None:
        raise fail(f"no attachment {attachment_id}", EXIT_FAILED)
    attachment, content = found
    if purged(attachment.sha256, content):
        raise fail(purged_note(f"attachment {attachment_id}", attachment.sha256), EXIT_FAILED)
    if output == Path("-"):
        sys.stdout.buffer.write(content)
        return
    target = output or Path(attachment.filename)  # sanitised when stored: a plain file name
    if target.exists() and not force:
        raise fail(f"{target} exists: give --force to overwrite it", EXIT_USAGE)
    target.write_bytes(content)
    err.print(f"saved {target} ({len(content)} bytes)", highlight=False, markup=False)


def purged_note(what: str, sha256: str) -> str:
    return (
        f"{what}: its bytes were dropped by retention (`mailintake purge`); the row keeps "
        f"sha256 {sha256} and the size"
    )


@messages_app.command("list")
def messages_list(
    ctx: typer.Context,
    status: Annotated[Fate | None, typer.Option(help="Only messages with this fate.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Received within e.g. 2h, 2d, or since an ISO date.")
    ] = None,
    limit: LimitOption = 50,
    json_output: JsonOption = False,
) -> None:
    """List received messages and their fate, newest first."""
    from pipeline.replay import parse_since
    from storage import repo
    from views.records import message_view

    try:
        start = parse_since(since, settings_of(ctx).zone) if since else None
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from exc
    with runtime(ctx) as rt, rt.sessions() as session:
        found = repo.list_messages(session, limit, status, start)
        messages = [message_view(m) for m in found]
    columns = ["id", "received_at", "source", "status", "message_id", "mail_from", "size"]
    print_rows("messages", columns, messages, json_output)


@messages_app.command("show")
def messages_show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Ledger id or Message-ID.")],
    json_output: JsonOption = False,
) -> None:
    """Show the fate of one message ("did my mail arrive?")."""
    from storage import repo
    from views.records import history_of, message_view

    with runtime(ctx) as rt, rt.sessions() as session:
        message = repo.message_by_id_or_message_id(session, ref)
        if message is None:
            raise fail(f"no message {ref}", EXIT_FAILED)
        view = message_view(message) | {"history": history_of(session, message.id)}
    if json_output:
        print_json(view)
        return
    print_fields(view, (n for n in view if n not in ("history", "stage_timings")))
    print_timings(view["stage_timings"])
    print_history(view["history"])


SinceOption = Annotated[
    str | None,
    typer.Option(help="Received within 2d, 12h, 30m, 1w, or since an ISO date (2026-11-20)."),
]
StageOption = Annotated[Stage | None, typer.Option(help="Failed at this stage.")]
ErrorOption = Annotated[
    str | None, typer.Option(help="The error text contains this (case-insensitive).")
]
SourceOption = Annotated[Source | None, typer.Option(help="Arrived this way.")]
HEADER_BYTES = 64 * 1024  # `failed list` reads only this much of each message for its headers


def failed_filter(
    ctx: typer.Context,
    since: str | None,
    stage: str | None,
    error: str | None,
    source: str | None,
) -> repo.FailedFilter:
    from pipeline.replay import parse_since
    from storage import repo

    try:
        moment = parse_since(since, settings_of(ctx).zone) if since else None
    except ValueError as exc:
        raise fail(f"--since: {exc}", EXIT_USAGE) from exc
    return repo.FailedFilter(since=moment, stage=stage, error=error, source=source)


def ledger_message(session: Session, ref: str) -> InboundMessage:
    from storage import repo

    message = repo.message_by_id_or_message_id(session, ref)
    if message is None:
        raise fail(f"no message {ref} in the ledger", EXIT_FAILED)
    return message


@failed_app.command("list")
def failed_list(
    ctx: typer.Context,
    since: SinceOption = None,
    stage: StageOption = None,
    error: ErrorOption = None,
    source: SourceOption = None,
    limit: LimitOption = 100,
    json_output: JsonOption = False,
) -> None:
    """List failed messages, newest first."""
    from storage import repo
    from views.records import failed_view

    wanted = failed_filter(ctx, since, stage, error, source)
    with runtime(ctx) as rt, rt.sessions() as session:
        found = repo.failed_with_head(session, wanted, limit, HEADER_BYTES)
        rows = [failed_view(message, head) for message, head in found]
    columns = ["id", "received_at", "from", "subject", "stage", "error", "attempts"]
    print_rows("failed messages", columns, rows, json_output)


@failed_app.command("show")
def failed_show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Ledger id or Message-ID.")],
    json_output: JsonOption = False,
) -> None:
    """Show a message's envelope, headers, full error with traceback, and attempts history."""
    from ingest.headers import decoded_headers
    from views.records import history_of, message_view

    with runtime(ctx) as rt, rt.sessions() as session:
        message = ledger_message(session, ref)
        kept = b"" if message.raw_purged else message.raw
        view = message_view(message) | {
            "envelope": message.envelope,
            "raw_purged": message.raw_purged,
            "headers": [[name, value] for name, value in decoded_headers(kept)],
            "history": history_of(session, message.id),
        }
    if json_output:
        print_json(view)
        return
    shown = ("error", "headers", "history", "stage_timings")
    print_fields(view, (n for n in view if n not in shown))
    print_timings(view["stage_timings"])
    out.print("[bold]headers[/bold]:" + (" (raw bytes purged by retention)" * view["raw_purged"]))
    for name, value in view["headers"]:
        out.print(f"  {name}: {value}", highlight=False, markup=False)
    out.print("[bold]error[/bold]:")
    out.print(view["error"] or "  (none)", highlight=False, markup=False)
    print_history(view["history"])


@failed_app.command("export")
def failed_export(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Ledger id or Message-ID.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Write a message's exact raw bytes, for example to make a test case."""
    with runtime(ctx) as rt, rt.sessions() as session:
        message = ledger_message(session, ref)
        inbound_id, raw = message.id, message.raw
        if message.raw_purged:
            raise fail(purged_note(f"message {inbound_id}", message.sha256), EXIT_FAILED)
    if output is None:
        stdout = typer.get_binary_stream("stdout")
        stdout.write(raw)
        stdout.flush()
        return
    try:
        output.write_bytes(raw)
    except OSError as exc:
        raise fail(f"{output}: cannot write: {exc.strerror or exc}", EXIT_USAGE) from exc
    err.print(f"wrote message {inbound_id} ({len(raw)} bytes) to {output}", highlight=False)


@failed_app.command("replay")
def failed_replay(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="Ledger ids to replay.")] = None,
    all_failed: Annotated[bool, typer.Option("--all", help="Every failed message.")] = False,
    since: SinceOption = None,
    stage: StageOption = None,
    error: ErrorOption = None,
    source: SourceOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only show what would be replayed.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Run failed messages through today's code and rules.

    Exits 1 if any still fail."""
    from pipeline.replay import replay, select_failed
    from storage import repo

    selecting = all_failed or any(f is not None for f in (since, stage, error, source))
    if bool(ids) == selecting:
        raise fail(
            "give ledger ids, or --all and/or filters (--since, --stage, --error, --source)",
            EXIT_USAGE,
        )
    wanted = failed_filter(ctx, since, stage, error, source)
    with runtime(ctx) as rt:
        chosen = list(dict.fromkeys(ids)) if ids else select_failed(rt.sessions, wanted)
        if dry_run:
            with rt.sessions() as session:
                statuses = repo.statuses_of(session, chosen)
            report_dry_run(chosen, statuses, json_output)
            return
        with progress_bar("replaying") as bar:
            task = bar.add_task("replay", total=len(chosen))
            result = replay(rt.pipeline(), chosen, lambda: bar.advance(task))
    summary: dict[str, Any] = {
        "selected": len(chosen),
        "fates": result.counts(),
        "still_failed": result.still_failed,
        "missing": result.missing,
    }
    if json_output:
        print_json(summary)
    else:
        fates = ", ".join(f"{n} {fate}" for fate, n in summary["fates"].items() if n)
        out.print(f"replayed {len(chosen)} message(s): {fates or 'nothing to do'}")
        if result.still_failed:
            out.print(f"still failing: {' '.join(map(str, result.still_failed))}")
        if result.missing:
            out.print(f"not in the ledger: {' '.join(map(str, result.missing))}")
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def report_dry_run(chosen: list[int], statuses: dict[int, str], json_output: bool) -> None:
    """What a replay would touch; exits 1 if an id is not in the ledger."""
    messages = [{"id": i, "status": statuses.get(i)} for i in chosen]
    if json_output:
        print_json({"dry_run": True, "selected": len(chosen), "messages": messages})
    else:
        out.print(f"would replay {len(chosen)} message(s)")
        for m in messages:
            out.print(f"  {m['id']}: {m['status'] or 'not in the ledger'}", highlight=False)
    if len(statuses) < len(chosen):
        raise typer.Exit(EXIT_FAILED)


@failed_app.command("discard")
def failed_discard(
    ctx: typer.Context,
    ids: Annotated[list[int], typer.Argument(help="Ledger ids of failed messages.")],
    reason: Annotated[str, typer.Option(help="Why they need no replay (kept for audit).")],
    json_output: JsonOption = False,
) -> None:
    """Mark failed messages handled without replaying them.

    The row and its raw bytes stay. Exits 1 if an id is not a failed message."""
    from pipeline.replay import discard

    if not reason.strip():
        raise fail("--reason must say why the messages are discarded", EXIT_USAGE)
    with runtime(ctx) as rt:
        results = discard(rt.sessions, ids, reason.strip())
    grouped = {
        outcome: [i for i, r in results.items() if r == outcome]
        for outcome in ("discarded", "not_failed", "missing")
    }
    if json_output:
        print_json(grouped)
    else:
        labels = {"not_failed": "not failed", "missing": "not in the ledger"}
        for outcome, found in grouped.items():
            if found:
                listed = " ".join(map(str, found))
                out.print(f"{labels.get(outcome, outcome)}: {listed}", highlight=False)
    if grouped["not_failed"] or grouped["missing"]:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Receive mail by SMTP (and LMTP) and turn it into tickets until SIGTERM/SIGINT.

    Processing runs in `processing.workers` worker processes (`processing.mode: process`) or in a
    thread (`thread`). Exits 2 if a listener cannot start (e.g. its port is taken) or the rules
    or templates file is refused, 3 if the database is unavailable.
    """
    import asyncio

    from rules.reload import watch_files
    from sources.service import ListenerError, Service, serve_until_signalled
    from sources.workers import WorkerPool, WorkerRules, WorkerTemplates

    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start and stop lines
    with runtime(ctx) as rt:
        try:
            pipeline = rt.pipeline()  # a bad rules or templates file stops here (exit 2)
            holder, templates = rt.rules_holder(), rt.templates_holder()
            watched: list[Reloadable]
            if rt.settings.processing.mode == "thread":
                service = Service(rt.settings, pipeline)
                watched = [h for h in (holder, templates) if h is not None]
                service.parts.rules, service.parts.templates = holder, templates
            else:
                workers = WorkerPool(rt.settings, holder, templates)
                service = Service(rt.settings, pipeline, workers)
                worker_templates = WorkerTemplates(templates, workers)
                watched = [worker_templates]
                service.parts.templates = worker_templates
                if holder is not None:
                    worker_rules = WorkerRules(holder, workers)
                    watched.insert(0, worker_rules)
                    service.parts.rules = worker_rules
                    service.parts.rules_reload_errors = lambda: worker_rules.reload_errors
            service.add_task("reload", partial(watch_files, watched))
            if rt.settings.web.enabled:
                from web.app import web_routes
                from web.site import Site

                site = Site(rt.settings, rt.sessions, service.parts)
                service.http_routes.extend(web_routes(site))
            asyncio.run(serve_until_signalled(service))
        except ListenerError as exc:
            raise fail(str(exc), EXIT_USAGE) from exc


@web_app.command("adduser")
def web_adduser(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[WebRole, typer.Option(help="admin may replay and discard.")] = WebRole.viewer,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin (scripts).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Hash a password (argon2) and print the `web.accounts` entry to add to the config.

    Nothing is written: paste the entry under `web: accounts:` (the hash is not the password,
    but keep the file private)."""
    from web.auth import hash_password

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD:
        raise fail(f"the password needs at least {MIN_PASSWORD} characters", EXIT_USAGE)
    entry = {"role": role.value, "password_hash": hash_password(password)}
    if json_output:
        print_json({name: entry})
        return
    out.print(
        f"web:\n  accounts:\n    {json.dumps(name, ensure_ascii=False)}:\n"
        f"      role: {entry['role']}\n      password_hash: '{entry['password_hash']}'",
        highlight=False,
        markup=False,
        soft_wrap=True,  # a hash cut across lines would not load as YAML
    )


RulesFileOption = Annotated[
    Path | None,
    typer.Option("--rules", help="Rules file to use (default: rules.path from the config)."),
]


def configured_rules_path(ctx: typer.Context, given: Path | None) -> Path:
    path = given or settings_of(ctx).rules.path
    if path is None:
        raise fail("no rules file: give one, or set rules.path in the config", EXIT_USAGE)
    return path


def load_rules_or_exit(
    ctx: typer.Context, path: Path, code: int = EXIT_FAILED, *, json_output: bool = False
) -> CompiledRules:
    """The compiled rules, or every problem (on stderr, or as JSON on stdout) and exit `code`."""
    from rules.load import RulesError, load_rules

    try:
        settings = settings_of(ctx)
        return load_rules(path, settings.zone, settings.authserv_id)
    except RulesError as exc:
        problems = [str(problem) for problem in exc.problems]
        if json_output:
            print_json({"path": str(path), "ok": False, "errors": problems})
        for problem in problems:
            err.print(f"[red]error:[/red] {escape(problem)}", highlight=False)
        raise typer.Exit(code) from exc


@rules_app.command("check")
def rules_check(
    ctx: typer.Context,
    path: Annotated[
        Path | None, typer.Argument(help="Rules file (default: rules.path from the config).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Validate a rules file and summarise it.

    Exits 1 if it has errors (warnings do not)."""
    from views.mail import rules_summary

    rules = load_rules_or_exit(ctx, configured_rules_path(ctx, path), json_output=json_output)
    summary = {"ok": True, **rules_summary(rules)}
    if json_output:
        print_json(summary)
        return
    out.print(f"{rules.path}: ok, version {rules.version[:12]}", highlight=False)
    out.print(f"{len(rules.rules)} rules: " + ", ".join(r.name for r in rules.rules))
    out.print("people: " + ", ".join(summary["people"]))
    for name, team in summary["teams"].items():
        out.print(f"team {name} ({team['strategy']}): {', '.join(team['members'])}")
    for warning in rules.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def print_explained(result: dict[str, Any]) -> None:
    say = partial(out.print, highlight=False, soft_wrap=True)
    say(f"[bold]{escape(result['file'])}[/bold] {escape(result['subject'])}")
    facts = ["from", "source_kind", "auto_reply", "follow_up_ticket_id", "fate", "drop_reason"]
    say("  " + "  ".join(f"{k}: {result[k]}" for k in facts), markup=False)
    marks = {"applied": "[green]✓ applied[/green]", "missed": "[dim]✗ missed[/dim]"}
    for rule in result["rules"]:
        mark = marks.get(rule["result"], "[yellow]✓ matched, not applied[/yellow]")
        reason = f": {escape(rule['reason'])}" if rule["reason"] else ""
        say(f"  {mark} {rule['rule']} (line {rule['line']}){reason}")
    decision = {k: v for k, v in result["decision"].items() if v not in (None, [], {}, False)}
    version = decision.pop("rules_version", "")[:12]
    shown = ", ".join(f"{k}: {v}" for k, v in decision.items())
    say(f"  → {shown} (rules {version})", markup=False)
    suggested = result.get("suggestion")
    if suggested:
        reason = ", ".join(f"`{r}`" for r in suggested["reason"])
        say(
            f"  suggestion (triage model v{suggested['model_version']}): category "
            f"{suggested['category']} ({suggested['category_probability']:.2f}), assignee "
            f"{suggested['assignee']} ({suggested['assignee_probability']:.2f}); because of "
            f"{reason}",
            markup=False,
        )
    say("")


@rules_app.command("test")
def rules_test(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help=".eml files to route.")],
    rules_file: RulesFileOption = None,
    received_at: Annotated[
        datetime | None,
        typer.Option(
            help="Pretend the mails arrived then (ISO time; without an offset, in the "
            "configured time zone; default: now)."
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Route mails with the real parser and rules, writing nothing.

    Explains every rule (whether it matched and, if not, which condition failed), then the
    decision."""
    from ingest.intake import unstored_mail
    from ingest.mail import Envelope
    from pipeline.dryrun import DryRouter
    from views.mail import explained

    rules = load_rules_or_exit(ctx, configured_rules_path(ctx, rules_file))
    moment = received_at or datetime.now(UTC)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=settings_of(ctx).zone)
    results = []
    with runtime(ctx, read_only=True) as rt:
        router = DryRouter(rt.settings, rt.sessions, rules)
        for path in files:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise fail(f"{path}: cannot read: {exc.strerror or exc}", EXIT_USAGE) from exc
            mail = unstored_mail(
                raw, Envelope(source=Source.FILE, extra={"origin": str(path)}), moment
            )
            evaluation = router.route(mail)
            results.append(explained(path, mail, evaluation))
    if json_output:
        print_json(results)
        return
    for result in results:
        print_explained(result)


@rules_app.command("diff")
def rules_diff(
    ctx: typer.Context,
    new_rules: Annotated[Path, typer.Argument(help="The edited rules file to compare.")],
    since: Annotated[
        str, typer.Option(help="Replay mails received since: 7d, 12h, or an ISO date.")
    ] = "7d",
    json_output: JsonOption = False,
) -> None:
    """List the stored mails that a new rules file would route differently.

    Replays recent mails through the current and the new rules and shows those whose fate,
    category, assignee or priority would change. Nothing is written."""
    from pipeline.dryrun import diff
    from pipeline.replay import parse_since

    try:
        start = parse_since(since, settings_of(ctx).zone)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from exc
    current = load_rules_or_exit(ctx, configured_rules_path(ctx, None), EXIT_USAGE)
    new = load_rules_or_exit(ctx, new_rules)
    with runtime(ctx) as rt:
        replayed, changes = diff(rt.settings, rt.sessions, current, new, start)
    rows: list[dict[str, Any]] = [
        {
            "inbound_id": c.inbound_id,
            "ticket": c.ticket_key,
            "subject": c.subject,
            "changes": {k: {"current": a, "new": b} for k, (a, b) in c.differences().items()},
        }
        for c in changes
    ]
    if json_output:
        print_json({"replayed": replayed, "changed": rows})
        return
    shown = [
        r
        | {
            "changes": "; ".join(
                f"{k}: {v['current']} → {v['new']}" for k, v in r["changes"].items()
            )
        }
        for r in rows
    ]
    title = f"would change ({len(rows)} of {replayed} since {readable(start)})"
    print_rows(title, ["inbound_id", "ticket", "subject", "changes"], shown, json_output=False)


TemplatesFileOption = Annotated[
    Path | None,
    typer.Option(
        "--templates", help="Templates file to use (default: templates.path from the config)."
    ),
]
MailFilesArgument = Annotated[list[Path], typer.Argument(help="Message files (.eml).")]


def templates_or_exit(ctx: typer.Context, given: Path | None) -> list[Template]:
    """The templates of `given` or of the config; a refused file is exit 2 with its problems."""
    from config import ConfigError
    from ingest.extract import load_templates

    chosen = settings_of(ctx).templates
    path = given or chosen.path
    try:
        return load_templates(path, required=given is not None or chosen.required)
    except ConfigError as exc:
        raise fail(f"templates file refused:\n{exc}", EXIT_USAGE) from exc


def parsed_files(files: list[Path]) -> list[tuple[Path, Any]]:
    """Each file and its `ParsedMail`; an unreadable file is exit 2."""
    from ingest.parse import UnreadableMail, parse

    parsed = []
    for path in files:
        try:
            parsed.append((path, parse(path.read_bytes())))
        except OSError as exc:
            raise fail(f"{path}: cannot read: {exc.strerror or exc}", EXIT_USAGE) from exc
        except UnreadableMail as exc:
            raise fail(f"{path}: {exc}", EXIT_USAGE) from exc
    return parsed


@templates_app.command("test")
def templates_test(
    ctx: typer.Context,
    files: MailFilesArgument,
    templates_file: TemplatesFileOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show which template each mail matches and every field it finds or misses.

    Uses no database. For each template, says which match conditions (sender, subject, body)
    the mail meets; for the template that matched, lists each field spec with the value found
    (as written and typed) or `missed`. Exits 1 if a mail matches no template.
    """
    from ingest.extract import explain_templates

    templates = templates_or_exit(ctx, templates_file)
    settings = settings_of(ctx)
    results = [
        {"file": str(path), "subject": mail.subject, "from": mail.from_email}
        | explain_templates(templates, mail, settings.zone, settings.authserv_id)
        for path, mail in parsed_files(files)
    ]
    if json_output:
        print_json(results)
    else:
        for result in results:
            print_template_test(result)
    if any(result["template"] is None for result in results):
        raise typer.Exit(EXIT_FAILED)


def print_template_test(result: dict[str, Any]) -> None:
    say = partial(out.print, highlight=False, soft_wrap=True)
    say(f"[bold]{escape(result['file'])}[/bold] {escape(result['subject'])}")
    say(f"  from: {result['from'] or '-'}", markup=False)
    for tried in result["tried"]:
        checks = ", ".join(f"{k} {'✓' if ok else '✗'}" for k, ok in tried["conditions"].items())
        chosen = tried["template"] == result["template"]
        mark = "[green]✓ matched[/green]" if chosen else "[dim]✗ not matched[/dim]"
        say(f"  {mark} {escape(tried['template'])} ({checks})")
    if result["template"] is None:
        say("  → no template matched: a plain email ticket (From is the requester)\n")
        return
    say(f"  → template {escape(result['template'])}, source_kind {result['source_kind']}")
    if result["unproven"]:
        say(
            f"    [yellow]only a hint[/yellow] (no raised priority, no gateway route): "
            f"{escape(result['unproven'])}"
        )
    for spec in result["fields"]:
        if not spec["found"]:
            say(f"    [yellow]✗ {spec['key']}[/yellow] missed ({spec['by']}, {spec['type']})")
            continue
        typed = {k: v for k, v in spec["values"].items() if v != spec["written"]}
        extra = f" → {readable(typed)}" if typed else ""
        written = escape(spec["written"].replace("\n", " ⏎ "))
        say(f"    [green]✓ {spec['key']}[/green]: {written}{escape(extra)}")
    requester = {k: v for k, v in result["requester"].items() if v}
    say(f"  requester: {escape(readable(requester) if requester else '-')}\n")


@templates_app.command("suggest")
def templates_suggest(
    ctx: typer.Context,
    files: MailFilesArgument,
    name: Annotated[
        str | None, typer.Option(help="The template's name (default: from the sender's domain).")
    ] = None,
    templates_file: TemplatesFileOption = None,
    json_output: JsonOption = False,
) -> None:
    """Draft a template from a few sample mails of one sender, for a person to review.

    Takes the labelled lines the samples share (`お名前：...`), typed where every value reads as
    a phone number, a time or an email address; a label an existing template knows keeps that
    template's field key (so it fills the same requester column). Prints YAML to add to the
    templates file. Uses no database. Exits 1 if the samples share no labelled line.
    """
    from ingest.suggest import as_yaml, suggest_template

    known = templates_or_exit(ctx, templates_file)
    mails = [mail for _path, mail in parsed_files(files)]
    draft = suggest_template(mails, known, name)
    text = as_yaml(draft, len(mails))
    if json_output:
        print_json({"samples": len(mails), "template": draft, "yaml": text})
    else:
        sys.stdout.write(text)
    if len({s for m in mails if (s := (m.from_email or "").rpartition("@")[2])}) > 1:
        err.print("[yellow]warning:[/yellow] the samples come from more than one domain")
    if not draft["fields"]:
        err.print(f"[red]error:[/red] the {len(mails)} mails share no labelled line")
        raise typer.Exit(EXIT_FAILED)


TrainedSinceOption = Annotated[
    str, typer.Option(help="Learn from tickets made within 180d, 12w, or since an ISO date.")
]


def since_or_exit(ctx: typer.Context, since: str) -> datetime:
    from pipeline.replay import parse_since

    try:
        return parse_since(since, settings_of(ctx).zone)
    except ValueError as exc:
        raise fail(f"--since: {exc}", EXIT_USAGE) from exc


@triage_app.command("train")
def triage_train(
    ctx: typer.Context, since: TrainedSinceOption = "180d", json_output: JsonOption = False
) -> None:
    """Fit the triage model on the tickets' categories and assignees, and store it.

    It learns the tickets' current category and assignee (as people corrected them) and is
    stored as the next version: every node suggests with it from its next message.

    Exits 1 when there is too little to learn from (fewer than two categories)."""
    from triage.model import TrainingError
    from triage.store import train

    start = since_or_exit(ctx, since)
    with runtime(ctx) as rt, rt.sessions.begin() as session:
        try:
            trained = train(session, start)
        except TrainingError as exc:
            raise fail(f"nothing stored: {exc}", EXIT_FAILED) from exc
    if json_output:
        print_json(trained.__dict__)
        return
    out.print(
        f"triage model v{trained.version}: {trained.trained_on} tickets, "
        f"{len(trained.categories)} categories, {len(trained.assignees)} assignees, "
        f"{trained.size // 1024} KiB, trained in {trained.seconds:.1f} s",
        highlight=False,
    )


@triage_app.command("eval")
def triage_eval(
    ctx: typer.Context,
    since: TrainedSinceOption = "180d",
    holdout: Annotated[
        float, typer.Option(min=0.05, max=0.5, help="The newest share of tickets to test on.")
    ] = 0.2,
    rules_file: RulesFileOption = None,
    json_output: JsonOption = False,
) -> None:
    """Measure the model on the newest tickets, beside the rules and the most common class.

    Fits on the older tickets and tests on the newer ones, next to the rules alone (the held-out
    mails' raw bytes routed again, writing nothing) and to always guessing the most common
    class. Stores nothing."""
    from pipeline.dryrun import rules_alone
    from storage import repo
    from triage.evaluate import evaluate

    start = since_or_exit(ctx, since)
    rules_path = rules_file or settings_of(ctx).rules.path
    rules = load_rules_or_exit(ctx, rules_path, EXIT_USAGE) if rules_path else None
    with runtime(ctx) as rt:
        with rt.sessions() as session:
            tickets = repo.labelled_tickets(session, start)
        decide = rules_alone(rt.settings, rt.sessions, rules) if rules else None
        tested = len(tickets) - round(len(tickets) * (1 - holdout))
        with progress_bar("rules alone") as bar:
            task = bar.add_task("replay", total=tested if decide else 0)
            try:
                report = evaluate(
                    tickets,
                    (lambda t: decide(t.inbound_message_id)) if decide else None,
                    holdout,
                    lambda: bar.advance(task),
                )
            except ValueError as exc:
                raise fail(str(exc), EXIT_FAILED) from exc
    if json_output:
        print_json(report.to_dict())
        return
    print_triage_report(report)


def print_triage_report(report: Report) -> None:
    from rich.table import Table

    out.print(
        f"trained on the older {report.trained_on} tickets, tested on the newer "
        f"{report.tested_on}; training {report.train_seconds:.2f} s "
        f"({report.train_cpu_seconds:.2f} s CPU), {report.predict_ms_per_message:.2f} ms per "
        f"message ({report.predict_cpu_ms_per_message:.2f} ms CPU)",
        highlight=False,
    )
    for target, found in report.targets.items():
        table = Table(title=f"{target}: accuracy / macro F1")
        for column in ("", "model", "rules alone", "most common"):
            table.add_column(column)
        baselines = [found.model, found.rules, found.most_common]
        table.add_row(
            "all", *(f"{s.accuracy:.3f} / {s.macro_f1:.3f}" if s else "-" for s in baselines)
        )
        for label in found.labels:
            table.add_row(
                f"{label} (F1, n={found.model.per_class[label]['support']})",
                *(f"{s.per_class[label]['f1']:.3f}" if s else "-" for s in baselines),
            )
        out.print(table)
        confusion = Table(title=f"{target}: rows the truth, columns the model's guess")
        confusion.add_column("")
        for label in found.labels:
            confusion.add_column(label, justify="right")
        for label, row in zip(found.labels, found.confusion, strict=True):
            confusion.add_row(label, *(str(n) for n in row))
        out.print(confusion)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the database schema to this version."""
    from storage import db

    with runtime(ctx, migrate=False) as rt:
        db.upgrade(rt.engine)
        out.print(f"database at revision {db.current_revision(rt.engine)}")


# --- operating it: doctor, status, stats, purge -----------------------------------------------


@app.command()
def doctor(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Check that this installation can run, and say how to fix what cannot.

    Checks the configuration, that the database is reachable and at the newest migration, the
    rules and templates files (as `rules check` and `serve` load them), `authserv_id` when a
    rule tests `auth`, that the listener ports are free (or held by this service: its /healthz
    answers), and that each IMAP account logs in and has its folders. Writes nothing.
    Exits 1 if any check fails."""
    from rich.table import Table

    from sources.doctor import Outcome, diagnose

    checks = diagnose(ctx.obj.config)
    broken = any(c.outcome == Outcome.FAIL for c in checks)
    if json_output:
        print_json({"ok": not broken, "checks": [c.as_dict() for c in checks]})
    else:
        styles = {Outcome.OK: "green", Outcome.FAIL: "bold red", Outcome.SKIP: "dim"}
        table = Table(title="mailintake doctor")
        for column in ("check", "result", "detail", "how to fix"):
            table.add_column(column, overflow="fold")
        for c in checks:
            result = f"[{styles[c.outcome]}]{c.outcome}[/]"
            table.add_row(escape(c.name), result, escape(c.detail), escape(c.fix))
        out.print(table)
    if broken:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def status(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Show how intake stands, from the store.

    The backlog (messages not processed yet) and how long the oldest has waited, messages by
    fate, failures by stage, retries scheduled and due, the newest message of each source, the
    IMAP fetch checkpoints, and the rules version that made the last ticket."""
    from storage.models import utcnow
    from views.status import collect_status

    with runtime(ctx, read_only=True) as rt, rt.sessions() as session:
        state = collect_status(session, utcnow())
    if json_output:
        print_json(state.as_dict())
        return
    view = state.as_dict()
    view["oldest_unprocessed_age"] = f"{state.oldest_unprocessed_age_seconds:.0f} s"
    view["last_ticket"] = (
        f"{state.last_ticket.key} at {readable(state.last_ticket.created_at)}, rules "
        f"{(state.last_ticket.rules_version or '-')[:12]}"
        if state.last_ticket
        else None
    )
    names = ["backlog", "oldest_unprocessed_at", "oldest_unprocessed_age", "by_status"]
    print_fields(view, [*names, "failed_by_stage", "retries_scheduled", "retries_due"])
    print_fields(view, ["last_ticket"])
    sources = [{"source": k, **v} for k, v in view["last_by_source"].items()]
    if sources:
        columns = ["source", "id", "received_at", "message_id"]
        print_rows("last message per source", columns, sources, json_output=False)
    if view["imap_checkpoints"]:
        columns = ["account", "folder", "uidvalidity", "last_uid", "updated_at"]
        print_rows("IMAP checkpoints", columns, view["imap_checkpoints"], json_output=False)


@app.command()
def stats(
    ctx: typer.Context,
    since: Annotated[
        str, typer.Option(help="Received within 1d, 12h, 1w, or since an ISO date.")
    ] = "1d",
    json_output: JsonOption = False,
) -> None:
    """Count what arrived: messages by source and fate, tickets by category and assignee."""
    from pipeline.replay import parse_since
    from views.status import collect_stats

    try:
        start = parse_since(since, settings_of(ctx).zone)
    except ValueError as exc:
        raise fail(f"--since: {exc}", EXIT_USAGE) from exc
    with runtime(ctx, read_only=True) as rt, rt.sessions() as session:
        counted = collect_stats(session, start)
    if json_output:
        print_json(counted.as_dict())
        return
    out.print(f"since {readable(start)}", highlight=False)
    groups: list[tuple[str, dict[Any, int]]] = [
        ("messages by source", counted.by_source),
        ("messages by fate", counted.by_fate),
        ("tickets by category", counted.by_category),
        ("tickets by assignee", counted.by_assignee),
    ]
    for title, counts in groups:
        rows = [{"": readable(k), "count": n} for k, n in sorted(counts.items(), key=str)]
        print_rows(title, ["", "count"], rows, json_output=False)


@app.command()
def purge(
    ctx: typer.Context,
    raw_older_than: Annotated[
        str,
        typer.Option(
            "--raw-older-than", help="Messages received before 180d, 26w ago, or an ISO date."
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do it (default: only show).")] = False,
    json_output: JsonOption = False,
) -> None:
    """Drop the raw bytes and attachment contents of old messages whose fate is final.

    Ticket, comment, duplicate and dropped messages received before the cutoff lose their raw
    bytes, and attachments only they use lose their content; every row stays, with its sha256
    and size. Failed, discarded and unprocessed messages keep everything. Without --yes, only
    shows what would go. See docs/operations.md (retention and backups)."""
    from pipeline.replay import parse_since
    from pipeline.retention import plan_purge
    from pipeline.retention import purge as carry_out

    try:
        before = parse_since(raw_older_than, settings_of(ctx).zone)
    except ValueError as exc:
        raise fail(f"--raw-older-than: {exc}", EXIT_USAGE) from exc
    with runtime(ctx) as rt:
        plan = plan_purge(rt.sessions, before)
        summary = {"dry_run": not yes, **plan.summary()}
        if yes:
            with progress_bar("purging") as bar:
                task = bar.add_task("purge", total=plan.steps)
                emptied = carry_out(rt.sessions, plan, lambda n: bar.advance(task, n))
            summary |= {"emptied_messages": emptied[0], "emptied_blobs": emptied[1]}
    if json_output:
        print_json(summary)
        return
    verb = "emptied" if yes else "would empty"
    out.print(
        f"{verb} the raw bytes of {summary['messages']} message(s) received before "
        f"{readable(before)} ({summary['raw_bytes']:,} bytes; ledger ids "
        f"{summary['first_id'] or '-'} to {summary['last_id'] or '-'}) and "
        f"{summary['attachment_blobs']} attachment content(s) ({summary['attachment_bytes']:,} "
        "bytes)",
        highlight=False,
    )
    if not yes:
        out.print("nothing changed: give --yes to purge", highlight=False)


def main() -> None:
    app()
