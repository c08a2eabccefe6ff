"""The states a message goes through: the values of public columns (`inbound_messages.status`,
`source`, `fail_stage`). Kept apart from the tables so that the command line (its option
choices) and the pipeline can name them without importing SQLAlchemy."""

from __future__ import annotations

import enum


class Fate(enum.StrEnum):
    """What became of an inbound message (the ledger's `status`); `received`: nothing yet."""

    RECEIVED = "received"
    TICKET = "ticket"
    COMMENT = "comment"
    DUPLICATE = "duplicate"
    DROPPED = "dropped"
    FAILED = "failed"
    DISCARDED = "discarded"  # a failure an admin chose not to replay; row and raw bytes stay


PROCESSABLE = (Fate.RECEIVED, Fate.FAILED)  # what processing may (still) work on
WITH_RECORD = (Fate.TICKET, Fate.COMMENT)  # the fates that wrote a ticket or a comment
SETTLED = (*WITH_RECORD, Fate.DROPPED)  # a later delivery of such a message is a duplicate
FINAL = (*SETTLED, Fate.DUPLICATE)  # done for good: what retention may drop raw bytes of


class Source(enum.StrEnum):
    """How a message reached us (the ledger's `source`)."""

    SMTP = "smtp"
    LMTP = "lmtp"
    IMAP = "imap"
    FILE = "file"
    STDIN = "stdin"


class Stage(enum.StrEnum):
    """Where a message is on its way, and so where a failure happened (`fail_stage`).

    In pipeline order; `pipeline.process.STAGES` runs PARSE to STORE. FETCH is the IMAP fetch
    before the ledger has the bytes; INTERRUPTED marks a message whose processing kept dying.
    """

    FETCH = "fetch"
    PARSE = "parse"
    DETECT = "detect"
    EXTRACT = "extract"
    DEDUPE = "dedupe"
    FOLLOW_UP = "follow_up"
    SUGGEST = "suggest"
    ROUTE = "route"
    DECIDE = "decide"
    CLAIM = "claim"
    ASSIGN = "assign"
    STORE = "store"
    INTERRUPTED = "interrupted"
