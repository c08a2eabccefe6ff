"""The `mailintake` command line. Exit codes: 0 ok, 1 some message failed or a check failed,
2 bad usage or configuration, 3 the database is unavailable or its schema is outdated."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from config import ConfigError, Settings, load_settings
from ingest.files import MessageSource
from ingest.intake import receive
from ingest.mail import Envelope
from ingest.pipeline import PipelineContext, process, process_pending
from storage import db, repo
from storage.models import InboundMessage, MessageStatus, Ticket

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3

app = typer.Typer(help="Turn incoming email into tickets.", no_args_is_help=True)
tickets_app = typer.Typer(help="Look at tickets.", no_args_is_help=True)
messages_app = typer.Typer(help="Look at the ledger of received messages.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(tickets_app, name="tickets")
app.add_typer(messages_app, name="messages")
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]

    def pipeline(self) -> PipelineContext:
        return PipelineContext.with_default_routing(self.settings, self.sessions)


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
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mailparser").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        ctx.obj = load_settings(config)
    except ConfigError as exc:
        raise fail(f"bad configuration:\n{exc}", EXIT_USAGE) from exc


@contextmanager
def runtime(ctx: typer.Context, *, migrate: bool = True) -> Iterator[Runtime]:
    """Engine and sessions for one command; database problems become exit code 3."""
    settings: Settings = ctx.obj
    engine = db.make_engine(
        settings.database.url,
        busy_timeout_ms=settings.database.busy_timeout_ms,
        echo=settings.database.echo,
    )
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


def progress_bar(label: str) -> Progress:
    """A progress bar on a terminal; silent when stderr is a pipe or a file."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
    )


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def ticket_view(ticket: Ticket) -> dict[str, Any]:
    return {
        "key": ticket.key,
        "created_at": iso(ticket.created_at),
        "source_kind": ticket.source_kind,
        "category": ticket.category,
        "subject": ticket.subject,
        "requester_name": ticket.requester_name,
        "requester_email": ticket.requester_email,
        "requester_phone": ticket.requester_phone,
        "requester_company": ticket.requester_company,
        "assignee": ticket.assignee,
        "priority": ticket.priority,
        "status": ticket.status,
        "due_at": iso(ticket.due_at),
        "labels": ticket.labels,
        "fields": ticket.fields,
        "rule_names": ticket.rule_names,
        "rules_version": ticket.rules_version,
        "inbound_message_id": ticket.inbound_message_id,
    }


def message_view(message: InboundMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "received_at": iso(message.received_at),
        "source": message.source,
        "message_id": message.message_id,
        "mail_from": message.mail_from,
        "rcpt_to": message.rcpt_to,
        "peer": message.peer,
        "size": message.size,
        "sha256": message.sha256,
        "status": message.status,
        "fail_stage": message.fail_stage,
        "error": message.error,
        "attempts": message.attempts,
        "processed_at": iso(message.processed_at),
        "drop_reason": message.drop_reason,
        "defects": message.defects,
        "ticket_id": message.ticket_id,
        "duplicate_of_id": message.duplicate_of_id,
    }


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, ensure_ascii=False))


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)


@app.command()
def ingest(
    ctx: typer.Context,
    paths: Annotated[
        list[str],
        typer.Argument(help=".eml files, directories of them, mbox files, Maildirs, or - (stdin)."),
    ],
    json_output: JsonOption = False,
) -> None:
    """Store and process messages from files. Exits 1 if any message failed."""
    try:
        sources = [MessageSource(p) for p in paths]
    except (FileNotFoundError, OSError) as exc:
        raise fail(str(exc), EXIT_USAGE) from exc
    fates: Counter[str] = Counter()
    with runtime(ctx) as rt:
        pipeline = rt.pipeline()
        recovered = process_pending(pipeline)
        if recovered:
            err.print(f"processed {recovered} message(s) left over from an earlier run")
        with progress_bar("ingesting") as bar:
            task = bar.add_task("ingest", total=sum(len(s) for s in sources))
            for source in sources:
                for item in source:
                    envelope = Envelope(source=item.source, extra={"origin": item.origin})
                    inbound_id = receive(rt.sessions, item.raw, envelope)
                    fates[process(pipeline, inbound_id) or "skipped"] += 1
                    bar.advance(task)
    summary = {status.value: fates.get(status.value, 0) for status in MessageStatus}
    summary.pop(MessageStatus.RECEIVED.value)
    summary["read"] = sum(fates.values())
    if json_output:
        print_json(summary)
    else:
        out.print(", ".join(f"{v} {k}" for k, v in summary.items()))
    if fates.get(MessageStatus.FAILED.value):
        raise typer.Exit(EXIT_FAILED)


