"""What the pipeline read from a message and what the rules decided, as plain dicts."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ingest.mail import Decision, IncomingMail
from rules.engine import CompiledRules, Evaluation


def parsed_view(mail: IncomingMail) -> dict[str, Any]:
    """What the pipeline read from a message, before any rule or database."""
    parsed = mail.parsed
    assert parsed is not None
    return {
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "from": {"name": parsed.from_name, "email": parsed.from_email},
        "date": parsed.date,
        "headers": [[name, value] for name, value in parsed.headers],
        "source_kind": mail.source_kind,
        "auto_reply": mail.auto_reply,
        "fields": mail.fields,
        "text": parsed.text,
        "reply_text": parsed.reply_text if parsed.reply_text != parsed.text else None,
        "html": parsed.html,
        "attachments": [
            {
                "filename": a.filename,
                "original_filename": a.original_filename,
                "content_type": a.content_type,
                "size": len(a.content),
                "inline": a.inline,
                "content_id": a.content_id,
            }
            for a in parsed.attachments
        ],
        "defects": parsed.defects,
    }


def rules_summary(rules: CompiledRules) -> dict[str, Any]:
    source = rules.source
    return {
        "path": str(rules.path),
        "version": rules.version,
        "rules": [{"name": r.name, "line": r.line} for r in rules.rules],
        "people": list(source.people),
        "teams": {
            name: {"members": team.members, "strategy": team.strategy}
            for name, team in source.teams.items()
        },
        "categories": source.categories,
        "priorities": source.priorities,
        "warnings": rules.warnings,
    }


def explained(path: Path, mail: IncomingMail, evaluation: Evaluation) -> dict[str, Any]:
    parsed, decision = mail.parsed, mail.decision
    assert parsed is not None and decision is not None
    return {
        "file": str(path),
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "from": parsed.from_email,
        "source_kind": mail.source_kind,
        "fields": json.loads(json.dumps(mail.fields, default=str, ensure_ascii=False)),
        "auto_reply": mail.auto_reply,
        "follow_up_ticket_id": mail.follow_up_ticket_id,
        "fate": mail.fate,
        "drop_reason": mail.drop_reason,
        "rules": evaluation.to_dict()["rules"],
        "decision": decision_view(decision),
        "suggestion": asdict(mail.suggestion) if mail.suggestion else None,
    }


def decision_view(decision: Decision) -> dict[str, Any]:
    return {
        "category": decision.category,
        "assignee": decision.assignee,
        "priority": decision.priority,
        "due_at": decision.due_at.isoformat() if decision.due_at else None,
        "labels": decision.labels,
        "fields": {
            k: v if isinstance(v, str | int | float | bool) else str(v)
            for k, v in decision.fields.items()
        },
        "drop_reason": decision.drop_reason,
        "allow_auto_reply": decision.allow_auto_reply,
        "rule_hits": decision.rule_hits,
        "rule_misses": decision.rule_misses,
        "rules_version": decision.rules_version,
    }
