"""The ledger: messages with time, source, sender, subject, fate and ticket, filtered by fate,
source, time range and text; one message with its envelope, headers, decoded body,
attachments, fate, rule hits and misses and its attempts; raw export and attachment download."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ingest.headers import decoded_headers, first_header
from pipeline.process import incoming_mail
from pipeline.replay import parse_since
from pipeline.stages import examine
from storage import repo
from storage.models import InboundMessage, Ticket
from storage.states import Fate, Source
from views.mail import parsed_view
from views.records import attachment_view, history_of, message_view, short_error
from web.auth import User
from web.site import Site, refusal, searchable

PAGE_SIZE = 50
HEADER_BYTES = 16 * 1024  # enough of a message for its From and Subject
SCAN_BATCH = 500
SCAN_LIMIT = 5000  # a text search reads at most this many messages per page
# Served as themselves; anything else (HTML, SVG, scripts) downloads as bytes.
SAFE_TYPES = {"application/pdf", "image/png", "image/jpeg", "image/gif", "text/plain"}


@dataclass(frozen=True)
class LedgerQuery:
    """The ledger page's filters, as read from its URL."""

    wanted: repo.LedgerFilter
    text: str
    before: int | None

    @classmethod
    def read(cls, site: Site, request: Request) -> LedgerQuery:
        """Raises ValueError naming a bad field."""
        params = request.query_params
        zone = site.settings.zone

        def moment(name: str) -> datetime | None:
            value = params.get(name, "").strip()
            try:
                return parse_since(value, zone) if value else None
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

        status = params.get("fate") or None
        source = params.get("source") or None
        if status not in (None, *Fate) or source not in (None, *Source):
            raise ValueError("unknown fate or source")
        before = params.get("before", "")
        wanted = repo.LedgerFilter(status, source, moment("since"), moment("until"))
        return cls(
            wanted, params.get("text", "").strip(), int(before) if before.isdigit() else None
        )


def row_of(message: InboundMessage, head: bytes, ticket_key: str | None) -> dict[str, Any]:
    headers = decoded_headers(head)
    return {
        "id": message.id,
        "received_at": message.received_at,
        "source": message.source,
        "from": first_header(headers, "From") or message.mail_from or "",
        "subject": first_header(headers, "Subject") or "",
        "status": message.status,
        "ticket": ticket_key,
        "reason": message.drop_reason or message.discard_reason or short_error(message.error),
    }


def matches(row: dict[str, Any], wanted: str) -> bool:
    """Whether `wanted` (already `searchable`) is in the subject, sender or ticket key."""
    fields = (row["subject"], row["from"], row["ticket"] or "")
    return any(wanted in searchable(value) for value in fields)


def find(site: Site, query: LedgerQuery) -> tuple[list[dict[str, Any]], int | None]:
    """One page of rows and the id to continue below (None at the end). Subjects are encoded
    in the raw headers (RFC 2047), so a text search decodes and compares here, reading at most
    SCAN_LIMIT messages per page."""
    rows: list[dict[str, Any]] = []
    before, scanned = query.before, 0
    batch = SCAN_BATCH if query.text else PAGE_SIZE
    wanted = searchable(query.text)
    with site.sessions() as session:
        while len(rows) < PAGE_SIZE and scanned < SCAN_LIMIT:
            found = repo.ledger_with_head(session, query.wanted, batch, HEADER_BYTES, before)
            for message, head, key in found:
                before, scanned = message.id, scanned + 1
                row = row_of(message, head, key)
                if not query.text or matches(row, wanted):
                    rows.append(row)
                if len(rows) == PAGE_SIZE:
                    return rows, before
            if len(found) < batch:
                return rows, None
    return rows, before


async def ledger(site: Site, request: Request, user: User) -> Response:
    try:
        query = LedgerQuery.read(site, request)
    except ValueError as exc:
        return refusal(site, request, user, 400, str(exc))
    rows, more = await run_in_threadpool(find, site, query)
    params = {k: v for k, v in request.query_params.items() if k != "before"}
    older = None
    if more is not None:
        older = "/ledger?" + "&".join(
            f"{k}={quote(v)}" for k, v in {**params, "before": str(more)}.items()
        )
    cut_short = bool(query.text) and more is not None and len(rows) < PAGE_SIZE
    return site.render(
        request,
        user,
        "ledger.html",
        cut_short=cut_short,
        scan_limit=SCAN_LIMIT,
        rows=rows,
        params=params,
        older=older,
        fates=[str(f) for f in Fate],
        sources=[str(s) for s in Source],
    )


def message_details(site: Site, inbound_id: int) -> dict[str, Any] | None:
    with site.sessions() as session:
        message = session.get(InboundMessage, inbound_id)
        if message is None:
            return None
        view = message_view(message) | {
            "envelope": message.envelope,
            "headers": decoded_headers(message.raw),
            "history": history_of(session, inbound_id),
            "attachments": [
                attachment_view(a) for a in repo.attachments_of_message(session, inbound_id)
            ],
            "ticket": session.get_one(Ticket, message.ticket_id).key if message.ticket_id else None,
        }
        mail = incoming_mail(message)
    try:
        examine(mail, site.pipeline())  # parse, detect, extract: no database
        view["parsed"], view["parse_error"] = parsed_view(mail), None
    except Exception as exc:  # shown as what it is: the message cannot be read
        view["parsed"], view["parse_error"] = None, f"{type(exc).__name__}: {exc}"
    return view


async def message(site: Site, request: Request, user: User) -> Response:
    inbound_id = request.path_params["inbound_id"]
    view = await run_in_threadpool(message_details, site, inbound_id)
    if view is None:
        return refusal(site, request, user, 404, f"No message {inbound_id} in the ledger.")
    return site.render(request, user, "message.html", m=view, failed=view["status"] == Fate.FAILED)


def raw_bytes(site: Site, inbound_id: int) -> bytes | None:
    with site.sessions() as session:
        message = session.get(InboundMessage, inbound_id)
        return message.raw if message is not None else None


async def export_raw(site: Site, request: Request, user: User) -> Response:
    """The exact stored bytes, as `failed export` writes them."""
    inbound_id = request.path_params["inbound_id"]
    raw = await run_in_threadpool(raw_bytes, site, inbound_id)
    if raw is None:
        return refusal(site, request, user, 404, f"No message {inbound_id} in the ledger.")
    disposition = f'attachment; filename="message-{inbound_id}.eml"'
    return Response(raw, media_type="message/rfc822", headers={"Content-Disposition": disposition})


def attachment_bytes(site: Site, attachment_id: int) -> tuple[str, str, bytes] | None:
    with site.sessions() as session:
        found = repo.attachment_content(session, attachment_id)
    if found is None:
        return None
    attachment, content = found
    return attachment.filename, attachment.content_type, content


async def attachment(site: Site, request: Request, user: User) -> Response:
    attachment_id = request.path_params["attachment_id"]
    found = await run_in_threadpool(attachment_bytes, site, attachment_id)
    if found is None:
        return refusal(site, request, user, 404, f"No attachment {attachment_id}.")
    filename, content_type, content = found
    media = content_type if content_type in SAFE_TYPES else "application/octet-stream"
    disposition = f"attachment; filename*=UTF-8''{quote(filename)}"
    return Response(content, media_type=media, headers={"Content-Disposition": disposition})
