"""Several processes (and nodes) on one store: claiming waiting messages, IMAP folder leases,
round-robin turns and ticket keys under concurrency, and NOTIFY on new tickets (PostgreSQL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.leases import FolderLease, claim_next, lease_abandoned, lease_owner
from pipeline.process import PipelineContext, process, process_next
from sources.imap import Hooks, LeaseLost, folder_fetchers
from storage import db, repo
from storage.models import ImapLease, InboundMessage, Ticket, utcnow
from storage.states import Fate
from tests.conftest import _truncate_all, own_pg_database, pg_database_url
from tests.mails import simple_mail
from tests.waiting import WAIT_SECONDS, wait_for

FILE = Envelope(source="file")
T = TypeVar("T")


def in_another_thread(work: Callable[[], T]) -> T:
    """`work()` as another thread (another lease owner) runs it, which then ends."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


def leave_lease(sessions: sessionmaker[Session], inbound_id: int, owner: str, until: datetime):
    with sessions.begin() as session:
        row = session.get_one(InboundMessage, inbound_id)
        row.lease_owner, row.lease_until = owner, until


def lease_row(sessions: sessionmaker[Session], inbound_id: int) -> tuple[str | None, int, int]:
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        return row.lease_owner, row.attempts, row.interruptions


# --- who holds a lease ---------------------------------------------------------------------------


def test_a_lease_owner_names_host_pid_thread_and_instance():
    host, pid, thread, instance = lease_owner().split(":")
    assert (host, int(pid), int(thread)) == (
        socket.gethostname()[:200],
        os.getpid(),
        threading.get_ident(),
    )
    boot, started = instance.split(".")
    assert boot and started.isdigit()  # Linux: the boot id and the process's start time


def test_a_reused_pid_or_an_earlier_boot_does_not_keep_a_lease_alive():
    later = utcnow() + timedelta(minutes=5)
    host, _pid, _thread, instance = lease_owner().split(":")
    # pid 1 is alive, but it is not the process that took this lease
    assert lease_abandoned(f"{host}:1:1:{instance}", later, utcnow())
    boot, started = instance.split(".")
    assert lease_abandoned(f"{host}:1:1:{'0' * len(boot)}.{started}", later, utcnow())
    # another host's lease: only its end tells
    assert not lease_abandoned(f"elsewhere:1:1:{instance}", later, utcnow())
    assert lease_abandoned(f"elsewhere:1:1:{instance}", utcnow(), utcnow())


