"""Actions through the real pipeline and database: assignee strategies (the round-robin cursor
shared by separate processes on PostgreSQL), drop, allow_auto_reply, and what a ticket records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from rules.assign import pick_assignee
from rules.engine import CompiledRules, RulesRouter, evaluate
from storage import db
from storage.models import AssignmentCursor, InboundMessage, Ticket
from storage.states import Fate
from tests.conftest import _truncate_all
from tests.mails import simple_mail
from tests.rulesets import incoming, rules_from, write_rules
from tests.waiting import WAIT_SECONDS

ROOT = Path(__file__).resolve().parents[1]

RULES = """
rules:
  - name: spam
    when: {subject: {contains: [未承諾広告]}}
    then: {drop: unsolicited advertising}
  - name: out-of-office
    when: {auto_reply: true, subject: {contains: 受注}}
    then: {allow_auto_reply: true, category: order, assignee: sato}
  - name: fixed-team
    when: {subject: {contains: 見積}}
    then: {assignee: {team: sales, strategy: fixed}, category: quote}
  - name: least-open
    when: {subject: {contains: 相談}}
    then: {assignee: {team: sales, strategy: least_open}}
  - name: everyone-else
    when: {always: true}
    then:
      assignee: sales
      priority: high
      due_in: 4h
      labels: [inbox]
      fields: {channel: mail}
"""


def pipeline_for(settings: Settings, sessions: sessionmaker[Session], rules: CompiledRules):
    return PipelineContext(settings, sessions, RulesRouter(lambda: rules))


def deliver(pipeline: PipelineContext, **mail) -> tuple[Fate | None, Ticket | None]:
    inbound_id = receive(pipeline.sessions, simple_mail(**mail), Envelope(source="file"))
    fate = process(pipeline, inbound_id)
    with pipeline.sessions() as session:
        ticket = session.scalars(select(Ticket).where(Ticket.inbound_message_id == inbound_id))
        return fate, ticket.first()


@pytest.fixture
def routed(tmp_path, settings, sessions) -> PipelineContext:
    return pipeline_for(settings, sessions, rules_from(tmp_path, RULES))


def test_round_robin_takes_turns_and_the_ticket_records_the_decision(routed):
    assignees = [deliver(routed, subject=f"問い合わせ {i}")[1].assignee for i in range(4)]
    assert assignees == ["yamada", "sato", "suzuki", "yamada"]
    _fate, ticket = deliver(routed, subject="問い合わせ 5")
    rules = routed.router.current()  # type: ignore[attr-defined]
    assert ticket.rule_names == ["everyone-else"]
    assert ticket.rules_version == rules.version
    assert (ticket.priority, ticket.labels, ticket.fields["channel"]) == ("high", ["inbox"], "mail")
    assert ticket.due_at is not None


def test_dropped_mail_and_follow_up_do_not_take_a_turn(routed):
    assert deliver(routed, subject="1")[1].assignee == "yamada"
    fate, _ = deliver(routed, subject="未承諾広告 ワイン特売")
    assert fate == Fate.DROPPED
    fate, _ = deliver(routed, subject="Re: [INQ-1] 追加")
    assert fate == Fate.COMMENT
    assert deliver(routed, subject="2")[1].assignee == "sato"
    with routed.sessions() as session:
        reason = session.scalars(
            select(InboundMessage.drop_reason).where(InboundMessage.id == 2)
        ).one()
    assert reason == "unsolicited advertising"


def test_allow_auto_reply_lets_a_rule_open_a_ticket(routed):
    fate, ticket = deliver(routed, subject="受注確認", headers={"Auto-Submitted": "auto-generated"})
    assert fate == Fate.TICKET and ticket.assignee == "sato"
    fate, _ = deliver(routed, subject="不在通知", headers={"Auto-Submitted": "auto-replied"})
    assert fate == Fate.DROPPED


def test_fixed_strategy_assigns_the_team_itself(routed):
    assert deliver(routed, subject="見積依頼")[1].assignee == "sales"


def test_least_open_picks_the_member_with_fewest_open_tickets(routed):
    first = [deliver(routed, subject=f"ご相談 {i}")[1] for i in range(3)]
    assert [t.assignee for t in first] == ["yamada", "sato", "suzuki"]  # ties: team order
    with routed.sessions.begin() as session:
        session.execute(update(Ticket).where(Ticket.id == first[1].id).values(status="closed"))
    assert deliver(routed, subject="ご相談 4")[1].assignee == "sato"


def test_dry_run_reads_the_cursor_without_moving_it(tmp_path, sessions):
    rules = rules_from(tmp_path, RULES)
    sales = evaluate(rules, incoming(simple_mail())).plan.assignee
    assert sales is not None
    with sessions.begin() as session:
        assert pick_assignee(sales, rules.source, session, advance=True) == "yamada"
    with sessions.begin() as session:
        peeked = [pick_assignee(sales, rules.source, session, advance=False) for _ in range(3)]
    assert peeked == ["sato", "sato", "sato"]
    with sessions() as session:
        assert session.get_one(AssignmentCursor, "sales").position == 1


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from config import Settings
    from ingest.intake import receive
    from ingest.mail import Envelope
    from pipeline.process import PipelineContext, process
    from rules.engine import RulesRouter
    from rules.load import load_rules
    from storage import db
    from storage.models import Ticket

    url, rules_path, count, tag = sys.argv[1:]
    settings = Settings(database={"url": url})
    engine = db.make_engine(url)
    sessions = db.make_session_factory(engine)
    rules = load_rules(Path(rules_path))
    pipeline = PipelineContext(settings, sessions, RulesRouter(lambda: rules))
    raws = [f"Subject: {tag} {i}\\nMessage-ID: <{tag}-{i}@example.com>\\n\\nbody\\n".encode()
            for i in range(int(count))]
    print("ready", flush=True)
    sys.stdin.readline()  # the go: both processes are ready, both start now
    ids = [receive(sessions, raw, Envelope(source="file")) for raw in raws]
    fates = [process(pipeline, i) for i in ids]
    with sessions() as session:
        names = [session.query(Ticket).filter_by(inbound_message_id=i).one().assignee for i in ids]
    print(json.dumps({"fates": fates, "assignees": names}))
    engine.dispose()
    """
)


@pytest.mark.slow
@pytest.mark.postgres
def test_round_robin_is_shared_by_two_processes_on_postgresql(tmp_path, pg_schema_url):
    engine = db.make_engine(pg_schema_url)
    _truncate_all(engine)
    rules_path = write_rules(
        tmp_path, "rules:\n  - {name: all, when: {always: true}, then: {assignee: sales}}\n"
    )
    per_process = 30
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", WORKER, pg_schema_url, str(rules_path), str(per_process)]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    children = [subprocess.Popen([*argv, tag], cwd=ROOT, env=env, **pipes) for tag in "ab"]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    results = []
    for child in children:  # both processes deliver and route at the same moment
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        stdout, _ = child.communicate(timeout=WAIT_SECONDS)
        assert child.returncode == 0
        results.append(json.loads(stdout))
    assert all(fate == "ticket" for r in results for fate in r["fates"])
    assignees = [name for r in results for name in r["assignees"]]
    assert {name: assignees.count(name) for name in set(assignees)} == {
        "yamada": 20,
        "sato": 20,
        "suzuki": 20,
    }  # 60 turns, none taken twice or lost
    with engine.connect() as conn:
        position = conn.scalar(
            select(AssignmentCursor.position).where(AssignmentCursor.team == "sales")
        )
    engine.dispose()
    assert position == 2 * per_process
