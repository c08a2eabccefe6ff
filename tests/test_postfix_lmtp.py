"""A real MTA in front: a private Postfix relays to `mailintake serve` over LMTP, keeps what
mailintake answers `4xx` queued while the database is unavailable, and delivers it after
recovery; none bounced (issue #12, docs/deploy.md "Behind Postfix")."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.db_faults import counts, ledger_locked, wait_for_tickets
from tests.mails import simple_mail
from tests.postfix_mta import Postfix, unavailable_reason
from tests.servers import serve_with, wait_for

pytestmark = pytest.mark.slow

DOMAIN = "wine-importer.example.jp"
RECIPIENT = f"inquiry@{DOMAIN}"
LMTP_LISTENING = re.compile(r"listening for LMTP on 127\.0\.0\.1:(\d+)")


@pytest.fixture
def lmtp_serve(tmp_path: Path, serve_processes, db_url: str) -> Iterator[int]:
    """`mailintake serve` with LMTP on a free port, a locked ledger answered 451 at once."""
    child, _smtp_port = serve_with(
        tmp_path,
        serve_processes,
        db_url,
        lmtp__enabled="true",
        lmtp__port="0",
        database__lock_timeout_ms="300",
        database__busy_timeout_ms="300",
    )
    yield int(child.wait_for_line(LMTP_LISTENING).group(1))


@pytest.fixture
def postfix(request: pytest.FixtureRequest) -> Iterator[Postfix]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    mta = Postfix(request.getfixturevalue("lmtp_serve"), DOMAIN)
    try:
        mta.start()
        yield mta
    finally:
        mta.remove()


def deferred_for_451(mta: Postfix) -> bool:
    queued = mta.queue()
    return len(queued) == 1 and queued[0]["queue_name"] == "deferred"


# SQLite only: how each backend answers 451 when locked is tests/hostile/test_db_timeouts.py's.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_postfix_queues_while_mailintake_answers_451_and_delivers_after(postfix, db_url):
    sender = "customer@example.com"
    postfix.send(simple_mail(message_id="<first@example.com>"), sender, RECIPIENT)
    wait_for_tickets(db_url, 1)
    wait_for(lambda: not postfix.queue(), "postfix's queue to empty")

    with ledger_locked(db_url):
        postfix.send(simple_mail(message_id="<while-locked@example.com>"), sender, RECIPIENT)
        wait_for(lambda: deferred_for_451(postfix), "the message to be deferred")
        (queued,) = postfix.queue()
    assert counts(db_url) == (1, 1)

    postfix.flush()
    wait_for_tickets(db_url, 2)
    wait_for(lambda: not postfix.queue(), "postfix's queue to empty after the flush")
    reason = queued["recipients"][0]["delay_reason"]
    assert "451 4.3.0" in reason, reason
    assert postfix.delivery_statuses() == ["sent", "deferred", "sent"], postfix.log()
    assert counts(db_url) == (2, 2)