@tickets_app.command("list")
def tickets_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    status: Annotated[str | None, typer.Option(help="Only tickets in this status.")] = None,
    json_output: JsonOption = False,
) -> None:
    """List tickets, newest first."""
    with runtime(ctx) as rt, rt.sessions() as session:
        tickets = [ticket_view(t) for t in repo.list_tickets(session, limit, status)]
    if json_output:
        print_json(tickets)
        return
    columns = ["key", "created_at", "source_kind", "category", "assignee", "priority", "subject"]
    print_table("tickets", columns, [[t[c] for c in columns] for t in tickets])


@tickets_app.command("show")
def tickets_show(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Ticket key, e.g. INQ-42.")],
    json_output: JsonOption = False,
) -> None:
    """Show one ticket with its body, comments and attachments."""
    with runtime(ctx) as rt, rt.sessions() as session:
        ticket = repo.ticket_by_key(session, key)
        if ticket is None:
            raise fail(f"no ticket {key}", EXIT_FAILED)
        view = ticket_view(ticket) | {
            "body": ticket.body,
            "comments": [
                {"author_email": c.author_email, "created_at": iso(c.created_at), "body": c.body}
                for c in ticket.comments
            ],
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type, "size": a.size}
                for a in repo.attachments_of_ticket(session, ticket.id)
            ],
        }
    if json_output:
        print_json(view)
        return
    for name, value in view.items():
        if name not in ("body", "comments", "attachments"):
            out.print(f"[bold]{name}[/bold]: {value}", highlight=False)
    out.print(f"\n{view['body']}\n", highlight=False, markup=False)
    for attachment in view["attachments"]:
        out.print(f"attachment: {attachment['filename']} ({attachment['size']} bytes)")
    for comment in view["comments"]:
        out.print(f"--- comment from {comment['author_email']} at {comment['created_at']}")
        out.print(comment["body"], highlight=False, markup=False)


@messages_app.command("list")
def messages_list(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="received, ticket, comment, duplicate, dropped or failed.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    json_output: JsonOption = False,
) -> None:
    """List received messages and their fate, newest first."""
    with runtime(ctx) as rt, rt.sessions() as session:
        messages = [message_view(m) for m in repo.list_messages(session, limit, status)]
    if json_output:
        print_json(messages)
        return
    columns = ["id", "received_at", "source", "status", "message_id", "mail_from", "size"]
    print_table("messages", columns, [[m[c] for c in columns] for m in messages])


@messages_app.command("show")
def messages_show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Ledger id or Message-ID.")],
    json_output: JsonOption = False,
) -> None:
    """Show the fate of one message ("did my mail arrive?")."""
    with runtime(ctx) as rt, rt.sessions() as session:
        message = repo.message_by_id_or_message_id(session, ref)
        if message is None:
            raise fail(f"no message {ref}", EXIT_FAILED)
        view = message_view(message)
    if json_output:
        print_json(view)
        return
    for name, value in view.items():
        out.print(f"[bold]{name}[/bold]: {value}", highlight=False)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the database schema to this version."""
    with runtime(ctx, migrate=False) as rt:
        db.upgrade(rt.engine)
        out.print(f"database at revision {db.current_revision(rt.engine)}")


def main() -> None:
    app()