def test_a_holder_that_exited_unreaped_does_not_keep_a_lease_alive():
    """A zombie (exited, its parent has not waited for it yet) still answers kill(pid, 0)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.leases import lease_owner; print(lease_owner())"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    owner = child.stdout.readline().strip()
    state = Path(f"/proc/{child.pid}/stat")
    wait_for(lambda: state.read_text().rsplit(")", 1)[1].split()[0] == "Z", "a zombie")
    try:
        assert lease_abandoned(owner, utcnow() + timedelta(minutes=5), utcnow())
    finally:
        child.stdout.close()
        child.wait()


# --- claiming waiting messages -------------------------------------------------------------------


def test_claim_skips_a_live_lease_of_another_host_and_takes_an_expired_one(sessions):
    held, expired, free = (receive(sessions, simple_mail(f"m{n}"), FILE) for n in range(3))
    leave_lease(sessions, held, "elsewhere:7:7:x.1", utcnow() + timedelta(minutes=5))
    leave_lease(sessions, expired, "elsewhere:8:8:x.1", utcnow() - timedelta(seconds=1))
    me = "elsewhere:9:9:x.1"  # as another node claims
    assert claim_next(sessions, me) == (expired, 1)  # one interrupted attempt: its holder's
    assert claim_next(sessions, me) == (free, 0)
    assert claim_next(sessions, me) is None
    assert lease_row(sessions, held)[0] == "elsewhere:7:7:x.1"
    assert lease_row(sessions, expired) == (me, 1, 1)


def test_claim_takes_over_a_lease_whose_holder_on_this_host_died(sessions):
    inbound_id = receive(sessions, simple_mail(), FILE)
    dead = in_another_thread(lease_owner)  # that thread has ended
    leave_lease(sessions, inbound_id, dead, utcnow() + timedelta(minutes=5))
    assert claim_next(sessions, lease_owner()) == (inbound_id, 1)


def test_process_next_makes_tickets_oldest_first_then_finds_nothing(pipeline):
    ids = [receive(pipeline.sessions, simple_mail(f"m{n}"), FILE) for n in range(3)]
    done = [process_next(pipeline) for _ in ids]
    assert done == [(i, Fate.TICKET) for i in ids]
    assert process_next(pipeline) is None
    assert lease_row(pipeline.sessions, ids[0]) == (None, 1, 0)


@pytest.mark.postgres
def test_on_postgresql_concurrent_claims_skip_rows_another_claim_has_locked(pg_schema_url):
    engine = db.make_engine(pg_schema_url)
    _truncate_all(engine)
    sessions = db.make_session_factory(engine)
    try:
        first, second = (receive(sessions, simple_mail(f"m{n}"), FILE) for n in range(2))
        with sessions.begin() as holding:  # a claim in progress on another node
            locked = repo.lease_candidates(holding, utcnow(), 1)
            assert [row_id for row_id, _ in locked] == [first]
            assert in_another_thread(lambda: claim_next(sessions, lease_owner())) == (second, 0)
    finally:
        engine.dispose()


def test_many_claimers_take_every_message_once(pipeline):
    ids = {receive(pipeline.sessions, simple_mail(f"m{n}"), FILE) for n in range(30)}
    taken: list[int] = []

    def claim_all() -> None:
        while (done := process_next(pipeline)) is not None:
            taken.append(done[0])

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(ids)  # each once, none left
    with pipeline.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Ticket)) == 30


# --- IMAP folder leases ------------------------------------------------------------------------


def test_one_folder_lease_holder_at_a_time_and_takeover_after_failover(sessions):
    release, taken = threading.Event(), threading.Event()
    holder = FolderLease(sessions, "inquiry", "INBOX", failover_after=60)

    def hold() -> None:
        assert holder.acquire()
        taken.set()
        release.wait()

    thread = threading.Thread(target=hold)
    thread.start()  # alive while it holds the lease (a live thread of this host)
    try:
        assert taken.wait(WAIT_SECONDS)
        standby = FolderLease(sessions, "inquiry", "INBOX", failover_after=60)
        assert not standby.acquire()
        with sessions.begin() as session:  # the holder stops renewing; its lease runs out
            row = session.get_one(ImapLease, ("inquiry", "INBOX"))
            row.until = utcnow() - timedelta(seconds=1)
        assert standby.acquire()
        assert not holder.renew()  # the old holder learns it lost the folder
        with sessions.begin() as session:
            assert not repo.holds_imap_lease(session, "inquiry", "INBOX", holder.owner)
            assert repo.holds_imap_lease(session, "inquiry", "INBOX", standby.owner)
        standby.release()
        with sessions() as session:
            assert session.get_one(ImapLease, ("inquiry", "INBOX")).owner is None
    finally:
        release.set()
        thread.join()


def test_a_folder_lease_left_by_a_dead_thread_of_this_host_is_taken_at_once(sessions):
    def take() -> str:
        lease = FolderLease(sessions, "inquiry", "INBOX", failover_after=60)
        assert lease.acquire()
        return lease.owner

    dead = in_another_thread(take)
    lease = FolderLease(sessions, "inquiry", "INBOX", failover_after=60)
    assert lease.acquire() and lease.owner != dead


def test_a_held_lease_is_renewed_until_stop(sessions):
    lease = FolderLease(sessions, "inquiry", "INBOX", failover_after=0.3)
    assert lease.acquire()
    stop = threading.Event()
    lost = lease.hold(stop)
    with sessions() as session:
        first = session.get_one(ImapLease, ("inquiry", "INBOX")).until
    assert first is not None

    def renewed() -> bool:
        with sessions() as session:
            until = session.get_one(ImapLease, ("inquiry", "INBOX")).until
            return until is not None and until > first

    wait_for(renewed, "a renewal")
    assert not lost.is_set()
    stop.set()
    wait_for(lost.is_set, "the end of the tenure")


# --- round-robin turns and ticket keys with several writers --------------------------------------


def test_round_robin_turns_are_never_given_twice_by_concurrent_writers(sessions):
    def take_turns() -> list[int]:
        turns = []
        for _ in range(10):
            with sessions.begin() as session:
                turns.append(repo.advance_assignment_cursor(session, "sales"))
        return turns

    with ThreadPoolExecutor(6) as pool:
        turns = [t for result in pool.map(lambda _: take_turns(), range(6)) for t in result]
    assert sorted(turns) == list(range(1, 61))


def test_ticket_keys_are_unique_with_concurrent_writers(pipeline):
    ids = [receive(pipeline.sessions, simple_mail(f"m{n}"), FILE) for n in range(24)]
    with ThreadPoolExecutor(4) as pool:
        fates = list(pool.map(lambda i: process(pipeline, i), ids))
    assert fates == [Fate.TICKET] * 24
    with pipeline.sessions() as session:
        rows = session.execute(select(Ticket.id, Ticket.key)).all()
    assert sorted(key for _, key in rows) == sorted(f"INQ-{tid}" for tid, _ in rows)
    assert len({key for _, key in rows}) == 24


# --- NOTIFY mailintake_tickets (PostgreSQL) ---------------------------------------------------


@pytest.fixture
def own_database() -> Iterator[str]:
    """A database of its own: notifications are per database, and other tests (other xdist
    workers, in other schemas) make tickets meanwhile."""
    with own_pg_database("mi_notify") as name:
        yield pg_database_url(name)


@pytest.mark.postgres
def test_a_listener_hears_every_new_ticket_and_comment_key(own_database):
    engine = db.make_engine(own_database)
    sessions = db.make_session_factory(engine)
    pipeline = PipelineContext(Settings(database={"url": own_database}), sessions)
    url = make_url(own_database).set(drivername="postgresql")
    try:
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute("LISTEN mailintake_tickets")
            ids = [receive(sessions, simple_mail(f"m{n}"), FILE) for n in range(5)]
            fates = [process(pipeline, i) for i in ids]
            reply = receive(sessions, simple_mail("Re: [INQ-2] m1"), FILE)
            fates.append(process(pipeline, reply))
            assert fates == [Fate.TICKET] * 5 + [Fate.COMMENT]
            heard = [n.payload for n in conn.notifies(timeout=WAIT_SECONDS, stop_after=6)]
        with sessions() as session:
            keys = list(session.scalars(select(Ticket.key).order_by(Ticket.id)))
        assert keys == [f"INQ-{n}" for n in range(1, 6)]
        assert heard == [*keys, "INQ-2"]  # each ticket, then the comment's ticket
    finally:
        engine.dispose()


def test_fetch_once_refuses_a_folder_another_node_is_fetching(db_url, sessions):
    account = {"name": "inquiry", "host": "192.0.2.1", "username": "u", "password": "p"}
    settings = Settings(database={"url": db_url}, imap={"accounts": [account]})
    with sessions.begin() as session:
        until = utcnow() + timedelta(minutes=1)
        session.add(
            ImapLease(account="inquiry", folder="INBOX", owner="elsewhere:1:1:x.1", until=until)
        )
    (fetcher,) = folder_fetchers(settings, sessions, Hooks(lambda _id: None))
    with pytest.raises(LeaseLost, match="another node is fetching this folder"):
        fetcher.fetch_once()  # before connecting: 192.0.2.1 is never reached
