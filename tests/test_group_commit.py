"""Group commit (sources/commits.py): messages that wait together share one ledger commit, and
each waiting session gets its own row id only after that commit; a message the database
refuses costs only its own sender a `451`; a database that is down fails the group without
retrying it message by message. Real databases; a gate holds the first commit so that the
others are waiting when it returns (no timing)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from functools import partial

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ingest.intake import receive_batch
from ingest.mail import Envelope
from sources.commits import GroupCommitter
from storage import db
from storage.models import InboundMessage
from tests.mails import simple_mail

Item = tuple[bytes, Envelope]
SMTP = Envelope(source="smtp", mail_from="customer@example.com", rcpt_to=("inquiry@example.jp",))


class GatedCommit:
    """`receive_batch` that records each group and holds the first one until `release()`."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.groups: list[list[bytes]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, items: Sequence[Item]) -> list[int]:
        self.groups.append([raw for raw, _ in items])
        if len(self.groups) == 1:
            self.entered.set()
            self.gate.wait()
        return receive_batch(self.sessions, items)


async def commit_while_first_is_held(
    commit: Callable[[Sequence[Item]], list[int]],
    gated: GatedCommit,
    raws: list[bytes],
    envelopes: dict[int, Envelope] | None = None,
) -> list[int | BaseException]:
    """The first message's commit starts and is held; the others arrive; then it returns.
    Each message comes with the SMTP envelope unless `envelopes` gives another by position."""
    items = [(raw, (envelopes or {}).get(n, SMTP)) for n, raw in enumerate(raws)]
    committer: GroupCommitter[Item] = GroupCommitter(commit)
    first = asyncio.create_task(committer.run(items[0], len(raws[0])))
    await asyncio.to_thread(gated.entered.wait)
    rest = [asyncio.create_task(committer.run(item, len(item[0]))) for item in items[1:]]
    while committer.in_hand < len(raws):
        await asyncio.sleep(0)  # every session has handed its message in
    gated.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def stored(sessions: sessionmaker[Session]) -> dict[int, bytes]:
    with sessions() as session:
        return {row.id: row.raw for row in session.scalars(select(InboundMessage))}


def test_messages_waiting_together_share_one_commit_and_each_gets_its_row(sessions):
    raws = [simple_mail(subject=f"問い合わせ {n}") for n in range(4)]
    gated = GatedCommit(sessions)
    ids = asyncio.run(commit_while_first_is_held(gated, gated, raws))
    assert gated.groups == [raws[:1], raws[1:]]  # two commits for four messages
    assert all(isinstance(id_, int) for id_ in ids)
    assert stored(sessions) == dict(zip(ids, raws, strict=True))  # each its own row


def test_a_refused_message_fails_alone_and_its_group_is_stored(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'refusing.db'}")
    db.upgrade(engine)
    with engine.begin() as conn:  # the database itself refuses one message
        conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON inbound_ledger "
                "WHEN NEW.message_id = '<poison@example.com>' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        )
    sessions = db.make_session_factory(engine)
    raws = [simple_mail(subject=f"{n}") for n in range(2)]
    raws.insert(2, simple_mail(message_id="<poison@example.com>"))
    raws.append(simple_mail(subject="after"))
    gated = GatedCommit(sessions)
    outcomes = asyncio.run(commit_while_first_is_held(gated, gated, raws))
    assert isinstance(outcomes[2], IntegrityError)
    kept = [outcome for n, outcome in enumerate(outcomes) if n != 2]
    assert stored(sessions) == dict(zip(kept, raws[:2] + raws[3:], strict=True))
    # the group, then each of its messages alone
    assert gated.groups == [raws[:1], raws[1:], raws[1:2], raws[2:3], raws[3:4]]
    engine.dispose()


def test_close_ends_the_thread_and_refuses_more(sessions):
    committer: GroupCommitter[Item] = GroupCommitter(partial(receive_batch, sessions))
    raw = simple_mail()

    async def one_then_close() -> None:
        await committer.run((raw, SMTP), len(raw))
        committer.close()
        with pytest.raises(RuntimeError, match="closed"):
            await committer.run((raw, SMTP), len(raw))

    asyncio.run(one_then_close())
    assert committer._thread is not None
    committer._thread.join(timeout=60)
    assert not committer._thread.is_alive()
    assert list(stored(sessions).values()) == [raw]


def test_a_message_our_own_code_refuses_fails_alone(sessions):
    """Not a database error at all (a value that cannot be written as JSON): still only its
    own sender gets the failure."""
    raws = [simple_mail(subject=f"{n}") for n in range(3)]
    unwritable = Envelope(source="smtp", extra={"unwritable": object()})
    gated = GatedCommit(sessions)
    outcomes = asyncio.run(commit_while_first_is_held(gated, gated, raws, {1: unwritable}))
    assert isinstance(outcomes[1], Exception)
    assert "JSON serializable" in str(outcomes[1])
    assert stored(sessions) == {outcomes[0]: raws[0], outcomes[2]: raws[2]}


@pytest.mark.postgres
def test_a_database_that_is_down_fails_the_whole_group_once(sessions):
    down = db.make_session_factory(
        db.make_engine("postgresql+psycopg://nobody@127.0.0.1:1/test", connect_timeout_seconds=5)
    )
    gated = GatedCommit(sessions)
    calls: list[int] = []

    def commit(items: Sequence[Item]) -> list[int]:
        if not calls:
            calls.append(len(items))
            return gated(items)  # held, then stored
        calls.append(len(items))
        return receive_batch(down, items)

    raws = [simple_mail(subject=f"{n}") for n in range(4)]
    outcomes = asyncio.run(commit_while_first_is_held(commit, gated, raws))
    assert isinstance(outcomes[0], int)
    assert all(isinstance(outcome, OperationalError) for outcome in outcomes[1:])
    assert calls == [1, 3]  # not retried one by one: each sender retries later
