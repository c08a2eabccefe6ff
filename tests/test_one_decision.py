"""The pipeline's one decision "ticket, comment, duplicate or drop": round-robin takes a turn
only for a certain new ticket, and every ledger row records the rules that hit and missed."""

from __future__ import annotations

import json

from sqlalchemy import select
from typer.testing import CliRunner

from cli import app
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.context import PipelineContext
from pipeline.process import process
from rules.engine import RulesRouter
from storage import repo
from storage.models import InboundMessage, Ticket
from storage.states import Fate, Stage
from tests.mails import simple_mail
from tests.rulesets import rules_from, write_rules

OWN_SENDER = "notify@tracker.wine-importer.example.jp"
RULES = """
rules:
  - name: spam
    when: {subject: {contains: [未承諾広告]}}
    then: {drop: unsolicited advertising}
  - name: everyone-else
    when: {always: true}
    then: {assignee: sales}
"""


def routed(tmp_path, settings, sessions) -> PipelineContext:
    settings.detect.own_senders = [OWN_SENDER]
    rules = rules_from(tmp_path, RULES)
    return PipelineContext(settings, sessions, RulesRouter(lambda: rules))


def deliver(pipeline: PipelineContext, raw: bytes) -> tuple[int, Fate | None]:
    inbound_id = receive(pipeline.sessions, raw, Envelope(source="file"))
    return inbound_id, process(pipeline, inbound_id)


def turns_taken(pipeline: PipelineContext) -> int:
    with pipeline.sessions() as session:
        return repo.peek_assignment_cursor(session, "sales")


def first_ticket_assignee(pipeline: PipelineContext) -> str | None:
    _id, fate = deliver(pipeline, simple_mail(subject="在庫の確認"))
    assert fate == Fate.TICKET
    with pipeline.sessions() as session:
        return session.scalars(select(Ticket.assignee).order_by(Ticket.id.desc())).first()


def test_a_dropped_loop_mail_takes_no_round_robin_turn(tmp_path, settings, sessions):
    pipeline = routed(tmp_path, settings, sessions)
    _id, fate = deliver(pipeline, simple_mail(sender=OWN_SENDER))
    assert fate == Fate.DROPPED
    assert turns_taken(pipeline) == 0
    assert first_ticket_assignee(pipeline) == "yamada"  # the first member: no turn was skipped


def test_a_duplicate_takes_no_round_robin_turn(tmp_path, settings, sessions):
    pipeline = routed(tmp_path, settings, sessions)
    raw = simple_mail()
    assert deliver(pipeline, raw)[1] == Fate.TICKET
    assert turns_taken(pipeline) == 1
    assert deliver(pipeline, raw)[1] == Fate.DUPLICATE
    assert turns_taken(pipeline) == 1


def test_a_follow_up_comment_takes_no_round_robin_turn(tmp_path, settings, sessions):
    pipeline = routed(tmp_path, settings, sessions)
    first = simple_mail(message_id="<first@example.com>")
    assert deliver(pipeline, first)[1] == Fate.TICKET
    answer = {"In-Reply-To": "<first@example.com>"}
    reply = simple_mail(subject="Re: 在庫の問い合わせ", headers=answer)
    assert deliver(pipeline, reply)[1] == Fate.COMMENT
    assert turns_taken(pipeline) == 1


def test_every_ledger_row_records_rule_hits_and_misses(tmp_path, settings, sessions):
    pipeline = routed(tmp_path, settings, sessions)
    dropped, fate = deliver(pipeline, simple_mail(subject="未承諾広告 ワイン"))
    assert fate == Fate.DROPPED
    ticket, _ = deliver(pipeline, simple_mail())
    with sessions() as session:
        rows = {r.id: r for r in session.scalars(select(InboundMessage))}
    assert (rows[dropped].rule_hits, rows[dropped].rule_misses) == (["spam"], [])
    assert rows[dropped].drop_reason == "unsolicited advertising"
    assert (rows[ticket].rule_hits, rows[ticket].rule_misses) == (["everyone-else"], ["spam"])


def test_messages_show_names_the_rule_that_dropped_a_mail(tmp_path, db_url):
    rules_path = write_rules(tmp_path, RULES)
    config = tmp_path / "config.yaml"
    config.write_text(f"database: {{url: '{db_url}'}}\nrules: {{path: '{rules_path}'}}\n")
    mail = tmp_path / "spam.eml"
    mail.write_bytes(simple_mail(subject="未承諾広告 ワイン"))
    run = CliRunner().invoke
    assert run(app, ["--config", str(config), "ingest", str(mail)]).exit_code == 0
    shown = run(app, ["--config", str(config), "messages", "show", "1", "--json"])
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert (view["status"], view["drop_reason"]) == ("dropped", "unsolicited advertising")
    assert view["rule_hits"] == ["spam"]
    human = run(app, ["--config", str(config), "messages", "show", "1"])
    assert "rule_hits: spam" in human.stdout


def test_the_stage_table_is_the_stage_enum_in_order():
    from pipeline.stages import STAGES

    assert tuple(s for s in Stage if s not in (Stage.FETCH, Stage.INTERRUPTED)) == STAGES


def test_a_redelivered_dropped_mail_is_a_duplicate(tmp_path, settings, sessions):
    pipeline = routed(tmp_path, settings, sessions)
    raw = simple_mail(headers={"Auto-Submitted": "auto-replied"})
    first, fate = deliver(pipeline, raw)
    assert fate == Fate.DROPPED
    again, fate = deliver(pipeline, raw)
    assert fate == Fate.DUPLICATE
    with sessions() as session:
        assert session.get_one(InboundMessage, again).duplicate_of_id == first
