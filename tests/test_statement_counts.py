"""How many statements, commits and rollbacks processing one plain new-ticket mail costs, on
SQLite and PostgreSQL: pinned, so a change that adds a round trip or a commit shows up here
(docs/performance.md, "Statements per message"). Counts, never time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, event

from ingest.intake import receive, receive_batch
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process, process_in_order, process_waiting
from storage.states import Fate
from tests.mails import simple_mail

FILE = Envelope(source="file")


@contextmanager
def counting(engine: Engine) -> Iterator[Counter[str]]:
    """Statements by their first word (SELECT, INSERT, UPDATE), and `commit`, `rollback`."""
    counts: Counter[str] = Counter()

    def statement(_conn, _cursor, sql: str, *_args) -> None:
        counts[sql.split(None, 1)[0].upper()] += 1

    def commit(_conn) -> None:
        counts["commit"] += 1

    def rollback(_conn) -> None:
        counts["rollback"] += 1

    hooks: list[tuple[str, Callable[..., None]]] = [
        ("before_cursor_execute", statement),
        ("commit", commit),
        ("rollback", rollback),
    ]
    for name, hook in hooks:
        event.listen(engine, name, hook)
    try:
        yield counts
    finally:
        for name, hook in hooks:
            event.remove(engine, name, hook)


def expected(engine: Engine, messages: int, commits: int) -> Counter[str]:
    """Per new ticket: read the row, lease it, claim it, look for an earlier delivery and a
    triage model, insert the ticket and set its key, write the fate and the attempt; on
    PostgreSQL also NOTIFY the ticket."""
    selects = 4 if engine.dialect.name == "postgresql" else 3
    return Counter(
        {"SELECT": selects * messages, "UPDATE": 4 * messages, "INSERT": 2 * messages}
    ) + Counter({"commit": commits})


def test_one_new_ticket_costs_pinned_statements_and_two_commits(pipeline, engine):
    inbound_id = receive(pipeline.sessions, simple_mail(), FILE)
    with counting(engine) as counts:
        assert process(pipeline, inbound_id) == Fate.TICKET
    assert counts == expected(engine, 1, commits=2), "the lease, then the outcome; no rollback"


def test_in_order_each_next_lease_rides_on_the_previous_outcome(pipeline: PipelineContext, engine):
    ids = receive_batch(pipeline.sessions, [(simple_mail(), FILE) for _ in range(3)])
    with counting(engine) as counts:
        assert list(process_in_order(pipeline, ids)) == [Fate.TICKET] * 3
    assert counts == expected(engine, 3, commits=1 + 3), (
        "one commit per message, plus the first lease"
    )


def test_worker_loop_claims_each_next_message_with_the_previous_outcome(pipeline, engine):
    receive_batch(pipeline.sessions, [(simple_mail(), FILE) for _ in range(3)])
    with counting(engine) as counts:
        done = [fate for _, fate in process_waiting(pipeline, lambda: True)]
    assert done == [Fate.TICKET] * 3
    # Each claim looks at the free rows first (4 looks: 3 found one, the last none), and the
    # last also at the rows held on this host; the lease is taken from what the look read.
    looks = Counter({"SELECT": 4 + 1})
    assert counts == expected(engine, 3, commits=1 + 3) + looks
