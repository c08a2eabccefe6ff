"""Tickets: the newest, and one with its fields, requester, body, comments and attachments
(what `mailintake tickets show` prints)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from storage import repo
from views.records import attachment_view, ticket_view
from web.auth import User
from web.site import Site, refusal

LISTED = 100


def newest(site: Site, status: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    with site.sessions() as session:
        tickets = [ticket_view(t) for t in repo.list_tickets(session, LISTED, status)]
        statuses = sorted(repo.ticket_statuses(session))
    return tickets, statuses


async def tickets(site: Site, request: Request, user: User) -> Response:
    status = request.query_params.get("status") or None
    rows, statuses = await run_in_threadpool(newest, site, status)
    return site.render(
        request, user, "tickets.html", rows=rows, statuses=statuses, status=status or ""
    )


def details(site: Site, key: str) -> dict[str, Any] | None:
    with site.sessions() as session:
        ticket = repo.ticket_by_key(session, key)
        if ticket is None:
            return None
        return ticket_view(ticket) | {
            "body": ticket.body,
            "comments": [
                {
                    "author_name": c.author_name,
                    "author_email": c.author_email,
                    "created_at": c.created_at,
                    "body": c.body,
                    "inbound_message_id": c.inbound_message_id,
                }
                for c in ticket.comments
            ],
            "attachments": [
                attachment_view(a) for a in repo.attachments_of_ticket(session, ticket.id)
            ],
        }


async def ticket(site: Site, request: Request, user: User) -> Response:
    key = request.path_params["key"]
    view = await run_in_threadpool(details, site, key)
    if view is None:
        return refusal(site, request, user, 404, f"No ticket {key}.")
    return site.render(request, user, "ticket.html", t=view)
