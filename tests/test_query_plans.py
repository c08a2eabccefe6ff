"""Every lookup on the per-message path uses an index that fits it, on SQLite and PostgreSQL.

The store is first filled with a few thousand rows shaped like a real one (most messages
processed, most tickets closed, some attachments, a few failures and new messages) and its
statistics are gathered (ANALYZE). Then the statements are captured as the code sends them, with
their parameters, and explained: EXPLAIN QUERY PLAN on SQLite, EXPLAIN (FORMAT JSON) on
PostgreSQL. A plan fails if it reads a whole ledger, raw, ticket, comment, attachment, blob or
attempt table (SQLite `SCAN t`, PostgreSQL `Seq Scan`), or walks a whole index without a
condition on it (SQLite `SCAN t USING INDEX`, PostgreSQL an index scan with no `Index Cond`, as
`ORDER BY id DESC LIMIT 1` can be planned).

Why fill rather than `SET enable_seqscan = off`: on a table of a few rows PostgreSQL rightly
reads the table, and with sequential scans turned off a plan only shows that an index *could*
serve. With enough rows and fresh statistics the plans checked are the ones the planner really
picks on a grown store, which is what keeps the cost per message flat. SQLite has statistics
only after ANALYZE, which mailintake never runs, so its plans are checked both without them
(the planner's built-in guesses) and with them.

`assignment_cursors` (one row per team) and `imap_checkpoints` (one per folder) stay tiny
whatever the store holds; they are not checked. Nothing here measures time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event, insert, text
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from rules.engine import RulesRouter
from storage import repo
from storage.models import (
    AssignmentCursor,
    Attachment,
    AttachmentBlob,
    Fate,
    InboundMessage,
    InboundRaw,
    ProcessingAttempt,
    Ticket,
    TicketComment,
)
from tests.mails import simple_mail
from tests.rulesets import rules_from

WATCHED = {
    "inbound_ledger",
    "inbound_raw",
    "tickets",
    "ticket_comments",
    "attachments",
    "attachment_blobs",
    "processing_attempts",
}
PEOPLE = ["yamada", "sato", "suzuki"]
RULES = """
rules:
  - name: consultation
    when: {subject: {contains: [相談]}}
    then: {assignee: {team: sales, strategy: least_open}, category: quote}
  - name: everyone-else
    when: {always: true}
    then: {assignee: sales}
