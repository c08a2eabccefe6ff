"""The durable core: receive -> process, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from ingest.intake import receive
from ingest.mail import Decision, Envelope
from pipeline.process import PipelineContext, process, process_pending
from storage.models import AttachmentBlob, InboundMessage, ProcessingAttempt, Ticket, TicketComment
from storage.states import Fate
from tests.conftest import DATA
from tests.mails import UNFETCHED_REASON, add_unfetched_row, simple_mail

FILE = Envelope(source="file")


def ingest_one(pipeline: PipelineContext, raw: bytes) -> tuple[int, Fate | None]:
    inbound_id = receive(pipeline.sessions, raw, FILE)
    return inbound_id, process(pipeline, inbound_id)


def count(sessions: sessionmaker[Session], model: type) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_iso2022jp_answering_service_mail_reads_correctly(pipeline, sessions):
    raw = (DATA / "answering-service-iso2022jp.eml").read_bytes()
    inbound_id, fate = ingest_one(pipeline, raw)
    assert fate == Fate.TICKET
    with sessions() as session:
        subject, body, name, key = session.execute(
            text("SELECT subject, body, requester_name, key FROM tickets")
        ).one()
        stored_raw = session.execute(
            text("SELECT raw FROM inbound_messages WHERE id = :id"), {"id": inbound_id}
        ).scalar_one()
    assert subject == "【電話受付】①㈱髙島屋ワイン様よりお問い合わせ"
    assert "会社名：㈱髙島屋ワイン" in body
    assert "ｶﾀｶﾅ" in body
    assert name == "髙橋 一郎"  # the caller, from the answering-service template
    assert key == "INQ-1"
    assert bytes(stored_raw) == raw


def test_same_message_twice_is_a_duplicate_not_a_second_ticket(pipeline, sessions):
    raw = simple_mail(message_id="<dup-1@example.com>")
    first_id, first = ingest_one(pipeline, raw)
    second_id, second = ingest_one(pipeline, raw)
    assert (first, second) == (Fate.TICKET, Fate.DUPLICATE)
    assert count(sessions, Ticket) == 1
    with sessions() as session:
        dup = session.get_one(InboundMessage, second_id)
        assert dup.duplicate_of_id == first_id
        assert dup.ticket_id == session.get_one(InboundMessage, first_id).ticket_id


def test_message_without_message_id_deduplicates_by_content(pipeline, sessions):
    raw = simple_mail(message_id=None)
    fates = [ingest_one(pipeline, raw)[1] for _ in range(3)]
    assert fates == [Fate.TICKET, Fate.DUPLICATE, Fate.DUPLICATE]
    assert count(sessions, Ticket) == 1


def test_a_failing_stage_keeps_the_raw_bytes_and_replay_makes_one_ticket(settings, sessions):
    def broken_router(mail):
        raise RuntimeError("rule exploded")

    raw = simple_mail()
    broken = PipelineContext(settings, sessions, broken_router)
    inbound_id, fate = ingest_one(broken, raw)
    assert fate == Fate.FAILED
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.status, row.fail_stage, row.attempts) == ("failed", "route", 1)
        assert "rule exploded" in (row.error or "")
        assert row.raw == raw
    fixed = PipelineContext(settings, sessions)
    assert process(fixed, inbound_id) == Fate.TICKET
    assert process(fixed, inbound_id) is None
    assert count(sessions, Ticket) == 1
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.status, row.fail_stage, row.error, row.attempts) == ("ticket", None, None, 2)


def test_bytes_that_are_not_mail_fail_at_parse_with_raw_kept(pipeline, sessions):
    inbound_id, fate = ingest_one(pipeline, b"\r\n\r\n")
    assert fate == Fate.FAILED
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.fail_stage, row.raw) == ("parse", b"\r\n\r\n")


def test_over_size_message_fails_with_reason(settings, sessions):
    settings.intake.max_message_bytes = 1000
    pipeline = PipelineContext(settings, sessions)
    inbound_id, fate = ingest_one(pipeline, simple_mail(body="x" * 2000))
    assert fate == Fate.FAILED
    with sessions() as session:
        assert "over the limit of 1000" in (session.get_one(InboundMessage, inbound_id).error or "")


def test_rows_left_received_by_a_crash_are_processed_on_start(pipeline, sessions):
    ids = [receive(sessions, simple_mail(), FILE) for _ in range(3)]
    assert process_pending(pipeline) == 3
    with sessions() as session:
        statuses = session.scalars(select(InboundMessage.status).order_by(InboundMessage.id))
        assert list(statuses) == ["ticket"] * 3
    assert process_pending(pipeline) == 0
    assert count(sessions, Ticket) == len(ids)


def test_reply_with_in_reply_to_becomes_a_comment(pipeline, sessions):
    ingest_one(pipeline, simple_mail(message_id="<orig@example.com>"))
    reply = simple_mail(
        subject="Re: 在庫の問い合わせ",
        body="ありがとうございます。",
        headers={"In-Reply-To": "<orig@example.com>"},
    )
    _, fate = ingest_one(pipeline, reply)
    assert fate == Fate.COMMENT
    with sessions() as session:
        comment = session.scalars(select(TicketComment)).one()
        assert comment.body.strip() == "ありがとうございます。"
        assert comment.ticket.key == "INQ-1"


def test_reply_by_ticket_key_in_subject_becomes_a_comment(pipeline, sessions):
    ingest_one(pipeline, simple_mail())
    _, fate = ingest_one(pipeline, simple_mail(subject="Re: [INQ-1] 在庫の問い合わせ"))
    assert fate == Fate.COMMENT
    assert count(sessions, Ticket) == 1


def test_attachment_content_is_stored_once_per_sha256(pipeline, sessions):
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 100
    for _ in range(2):
        ingest_one(pipeline, simple_mail(attachments=[("見積書.pdf", "application/pdf", pdf)]))
    assert count(sessions, AttachmentBlob) == 1
    with sessions() as session:
        rows = session.execute(text("SELECT filename, content_type, size FROM attachments")).all()
    assert [tuple(r) for r in rows] == [("見積書.pdf", "application/pdf", len(pdf))] * 2


def test_a_message_never_fetched_is_not_processed_and_keeps_its_reason(pipeline, sessions):
    inbound_id = add_unfetched_row(sessions)
    assert process(pipeline, inbound_id) is None
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.status, row.fail_stage, row.attempts) == ("failed", "fetch", 0)
        assert row.error == UNFETCHED_REASON


def dead_owner() -> str:
    """A lease owner name for a process of this host that has exited."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return f"{socket.gethostname()[:200]}:{int(child.stdout)}:1"


