"""What every stage may use: settings, the session factory, the router and the templates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session, sessionmaker

from config import Settings, TicketSettings
from ingest.extract import Template, load_templates
from ingest.mail import Decision, IncomingMail
from ingest.verify import Resolver, system_resolver

# Routing reads the mail and the rules, nothing else: it writes nothing and takes no turn.
Router = Callable[[IncomingMail], Decision]


def no_rules(_mail: IncomingMail) -> Decision:
    """The router when no rules file is configured: every ticket gets the `tickets:` defaults."""
    return Decision()


def with_ticket_defaults(decision: Decision, tickets: TicketSettings) -> Decision:
    """`decision` with what no rule set taken from the `tickets:` settings: the one place the
    defaults apply, whatever routed the mail."""
    return replace(
        decision,
        category=decision.category or tickets.default_category,
        assignee=decision.assignee or tickets.default_assignee,
        priority=decision.priority or tickets.default_priority,
    )


@dataclass
class PipelineContext:
    """Shared by all stages and threads; nothing per message lives here. Tests build their own."""

    settings: Settings
    sessions: sessionmaker[Session]
    router: Router = no_rules
    templates: list[Template] | None = None  # None: read settings.templates.path on first use
    # When set (serve, its workers, the CLI): the templates in force, which a reload swaps whole;
    # taken once per message, like the rules.
    template_source: Callable[[], list[Template]] | None = None
    resolver: Resolver | None = None  # DNS of config `verify`; None: the host's, on first use

    def verify_dns(self) -> Resolver:
        if self.resolver is None:
            self.resolver = system_resolver(self.settings.verify.dns_timeout_seconds)
        return self.resolver

    def source_templates(self) -> list[Template]:
        if self.template_source is not None:
            return self.template_source()
        if self.templates is None:
            chosen = self.settings.templates
            self.templates = load_templates(chosen.path, required=chosen.required)
        return self.templates