"""
FILE = Envelope(source="file")
NOW = datetime(2026, 12, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Filled:
    """What the filled store holds, for lookups that find something."""

    message_ids: list[str]  # Message-IDs of messages that made a ticket
    dedupe_keys: list[str]
    ticket_keys: list[str]
    received_id: int  # a message not processed yet
    blob_sha256: str


def fill(engine: Engine, messages: int = 4000) -> Filled:
    """A store of `messages` ledger rows: 60 % tickets (those of the newest 300 messages open,
    the rest closed), 20 % comments, the rest duplicates, drops, failures (half of them with a
    retry scheduled) and 20 new ones; every fifth ticket has an attachment. Bulk inserts,
    straight into the tables; no statistics gathered."""
    ledger: list[dict[str, Any]] = []
    raws: list[dict[str, Any]] = []
    tickets: list[dict[str, Any]] = []
    comments: list[dict[str, Any]] = []
    blobs: list[dict[str, Any]] = []
    attachments: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    ticket_ids: list[int] = []
    for i in range(1, messages + 1):
        kind = i % 10
        status = (
            Fate.TICKET
            if kind < 6
            else {6: Fate.COMMENT, 7: Fate.COMMENT, 8: Fate.DUPLICATE, 9: Fate.DROPPED}[kind]
        )
        if i % 97 == 0:
            status = Fate.FAILED
        if i > messages - 20:
            status = Fate.RECEIVED
        mid = f"<fill-{i}@example.com>"
        ledger.append(
            {
                "id": i,
                "received_at": NOW - timedelta(minutes=messages - i),
                "source": "smtp",
                "size": 600,
                "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
                "message_id": mid,
                "dedupe_key": f"mid:{hashlib.sha256(mid.encode()).hexdigest()}",
                "rcpt_to": ["inquiry@wine-importer.example.jp"],
                "envelope": {},
                "status": status,
                "fail_stage": "route" if status == Fate.FAILED else None,
                "next_attempt_at": NOW if status == Fate.FAILED and i % 2 else None,
                "attempts": 1,
                "defects": [],
            }
        )
        raws.append({"inbound_message_id": i, "raw": b"Subject: x\r\n\r\n" + b"x" * 580})
        attempts.append(
            {
                "inbound_message_id": i,
                "attempted_at": NOW,
                "outcome": status,
                "host": "h",
                "pid": 1,
                "command": "fill",
            }
        )
        if status == Fate.TICKET:
            tid = len(tickets) + 1
            ticket_ids.append(tid)
            tickets.append(
                {
                    "id": tid,
                    "key": f"INQ-{tid}",
                    "created_at": NOW,
                    "updated_at": NOW,
                    "source_kind": "email",
                    "subject": f"問い合わせ {i}",
                    "body": "ボルドーの在庫はありますか。" * 10,
                    "assignee": PEOPLE[tid % len(PEOPLE)],
                    "priority": "normal",
                    "status": "open" if i > messages - 300 else "closed",
                    "labels": [],
                    "fields": {},
                    "rule_names": [],
                    "inbound_message_id": i,
                    "origin_key": ledger[-1]["dedupe_key"],
                }
            )
            if tid % 5 == 0:
                digest = hashlib.sha256(f"blob-{tid}".encode()).hexdigest()
                blobs.append({"sha256": digest, "size": 2000, "content": b"%PDF" + b"0" * 1996})
                attachments.append(
                    {
                        "inbound_message_id": i,
                        "ticket_id": tid,
                        "filename": "見積書.pdf",
                        "content_type": "application/pdf",
                        "inline": False,
                        "size": 2000,
                        "sha256": digest,
                    }
                )
        elif status == Fate.COMMENT:
            comments.append(
                {
                    "ticket_id": ticket_ids[-1],
                    "created_at": NOW,
                    "body": "ありがとうございます。",
                    "body_full": "ありがとうございます。",
                    "inbound_message_id": i,
                    "origin_key": ledger[-1]["dedupe_key"],
                }
            )
    with engine.begin() as conn:
        conn.execute(insert(InboundMessage), ledger)
        conn.execute(insert(InboundRaw), raws)
        conn.execute(insert(Ticket), tickets)
        conn.execute(insert(TicketComment), comments)
        conn.execute(insert(AttachmentBlob), blobs)
        conn.execute(insert(Attachment), attachments)
        conn.execute(insert(ProcessingAttempt), attempts)
        conn.execute(insert(AssignmentCursor), [{"team": "sales", "position": 7}])
        # tickets and the ledger point at each other: the ledger's side is set afterwards.
        for fate, table, record in (
            ("ticket", "tickets", "t.id"),
            ("comment", "ticket_comments", "t.ticket_id"),
        ):
            conn.execute(
                text(
                    f"UPDATE inbound_ledger SET ticket_id = (SELECT {record} FROM {table} t "
                    f"WHERE t.inbound_message_id = inbound_ledger.id) WHERE status = '{fate}'"
                )
            )
        if conn.dialect.name == "postgresql":
            # Sequences were bypassed by the explicit ids.
            for table in ("inbound_ledger", "tickets"):
                conn.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), :n)"),
                    {"n": messages if table == "inbound_ledger" else len(tickets)},
                )
    processed = [row for row in ledger if row["status"] == Fate.TICKET]
    return Filled(
        message_ids=[row["message_id"] for row in processed[-50:]],
        dedupe_keys=[row["dedupe_key"] for row in processed[-50:]],
        ticket_keys=[t["key"] for t in tickets[-50:]],
        received_id=messages,
        blob_sha256=blobs[-1]["sha256"],
    )


def analyze(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))


@dataclass
class Statement:
    sql: str
    parameters: Any


@contextmanager
def captured(engine: Engine) -> Iterator[list[Statement]]:
    """The statements sent on `engine` meanwhile, with their parameters."""
    statements: list[Statement] = []

    def record(_conn, _cursor, sql, parameters, _context, executemany) -> None:
        if re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", sql, re.IGNORECASE):
            statements.append(Statement(sql, parameters[0] if executemany else parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def sqlite_plan(conn: Connection, statement: Statement) -> tuple[list[str], list[str]]:
    """(plan lines, full scans of watched tables)."""
    rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement.sql}", statement.parameters)
    lines = [row[3] for row in rows]
    bad = []
    for line in lines:
        scanned = re.match(r"SCAN (\w+)", line)
        # The ORM aliases a joined table (inbound_raw_1).
        if scanned and re.sub(r"_\d+$", "", scanned.group(1)) in WATCHED:
            bad.append(line)
    return lines, bad


def pg_plan(conn: Connection, statement: Statement) -> tuple[list[str], list[str]]:
    sql = f"EXPLAIN (FORMAT JSON) {statement.sql}"
    found = conn.exec_driver_sql(sql, statement.parameters).scalar_one()
    plan = (json.loads(found) if isinstance(found, str) else found)[0]["Plan"]
    lines: list[str] = []
    bad: list[str] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        relation = node.get("Relation Name")
        line = " " * depth + " ".join(
            str(node[key])
            for key in (
                "Node Type",
                "Relation Name",
                "Index Name",
                "Index Cond",
                "Filter",
                "Conflict Arbiter Indexes",
            )
            if key in node
        )
        lines.append(line)
        if relation in WATCHED:
            kind = node["Node Type"]
            if kind == "Seq Scan" or (
                kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node
            ):
                bad.append(line.strip())
        for child in node.get("Plans", []):
            walk(child, depth + 2)

    walk(plan, 0)
    return lines, bad


def explained(engine: Engine, statements: list[Statement]) -> list[tuple[str, list[str], bool]]:
    """(statement, plan lines, whether it reads a whole table or index) for each statement on
    the watched tables."""
    explainer = pg_plan if engine.dialect.name == "postgresql" else sqlite_plan
    found = []
    with engine.connect() as conn:
        for statement in statements:
            if any(re.search(rf"\b{name}\b", statement.sql) for name in WATCHED):
                lines, bad = explainer(conn, statement)
                found.append((" ".join(statement.sql.split()), lines, bool(bad)))
    return found


def full_scans(engine: Engine, statements: list[Statement]) -> list[str]:
    """A report of every statement whose plan reads a whole table or index (empty: none)."""
    return [
        "{}\n    {}".format(sql, "\n    ".join(lines))
        for sql, lines, bad in explained(engine, statements)
        if bad
    ]


PRIMARY_KEY = r"INTEGER PRIMARY KEY|inbound_ledger_pkey"
# Each lookup of the per-message path, called as the pipeline calls it, with the index its plan
# must use (a regular expression; None: any, as long as nothing is read whole). Reading every
# row of one status through the status index is no full scan, but it is what made a reply's
# lookup slow: hence the names.
Lookup = Callable[[Session, Filled], object]
LOOKUPS: dict[str, tuple[Lookup, str | None]] = {
    "load (the row and its raw bytes)": (
        lambda s, f: s.get(InboundMessage, f.received_id),
        PRIMARY_KEY,
    ),
    "lease_of": (lambda s, f: repo.lease_of(s, f.received_id), PRIMARY_KEY),
    "take_lease": (
        lambda s, f: repo.take_lease(
            s, f.received_id, repo.Lease("received", None, None), "me", NOW
        ),
        PRIMARY_KEY,
    ),
    "claim": (lambda s, f: repo.claim(s, f.received_id, "me"), PRIMARY_KEY),
    "first_record_of (dedupe key)": (
        lambda s, f: repo.first_record_of(s, f.dedupe_keys[7], f.received_id),
        "ix_inbound_ledger_dedupe_key_status",
    ),
    "ticket_for_message_ids (In-Reply-To)": (
        lambda s, f: repo.ticket_for_message_ids(s, f.message_ids[-1:]),
        "ix_inbound_ledger_message_id_status",
    ),
    "ticket_for_message_ids (30 References)": (
        lambda s, f: repo.ticket_for_message_ids(s, [*f.message_ids[:29], "<unknown@example.com>"]),
        "ix_inbound_ledger_message_id_status",
    ),
    "ticket_by_key (subject)": (
        lambda s, f: repo.ticket_by_key(s, f.ticket_keys[3]),
        r"sqlite_autoindex_tickets_\d+ \(key=\?\)|tickets_key_key",
    ),
    # PostgreSQL: ON CONFLICT on the primary key; SQLite shows no plan for an upsert.
    "advance_assignment_cursor (round robin)": (
        lambda s, f: repo.advance_assignment_cursor(s, "sales"),
        None,
    ),
    # Only open tickets are read (PostgreSQL may take the status index when few are open).
    "open_ticket_counts (least open)": (
        lambda s, f: repo.open_ticket_counts(s, PEOPLE),
        "ix_tickets_assignee_status|ix_tickets_status",
    ),
    "save_blob (known content)": (lambda s, f: repo.save_blob(s, f.blob_sha256, b"%PDF"), None),
    "save_blob (new content)": (lambda s, f: repo.save_blob(s, "0" * 64, b"%PDF"), None),
    "set_fate": (
        lambda s, f: repo.set_fate(s, f.received_id, Fate.DROPPED, drop_reason="x"),
        PRIMARY_KEY,
    ),
    "mark_failed": (
        lambda s, f: repo.mark_failed(s, f.received_id, "me", "route", "e", NOW),
        PRIMARY_KEY,
    ),
    "schedule_retry": (
        lambda s, f: repo.schedule_retry(s, f.received_id, NOW),
        PRIMARY_KEY + r"|ix_inbound_ledger_status_id",
    ),
    "pending_ids (worker)": (
        lambda s, f: repo.pending_ids(s, 100),
        "ix_inbound_ledger_status_",
    ),
    "due_for_retry (worker)": (
        lambda s, f: repo.due_for_retry(s, NOW, 10),
        "ix_inbound_ledger_status_next_attempt_at",
    ),
    "add_attempt": (
        lambda s, f: repo.add_attempt(
            s,
            f.received_id,
            "ticket",
            stage=None,
            error=None,
            host="h",
            pid=1,
            username=None,
            command="c",
        ),
        None,
    ),
}


def lookup_problems(engine: Engine, sessions: sessionmaker[Session], filled: Filled) -> list:
    problems = []
    for name, (lookup, index) in LOOKUPS.items():
        with captured(engine) as statements, sessions() as session:
            lookup(session, filled)
            session.flush()
            session.rollback()
        assert statements, f"{name} sent nothing"
        for sql, lines, bad in explained(engine, statements):
            plan = "\n    ".join(lines)
            if bad:
                problems.append(f"{name} reads a whole table or index: {sql}\n    {plan}")
            elif index and not re.search(index, plan):
                problems.append(f"{name} does not use {index}: {sql}\n    {plan}")
    return problems


def test_every_per_message_lookup_uses_a_fitting_index(engine, sessions):
    filled = fill(engine)
    problems = []
    if engine.dialect.name == "sqlite":
        problems += [f"without statistics: {p}" for p in lookup_problems(engine, sessions, filled)]
    analyze(engine)
    problems += lookup_problems(engine, sessions, filled)
    assert not problems, "\n".join(problems)


def test_receiving_and_processing_mails_scans_nothing(
    engine, sessions, settings: Settings, tmp_path: Path
):
    """Every statement of the real path (receive, then process) for a new mail with an
    attachment, a reply by References, a reply by ticket key in the subject, a re-delivery, a
    least-open assignment and a failure."""
    filled = fill(engine)
    analyze(engine)
    rules = rules_from(tmp_path, RULES)
    pipeline = PipelineContext(settings, sessions, RulesRouter(lambda: rules))
    new = simple_mail(
        subject="見積のお願い",
        attachments=[("見積依頼.pdf", "application/pdf", b"%PDF-1.4 " * 300)],
    )
    mails = [
        new,
        new,  # delivered twice: a duplicate
        simple_mail(
            subject="Re: 問い合わせ",
            headers={
                "In-Reply-To": filled.message_ids[-1],
                "References": " ".join(filled.message_ids[-6:]),
            },
        ),
        simple_mail(subject=f"Re: [{filled.ticket_keys[5]}] 納期について"),
        simple_mail(subject="ご相談"),
        b"\r\n\r\n",  # not a mail: fails at parse
    ]
    with captured(engine) as statements:
        fates = [process(pipeline, receive(sessions, raw, FILE)) for raw in mails]
        with sessions() as session:
            repo.pending_ids(session, 100)
            repo.due_for_retry(session, NOW, 10)
    assert fates == [
        Fate.TICKET,
        Fate.DUPLICATE,
        Fate.COMMENT,
        Fate.COMMENT,
        Fate.TICKET,
        Fate.FAILED,
    ]
    problems = full_scans(engine, statements)
    assert not problems, "full scans on the per-message path:\n" + "\n".join(problems)