def leave_lease(sessions, inbound_id: int, owner: str, interruptions: int = 0) -> None:
    """As a process that took the message and then died (or is still at work) leaves it."""
    with sessions.begin() as session:
        row = session.get_one(InboundMessage, inbound_id)
        row.lease_owner = owner
        row.lease_until = datetime.now(UTC) + timedelta(minutes=5)
        row.interruptions = interruptions


def test_a_message_that_keeps_killing_its_processor_is_failed_not_retried_forever(
    pipeline, sessions
):
    inbound_id = receive(sessions, simple_mail(), FILE)
    leave_lease(sessions, inbound_id, dead_owner(), interruptions=2)
    assert process(pipeline, inbound_id) == Fate.FAILED
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.fail_stage, row.interruptions, row.lease_owner) == ("interrupted", 0, None)
        assert "interrupted 3 times" in (row.error or "")
    assert process(pipeline, inbound_id) == Fate.TICKET  # a replay, once fixed


def test_a_lease_left_by_a_dead_process_is_taken_over_at_once(pipeline, sessions):
    inbound_id = receive(sessions, simple_mail(), FILE)
    leave_lease(sessions, inbound_id, dead_owner())
    assert process(pipeline, inbound_id) == Fate.TICKET
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.attempts, row.interruptions, row.lease_owner) == (1, 0, None)


def test_a_message_held_by_a_live_process_is_left_to_it_until_its_lease_ends(pipeline, sessions):
    inbound_id = receive(sessions, simple_mail(), FILE)
    live = f"{socket.gethostname()[:200]}:{os.getppid()}:1"
    leave_lease(sessions, inbound_id, live)
    assert process(pipeline, inbound_id) is None
    with sessions.begin() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.status, row.attempts) == ("received", 0)
        row.lease_until = datetime.now(UTC) - timedelta(seconds=1)
    assert process(pipeline, inbound_id) == Fate.TICKET


def test_processes_racing_on_one_message_count_one_attempt_and_no_failure(pipeline, sessions):
    inbound_id = receive(sessions, simple_mail(), FILE)
    start = threading.Barrier(6)

    def race() -> Fate | None:
        start.wait()
        return process(pipeline, inbound_id)

    with ThreadPoolExecutor(6) as pool:
        fates = list(pool.map(lambda _: race(), range(6)))
    assert fates.count(Fate.TICKET) == 1
    assert set(fates) <= {Fate.TICKET, None}
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert (row.status, row.attempts, row.interruptions) == ("ticket", 1, 0)
        outcomes = session.scalars(select(ProcessingAttempt.outcome)).all()
        assert outcomes == ["ticket"]


def test_a_duplicate_is_recognised_before_routing(settings, sessions):
    routed = []

    def counting_router(mail):
        routed.append(mail.inbound_id)
        return Decision()

    counting = PipelineContext(settings, sessions, counting_router)
    raw = simple_mail()
    first, _ = ingest_one(counting, raw)
    _, fate = ingest_one(counting, raw)
    assert fate == Fate.DUPLICATE
    assert routed == [first]


def test_overlong_message_id_and_names_are_stored_not_refused(pipeline, sessions):
    long_id = "<" + "a" * 1200 + "@example.com>"
    raw = simple_mail(message_id=long_id, sender=f'"{"名" * 400}" <long@example.com>')
    inbound_id, fate = ingest_one(pipeline, raw)
    assert fate == Fate.TICKET
    with sessions() as session:
        row = session.get_one(InboundMessage, inbound_id)
        assert row.message_id == long_id[:998]
        ticket = session.scalars(select(Ticket)).one()
        assert ticket.requester_name == "名" * 255
    assert ingest_one(pipeline, raw)[1] == Fate.DUPLICATE
