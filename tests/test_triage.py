"""The triage assistant: training on a generated history, suggestions on new tickets (never
overriding the rules unless a rule asks), the `suggested` and `no_rule_matched` conditions,
the one-line summary, and no network use."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bench.triage_corpus import PastTicket, generate, load_history
from config import Settings
from ingest.extract import load_templates
from ingest.intake import receive
from ingest.mail import Envelope, Suggestion
from pipeline.context import PipelineContext
from pipeline.dryrun import rules_alone
from pipeline.process import process
from rules.engine import RulesRouter, evaluate
from rules.load import load_rules
from storage import db, repo
from storage.models import Ticket, TicketSuggestion, TriageModel
from storage.states import Fate
from tests.mails import simple_mail
from tests.rulesets import OUR_MTA, incoming, rules_from, shipped_rules, write_rules
from triage.evaluate import evaluate as evaluate_model
from triage.features import document
from triage.model import Classifier, load
from triage.store import MODELS, suggest, train
from triage.summary import MAX_CHARS, summarize

ROOT = Path(__file__).resolve().parents[1]
END = datetime(2026, 11, 30, tzinfo=UTC)
# No keyword the shipped rules know: the rules make it an `inquiry` for sales, the history
# teaches the model that such mail is a complaint for sato.
CORKED = "届いたシャブリ 2022のコルクが沈んでいました。ワインが劣化して酸っぱくなっていました。"


@pytest.fixture(scope="module")
def history() -> list[PastTicket]:
    return generate(400, seed=11, end=END, authserv_id=OUR_MTA)


def pipeline_with_rules(settings: Settings, sessions: sessionmaker[Session]) -> PipelineContext:
    rules = shipped_rules()
    templates = load_templates(ROOT / "templates.yaml")
    return PipelineContext(settings, sessions, RulesRouter(lambda: rules), templates=templates)


@pytest.fixture
def routed(settings: Settings, sessions: sessionmaker[Session]) -> PipelineContext:
    return pipeline_with_rules(settings, sessions)


def ticket_of(sessions: sessionmaker[Session], raw: bytes, ctx: PipelineContext) -> Ticket:
    inbound_id = receive(sessions, raw, Envelope(source="file"))
    assert process(ctx, inbound_id) == Fate.TICKET
    with sessions() as session:
        ticket = session.scalars(select(Ticket).where(Ticket.inbound_message_id == inbound_id))
        return ticket.one()


def test_trained_model_beats_both_baselines_on_the_newer_tickets(routed, sessions, history):
    load_history(routed, history)
    with sessions() as session:
        tickets = repo.labelled_tickets(session)
    rules = shipped_rules()
    decide = rules_alone(routed.settings, sessions, rules)
    report = evaluate_model(tickets, lambda t: decide(t.inbound_message_id), holdout=0.2)
    assert (report.trained_on, report.tested_on) == (320, 80)
    for target in ("category", "assignee"):
        found = report.targets[target]
        assert found.rules is not None
        assert found.model.accuracy > found.most_common.accuracy, target
        assert found.model.accuracy > found.rules.accuracy, target
        assert found.model.macro_f1 > max(found.most_common.macro_f1, found.rules.macro_f1)
        assert sum(map(sum, found.confusion)) == 80


def test_training_stores_versions_that_every_process_loads_alike(routed, sessions, history):
    load_history(routed, history[:200])
    with sessions.begin() as session:
        first = train(session, None)
        second = train(session, history[100].received_at)
    assert (first.version, second.version) == (1, 2)
    assert (first.trained_on, second.trained_on) == (200, 100)
    assert set(first.categories) <= {"inquiry", "callback", "order", "quote", "web-inquiry"} | {
        "complaint"
    }
    with sessions() as session:
        row = session.get_one(TriageModel, 2)
        assert load(row.model, row.sha256).category is not None  # what another node would load
        with pytest.raises(ValueError, match="sha256"):
            load(row.model + b"x", row.sha256)
        assert MODELS.newest(session) is not None
        assert MODELS.newest(session)[0] == 2  # type: ignore[index]


def test_a_ticket_made_with_a_model_carries_a_suggestion_the_rules_did_not_take(
    routed, sessions, history
):
    before = ticket_of(sessions, simple_mail("届いた商品について", CORKED), routed)
    by_rules = (before.category, before.priority, before.rule_names)
    with sessions.begin() as session:  # people correct it, as they did the history
        corrected = session.get_one(Ticket, before.id)
        corrected.category, corrected.assignee = "complaint", "sato"
    load_history(routed, history)
    with sessions.begin() as session:
        train(session, None)
    after = ticket_of(sessions, simple_mail("届いた商品について", CORKED), routed)

    # The rules' decision is what it was without a model.
    assert (after.category, after.priority, after.rule_names) == by_rules
    assert after.category == "inquiry"
    with sessions() as session:
        assert repo.suggestion_of(session, before.id) is None
        suggested = repo.suggestion_of(session, after.id)
        assert suggested is not None
        assert (suggested.category, suggested.assignee) == ("complaint", "sato")
        assert suggested.model_version == 1
        assert 0.5 < suggested.category_probability <= 1.0
        assert 1 <= len(suggested.reason) <= 3
        assert all(gram in (CORKED + "届いた商品について").casefold() for gram in suggested.reason)
    assert after.summary == "届いたシャブリ 2022のコルクが沈んでいました。"


def test_a_follow_up_gets_no_suggestion(routed, sessions, history):
    load_history(routed, history[:200])
    with sessions.begin() as session:
        train(session, None)
    ticket = ticket_of(sessions, simple_mail("在庫", "在庫はありますか。"), routed)
    reply = simple_mail(f"Re: [{ticket.key}] 在庫", "ありがとうございます。")
    inbound_id = receive(sessions, reply, Envelope(source="file"))
    assert process(routed, inbound_id) == Fate.COMMENT
    with sessions() as session:
        assert session.scalars(select(TicketSuggestion)).all() != []
        assert len(session.scalars(select(TicketSuggestion)).all()) == 1


def suggestion(category: str, probability: float, assignee: str = "sato") -> Suggestion:
    return Suggestion(category, probability, assignee, 0.9, 1, ("破損",))


FALLBACK_RULES = """\
people: [yamada, sato]
teams: {sales: {members: [yamada, sato]}}
categories: [inquiry, callback, order, complaint]
rules:
  - name: phone
    when: {source_kind: phone}
    then: {category: callback, assignee: yamada}
  - name: likely-complaint
    when: {suggested: {category: complaint, min_probability: 0.8}}
    then: {category: complaint, priority: high, labels: [complaint]}
  - name: take-the-suggestion
    when: {no_rule_matched: true, suggested: {min_probability: 0.6}}
    then: {from_suggestion: [category, assignee]}
