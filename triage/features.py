"""The text the model reads for a ticket or an incoming mail: one home, so that training (from
stored tickets) and suggesting (from a mail in the pipeline) see the same thing."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

from ingest.mail import IncomingMail

MAX_BODY_CHARS = 4000  # the start of a mail says what it is about; bounds the work per mail
MAX_FIELD_CHARS = 200
# Every digit reads as 0: dates, times and phone numbers say little about the inquiry, and the
# n-grams of their digits would crowd out the words.
ONE_DIGIT = str.maketrans("123456789", "000000000")


def normalise(text: str) -> str:
    """Fold width and case (ＦＡＸ = fax, ｶﾅ = カナ) and digits: the vectorizer's preprocessor."""
    return unicodedata.normalize("NFKC", text).casefold().translate(ONE_DIGIT)


def document(subject: str, body: str, source_kind: str, fields: Mapping[str, Any]) -> str:
    """Subject, the source kind, the template's text fields and the start of the body."""
    values = [
        f"{key} {value[:MAX_FIELD_CHARS]}"
        for key, value in fields.items()
        if isinstance(value, str) and value
    ]
    return "\n".join([subject, f"kind:{source_kind}", *values, body[:MAX_BODY_CHARS]])


def mail_document(mail: IncomingMail) -> str:
    """The document of a mail the pipeline has examined (parsed and extracted)."""
    assert mail.parsed is not None, "suggest for parsed mail only"
    return document(mail.parsed.subject, mail.parsed.text, mail.source_kind, mail.fields)
