"""Detection: auto-replies, bounces and loops; quoted text in replies; follow-ups to tickets.

`auto_reply_reason` and `strip_quoted` are pure and run before the database transaction;
`find_follow_up` needs the database.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection

import re2
from sqlalchemy.orm import Session

from config import compile_regex
from ingest.mail import IncomingMail, ParsedMail
from storage import repo

AUTO_REPLY_PRECEDENCE = {"bulk", "junk", "list", "auto_reply"}
# Senders that only ever send delivery reports.
BOUNCE_SENDER = compile_regex(r"(?i)^(mailer-daemon|postmaster|mail-daemon|mailer)@")
# Subjects of delivery reports (also when forwarded: "Fwd: Returned mail: ...").
BOUNCE_SUBJECT = compile_regex(
    r"(?i)(returned mail|undeliver|undelivered mail|delivery status notification|"
    r"delivery (has )?failed|mail delivery failed|failure notice|non[- ]delivery|"
    r"delivery notification|mail system error|メールエラー|配信不能|配信エラー|配送エラー|"
    r"送信エラー|宛先不明)"
)
# Text found in (quoted) delivery reports; with a bounce subject it confirms a bounce.
BOUNCE_TEXT = compile_regex(
    r"(?i)(mailer-daemon|mail delivery subsystem|final-recipient|diagnostic-code|"
    r"could not be delivered|permanent fatal errors|undeliverable|delivery.*failed)",
)
# Subjects of out-of-office and other automatic replies, Japanese mailers' and Outlook's:
# "【不在通知】Re: ...", "[自動返信] ...", "自動応答: ...", "Automatic reply: ...". Only as a
# marker at the start, so a customer's "休暇中の配送について" stays a customer's mail.
AUTO_REPLY_WORDS = (
    r"不在(?:通知|のお知らせ|連絡)?|自動(?:返信|応答)(?:メール)?|休暇(?:中|のお知らせ)?|"
    r"out of (?:the )?office|automatic reply|auto[- ]?reply|autoreply"
)
AUTO_REPLY_SUBJECT = compile_regex(
    r"(?i)^\s*(?:[【\[［(（]\s*(?:" + AUTO_REPLY_WORDS + r")\s*[】\]］)）]"
    r"|(?:" + AUTO_REPLY_WORDS + r")\s*[:：])"
)
AUTOMATED_SENDER = compile_regex(r"(?i)^(no-?reply|do-?not-?reply)@")
REPORT_TYPES = ("multipart/report", "message/delivery-status", "message/disposition-notification")
# Japanese mailing-list servers (fml, mailman-jp) mark their mails with these.
LIST_HEADERS = ("List-Id", "X-ML-Name", "X-MLServer", "X-Mailing-List")
# Exchange stamps its own automatic mails (out-of-office, read receipts) with these values.
SUPPRESS_VALUES = compile_regex(r"(?i)\b(all|oof|autoreply)\b")

# A line that starts the quoted original in full: everything below it is the earlier message.
ORIGINAL_SEPARATOR = compile_regex(
    r"(?i)^\s*-{2,}\s*(original message|元のメッセージ|オリジナルメッセージ|forwarded message|"
    r"転送されたメッセージ)\s*-{2,}\s*$",
)
# A line introducing a quoted block: "2026年11月22日(日) 10:23 山田 <yamada@example.jp>:",
# "On Sun, Nov 22, 2026 at 10:23 AM Yamada <...> wrote:", "山田 さんは書きました:".
ATTRIBUTION_HINT = compile_regex(
    r"(?i)(\d{4}\s*[年/.-]\s*\d{1,2}\s*[月/.-]\s*\d{1,2}|\bwrote\b|書きました|"
    r"\bschrieb\b|<[^<>\s]+@[^<>\s]+>|\d{1,2}:\d{2})",
)
QUOTED_LINE = compile_regex(r"^\s*(>|＞)")
BLANK_RUNS = compile_regex(r"\n\s*\n(\s*\n)+")


def auto_reply_reason(parsed: ParsedMail, envelope_sender: str | None) -> str | None:
    """Why this mail was sent by a machine (auto-reply, bounce, list, loop), or None."""
    return (
        _auto_reply_header(parsed)
        or _bounce(parsed)
        or _list_or_null_sender(parsed, envelope_sender)
    )


def loop_reason(mail: IncomingMail, own_senders: Collection[str]) -> str | None:
    """Why this mail is one of our own notifications coming back (a loop), or None.

    A mail that a source template recognised comes from a gateway, never from us, even when
    the gateway sends from our domain."""
    assert mail.parsed is not None
    if mail.source_kind != "email":
        return None
    for sender in (mail.parsed.from_email, (mail.envelope.mail_from or "").lower()):
        if sender and sender in own_senders:
            return f"loop: sent by our own address {sender}"
    return None


def _auto_reply_header(parsed: ParsedMail) -> str | None:
    auto_submitted = (parsed.header("Auto-Submitted") or "").strip()
    if auto_submitted and auto_submitted.lower() != "no":
        return f"Auto-Submitted: {auto_submitted}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Loop"):
        if parsed.header(name) is not None:
            return f"{name} header"
    if AUTO_REPLY_SUBJECT.search(parsed.subject):
        return f"auto-reply subject {parsed.subject[:80]!r}"
    precedence = (parsed.header("Precedence") or "").strip().lower()
    if precedence in AUTO_REPLY_PRECEDENCE:
        return f"Precedence: {precedence}"
    suppress = parsed.header("X-Auto-Response-Suppress") or ""
    if SUPPRESS_VALUES.search(suppress):
        return f"X-Auto-Response-Suppress: {suppress}"
    return None


def _bounce(parsed: ParsedMail) -> str | None:
    content_type = (parsed.header("Content-Type") or "").lower()
    report = next((t for t in REPORT_TYPES if content_type.startswith(t)), None)
    if report:
        return f"bounce: {report}"
    if parsed.header("X-Failed-Recipients") is not None:
        return "bounce: X-Failed-Recipients header"
    sender = parsed.from_email or ""
    if BOUNCE_SENDER.match(sender):
        return f"bounce: sent by {sender}"
    if BOUNCE_SUBJECT.search(parsed.subject):
        encloses_mail = any(
            a.content_type in ("message/rfc822", "text/rfc822-headers") for a in parsed.attachments
        )
        if encloses_mail or AUTOMATED_SENDER.match(sender) or BOUNCE_TEXT.search(parsed.text):
            return f"bounce: subject {parsed.subject!r}"
    return None


def _list_or_null_sender(parsed: ParsedMail, envelope_sender: str | None) -> str | None:
    if (parsed.header("Return-Path") or "").strip() == "<>" or envelope_sender in ("", "<>"):
        return "null sender (Return-Path <>)"
    listed = next((name for name in LIST_HEADERS if parsed.header(name) is not None), None)
    return f"mailing list ({listed})" if listed else None


def _attribution_start(lines: list[str], quote_start: int) -> int:
    """Index of the attribution line above a quoted block (a mailer may wrap it over two
    lines), or `quote_start` when there is none."""
    above = quote_start
    while above > 0 and not lines[above - 1].strip():
        above -= 1
    if above == 0 or quoted_line(lines[above - 1]):
        return quote_start
    last = lines[above - 1].strip()
    if not last.endswith((":", "：")):
        return quote_start
    if ATTRIBUTION_HINT.search(last):
        return above - 1
    if above >= 2 and ATTRIBUTION_HINT.search(lines[above - 2] + last):
        return above - 2
    return quote_start


def quoted_line(line: str) -> bool:
    """Whether `line` is quoted (`>`, `＞`): QUOTED_LINE, asked only of lines with a mark."""
    return (">" in line or "＞" in line) and QUOTED_LINE.match(line) is not None


def strip_quoted(text: str) -> str:
    """`text` without the quoted earlier message: everything from an "Original Message"
    separator on, and every `>` block with its attribution line. Returns the full text if
    nothing would remain."""
    lines = text.splitlines()
    # `--` first: the separator has it, and most lines do not (a pattern call costs more).
    separators = (
        i for i, line in enumerate(lines) if "--" in line and ORIGINAL_SEPARATOR.match(line)
    )
    cut = next(separators, len(lines))
    lines = lines[:cut]
    dropped: set[int] = set()
    for i, line in enumerate(lines):
        if not quoted_line(line):
            continue
        if i == 0 or not quoted_line(lines[i - 1]):
            dropped.update(range(_attribution_start(lines, i), i))
        dropped.add(i)
    kept = "\n".join(line for i, line in enumerate(lines) if i not in dropped)
    result = BLANK_RUNS.sub("\n\n", kept).strip()
    return result or text


def detect(mail: IncomingMail) -> None:
    """Set the auto-reply/bounce reason and the reply text without the quoted original."""
    assert mail.parsed is not None
    mail.auto_reply = auto_reply_reason(mail.parsed, mail.envelope.mail_from)
    mail.parsed.reply_text = strip_quoted(mail.parsed.text)


@functools.cache  # one prefix per service: compiled once, not per message
def ticket_key_pattern(prefix: str) -> re2._Regexp:
    return compile_regex(rf"\[({re.escape(prefix)}-\d+)\]")


def find_follow_up(mail: IncomingMail, session: Session, key_prefix: str) -> int | None:
    """The ticket this mail answers: by In-Reply-To/References, else by `[INQ-42]` in subject."""
    parsed = mail.parsed
    assert parsed is not None
    ticket_id = repo.ticket_for_message_ids(session, parsed.in_reply_to + parsed.references)
    if ticket_id is not None:
        return ticket_id
    found = ticket_key_pattern(key_prefix).search(parsed.subject)
    ticket = repo.ticket_by_key(session, found.group(1)) if found else None
    return ticket.id if ticket else None
