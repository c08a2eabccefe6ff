"""The next message's lease rides on the previous outcome's commit (pipeline.process.Chain):
still committed before the work on it starts, so a process that dies there leaves the message
to be taken over as an interrupted attempt, exactly as a lease committed alone did."""

from __future__ import annotations

from ingest.intake import receive_batch
from ingest.mail import Envelope
from pipeline.process import process, process_in_order
from storage.models import InboundMessage
from storage.states import Fate
from tests.mails import simple_mail

FILE = Envelope(source="file")


def test_a_lease_taken_with_the_previous_outcome_is_taken_over_when_left(pipeline, sessions):
    first, second = receive_batch(sessions, [(simple_mail(), FILE) for _ in range(2)])
    run = process_in_order(pipeline, [first, second])
    assert next(run) == Fate.TICKET
    run.close()  # as if the process died before it began the second message
    with sessions() as session:
        left = session.get(InboundMessage, second)
        assert left is not None
        assert (left.status, left.attempts) == (Fate.RECEIVED, 1)
        assert left.lease_owner is not None, "committed with the first message's outcome"
    assert process(pipeline, second) == Fate.TICKET
    with sessions() as session:
        done = session.get(InboundMessage, second)
        assert done is not None
        assert done.attempts == 2, "the left lease counted as an attempt, as before"


def test_after_a_failure_the_next_message_takes_its_own_lease_once(pipeline, sessions):
    too_big = simple_mail(body="x" * (pipeline.settings.intake.max_message_bytes + 1))
    first, second = receive_batch(sessions, [(too_big, FILE), (simple_mail(), FILE)])
    assert list(process_in_order(pipeline, [first, second])) == [Fate.FAILED, Fate.TICKET]
    with sessions() as session:
        done = session.get(InboundMessage, second)
        assert done is not None and done.attempts == 1
