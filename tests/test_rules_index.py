"""The rule index (rules/index.py): routing through it decides exactly as trying every rule in
turn does (hits, misses, every attribute), on generated rules and mails; and it does skip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.conditions import Facts
from rules.engine import CompiledRules, evaluate
from rules.schema import RulesFile
from tests.mails import simple_mail
from tests.rulesets import incoming

# Few values, chosen to collide under case and width folding, so that rules often match.
WORDS = ["至急", "ＦＡＸ", "fax", "Invoice", "見積", "re:", "a.b*", "ｶﾅ", "カナ", "X1-2", ""]
DOMAINS = ["example.com", "EXAMPLE.com", "shop.example.jp", "ｅｘａｍｐｌｅ.com"]
REGEXES = ["(?i)fax", r"X\d-\d", "^re:", "見積|至急", r"\d+", ".*", r"\.b\*$", "カナ"]
KINDS = ["phone", "fax", "webform", "email"]

words = st.sampled_from(WORDS)
word_lists = st.lists(words, max_size=3)


def text_tests(values: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """One TextTest as YAML would give it, sometimes with two operators that must both hold."""
    single = st.one_of(
        values.map(lambda v: {"equals": v}),
        st.lists(values, max_size=3).map(lambda vs: {"in": vs}),
        st.lists(values, max_size=3).map(lambda vs: {"contains": vs}),
        st.lists(values, max_size=3).map(lambda vs: {"starts_with": vs}),
        st.lists(values, max_size=3).map(lambda vs: {"ends_with": vs}),
        st.sampled_from(REGEXES).map(lambda r: {"regex": r}),
        st.booleans().map(lambda b: {"exists": b}),
    )
    return st.one_of(single, st.tuples(single, single).map(lambda p: {**p[1], **p[0]}))


addresses = st.sampled_from(["customer", "Desk", "fax"]).flatmap(
    lambda local: st.sampled_from(DOMAINS).map(lambda d: f"{local}@{d}")
)
LEAVES = st.one_of(
    st.just({"always": True}),
    text_tests(addresses).map(lambda t: {"from": {"address": t}}),
    text_tests(st.sampled_from(DOMAINS)).map(lambda t: {"from": {"domain": t}}),
    text_tests(st.sampled_from(DOMAINS)).map(lambda t: {"to": {"domain": t}}),
    text_tests(words).map(lambda t: {"subject": t}),
    text_tests(words).map(lambda t: {"body": t}),
    text_tests(words).map(lambda t: {"header": {"name": "X-Tag", **t}}),
    text_tests(words).map(lambda t: {"field": {"name": "order", **t}}),
    st.sampled_from(KINDS).map(lambda k: {"source_kind": k}),
    st.lists(st.sampled_from(KINDS), min_size=1).map(lambda ks: {"source_kind": {"in": ks}}),
    st.booleans().map(lambda b: {"attachment": b}),
    text_tests(words).map(lambda t: {"attachment": {"name": t}}),
    st.booleans().map(lambda b: {"follow_up": b}),
)
conditions = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"all": cs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"any": cs}),
        inner.map(lambda c: {"not": c}),
        st.tuples(inner, inner).map(lambda p: {**p[1], **p[0]}),  # keys of one mapping: and
    ),
    max_leaves=4,
)
rule_lists = st.lists(
    st.tuples(conditions, st.booleans(), st.sampled_from([None, "a", "b"])), max_size=8
)


def compiled(rules: list[tuple[dict[str, Any], bool, str | None]]) -> CompiledRules:
    source = RulesFile.model_validate(
        {
            "rules": [
                {
                    "name": f"r-{i}",
                    "when": when,
                    "then": {"labels": [f"l{i}"], "continue": go_on, "category": category},
                }
                for i, (when, go_on, category) in enumerate(rules)
            ]
        }
    )
    return CompiledRules.build(source, Path("rules.yaml"), "test", [None] * len(rules))


def make_mail(subject, body, sender, to, tag, attachment, kind, order, follow_up):
    return incoming(
        simple_mail(
            subject or "-",
            body or "-",
            sender=sender,
            to=to,
            message_id=None,
            headers={"X-Tag": tag} if tag is not None else {},
            attachments=[(attachment, "application/pdf", b"%PDF")] if attachment else [],
        ),
        source_kind=kind,
        fields={"order": order} if order is not None else {},
        follow_up_ticket_id=follow_up,
    )


# Plain values: the mail is built in the test (parsing is not for a strategy to do).
mail_values = st.fixed_dictionaries(
    {
        "subject": st.lists(words, max_size=3).map(" ".join),
        "body": st.lists(words, max_size=3).map("\n".join),
        "sender": addresses,
        "to": addresses,
        "tag": st.none() | words,
        "attachment": st.none() | words.map(lambda w: f"{w}.pdf"),
        "kind": st.sampled_from(KINDS),
        "order": st.none() | words,
        "follow_up": st.none() | st.just(7),
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_lists, values=mail_values)
def test_indexed_routing_decides_as_linear(rules, values) -> None:
    compiled_rules, mail = compiled(rules), make_mail(**values)
    indexed = evaluate(compiled_rules, mail)
    linear = evaluate(compiled_rules, mail, linear=True)
    assert indexed.plan == linear.plan


def test_index_tries_only_rules_the_mail_could_match() -> None:
    rules = compiled(
        [
            ({"from": {"domain": "shop.example.jp"}}, False, "a"),
            ({"body": {"regex": r"注文番号\s*X\d+"}}, False, "a"),
            ({"subject": {"contains": ["ＦＡＸ"]}}, False, "a"),
            ({"any": [{"source_kind": "fax"}, {"to": {"address": "fax@example.com"}}]}, False, "b"),
            ({"not": {"source_kind": "fax"}}, False, "b"),
        ]
    )
    mail = incoming(simple_mail("fax 送付", "注文番号 X12", sender="a@Shop.Example.JP"))
    facts = Facts(mail, rules.calendar, None)
    assert rules.index.candidates(facts) == [0, 1, 2, 4]
    other = incoming(simple_mail("在庫", "在庫", to="FAX@example.com"), source_kind="phone")
    assert rules.index.candidates(Facts(other, rules.calendar, None)) == [3, 4]
    plan = evaluate(rules, other).plan
    assert (plan.rule_hits, plan.rule_misses) == (["r-3"], ["r-0", "r-1", "r-2"])