defaults: {category: inquiry, assignee: sales}
"""


@pytest.mark.parametrize(
    ("kind", "suggested", "category", "assignee", "hits"),
    [
        ("email", suggestion("complaint", 0.93), "complaint", None, ["likely-complaint"]),
        ("email", suggestion("complaint", 0.7), "complaint", "sato", ["take-the-suggestion"]),
        ("email", suggestion("order", 0.65), "order", "sato", ["take-the-suggestion"]),
        ("email", suggestion("order", 0.5), "inquiry", "sales", []),  # not sure enough
        ("email", None, "inquiry", "sales", []),  # no model: nothing changes
        ("phone", suggestion("complaint", 0.7), "callback", "yamada", ["phone"]),
    ],
)
def test_rules_take_the_suggestion_only_where_they_ask(
    tmp_path, kind, suggested, category, assignee, hits
):
    rules = load_rules(write_rules(tmp_path, FALLBACK_RULES, with_people=False))
    mail = incoming(simple_mail(), source_kind=kind)
    mail.suggestion = suggested
    plan = evaluate(rules, mail).plan
    assert plan.category == category
    assert (plan.assignee.name if plan.assignee else None) == (assignee or "sales")
    assert plan.rule_hits == hits


def test_explanations_name_the_suggestion_and_the_rule_that_decided(tmp_path):
    rules = load_rules(write_rules(tmp_path, FALLBACK_RULES, with_people=False))
    mail = incoming(simple_mail(), source_kind="phone")
    mail.suggestion = suggestion("order", 0.55)
    outcomes = {o.rule: o for o in evaluate(rules, mail, explain=True).outcomes}
    assert outcomes["likely-complaint"].reason == (
        "suggested category `order` (0.55), assignee `sato` (0.90); wanted: suggested "
        "category `complaint` with probability >= 0.8"
    )
    assert outcomes["take-the-suggestion"].reason == (
        "rule `phone` decided first; wanted: no rule matched"
    )
    mail.suggestion = None
    outcomes = {o.rule: o for o in evaluate(rules, incoming(simple_mail()), explain=True).outcomes}
    assert outcomes["likely-complaint"].reason is not None
    assert outcomes["likely-complaint"].reason.startswith("no suggestion (no triage model")


def test_the_rules_file_refuses_a_misspelt_suggestion_target(tmp_path):
    from rules.load import RulesError

    with pytest.raises(RulesError, match="from_suggestion"):
        rules_from(
            tmp_path,
            "rules:\n  - {name: a, when: {always: true}, then: {from_suggestion: [categry]}}\n",
        )


@pytest.mark.parametrize(
    ("text", "fields", "expected"),
    [
        (
            "株式会社サクラ酒販\nご担当者様\n\nいつもお世話になっております。\nサクラ酒販の田中です。\n\n"
            "先月注文したボルドーの請求書が届いておりません。ご確認ください。\n\n--\n田中",
            {},
            "先月注文したボルドーの請求書が届いておりません。",
        ),
        (
            "お世話になります。在庫の件、承知しました。\n\n2026/11/20 wine <a@b.jp>:\n"
            "> お問い合わせありがとうございます。\n> 在庫はございます。",
            {},
            "在庫の件、承知しました。",
        ),
        (
            "> quoted only first\n\nDear Sales team,\n\nHello.\nWe need 12 cases of Chablis by "
            "Friday. Can you do it?\n\nBest regards,\nJohn",
            {},
            "We need 12 cases of Chablis by Friday.",
        ),
        (
            "電話代行サービスより着信のご連絡です。\n■ご用件：\nシャブリの納期確認",
            {"topic": "シャブリ2022を12本、年内に納品可能か確認したいとのことです。\n見積書も"},
            "シャブリ2022を12本、年内に納品可能か確認したいとのことです。",
        ),
        (  # the README's answering-service sample: a request, not a self-introduction
            "",
            {"topic": "①ボルドー赤の在庫確認 ②見積書の送付をご希望です。"},
            "①ボルドー赤の在庫確認 ②見積書の送付をご希望です。",
        ),
        ("いつもお世話になっております。\n\nよろしくお願いいたします。", {}, "件名だけ"),
        ("Ｄｅａｒ　Ｍｒ．Ｓａｔｏ，\n" + "あ" * 200, {}, "あ" * (MAX_CHARS - 1) + "…"),
    ],
)
def test_summary_is_the_first_meaningful_sentence(text, fields, expected):
    assert summarize("件名だけ", text, fields) == expected
    assert len(summarize("件名だけ", text, fields)) <= MAX_CHARS


def test_refuses_the_network_when_asked(no_network):
    with pytest.raises(OSError, match="no network"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    assert no_network  # the guard can fail


def test_train_and_suggest_without_the_network(no_network, tmp_path, history):
    url = f"sqlite:///{tmp_path / 'offline.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    ctx = pipeline_with_rules(Settings(database={"url": url}), sessions)
    load_history(ctx, history[:200])
    with sessions.begin() as session:
        train(session, None)
    mail = incoming(simple_mail("届いた商品について", CORKED))
    with sessions() as session:
        assert suggest(mail, session) is not None
    ticket_of(sessions, simple_mail("届いた商品について", CORKED), ctx)
    engine.dispose()
    assert no_network == []


def test_one_mail_vectors_are_the_vectorizers(history):
    documents = [document(h.raw.decode()[:400], "", h.source_kind, {}) for h in history[:120]]
    model = Classifier().fit(documents, [h.category for h in history[:120]], [None] * 120)
    direct = model.vectors(documents[:20]).toarray()
    assert abs(direct - model.vectorizer.transform(documents[:20]).toarray()).max() < 1e-6
    assert model.assignee is None


def test_the_pipeline_imports_scikit_learn_only_for_a_model():
    from tests.test_help import imported_modules

    modules = imported_modules("import pipeline.process, pipeline.dryrun, sources.workers")
    assert "triage.store" in modules
    assert not {m for m in modules if m.split(".")[0] in ("sklearn", "scipy", "numpy")}
