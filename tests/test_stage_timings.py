"""How long each stage took, stored with the fate (migration 0008): on success every stage in
order, on failure the stages up to the failing one (marked), shown by `messages show` and
`failed show`; rows from before the migration keep NULL."""

from __future__ import annotations

import json

from alembic import command
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from pipeline.stages import STAGES
from storage import db
from storage.models import InboundMessage
from storage.states import Fate, Stage
from tests import test_storage_growth
from tests.mails import simple_mail
from tests.test_storage_growth import ORIGINAL_MID, add_0004_store

FILE = Envelope(source="file")
# test_storage_growth's fixture: an empty (unmigrated) database on each backend.
empty_engine = test_storage_growth.empty_engine


def rule_exploded(mail):
    raise RuntimeError("rule exploded")


def timings_of(sessions: sessionmaker[Session], inbound_id: int) -> list[dict] | None:
    with sessions() as session:
        return session.get_one(InboundMessage, inbound_id).stage_timings


def stages_before(stage: Stage) -> list[str]:
    """The pipeline's stages up to and including `stage`, in order."""
    return [s.value for s in STAGES[: STAGES.index(stage) + 1]]


def test_a_processed_message_has_a_timing_for_every_stage_in_order(pipeline, sessions):
    inbound_id = receive(sessions, simple_mail(), FILE)
    assert process(pipeline, inbound_id) == Fate.TICKET
    timings = timings_of(sessions, inbound_id)
    assert timings is not None
    assert [t["stage"] for t in timings] == [s.value for s in STAGES]
    assert all(isinstance(t["ms"], float) and t["ms"] >= 0 for t in timings)
    assert not any("failed" in t for t in timings)


def test_a_duplicate_is_timed_through_the_stages_it_skips_too(pipeline, sessions):
    raw = simple_mail()
    process(pipeline, receive(sessions, raw, FILE))
    again = receive(sessions, raw, FILE)
    assert process(pipeline, again) == Fate.DUPLICATE
    assert [t["stage"] for t in timings_of(sessions, again) or []] == [s.value for s in STAGES]


def test_a_failed_message_has_timings_up_to_the_failing_stage_marked(settings, sessions):
    inbound_id = receive(sessions, simple_mail(), FILE)
    ctx = PipelineContext(settings, sessions, rule_exploded)
    assert process(ctx, inbound_id) == Fate.FAILED
    timings = timings_of(sessions, inbound_id) or []
    assert [t["stage"] for t in timings] == stages_before(Stage.ROUTE)
    assert [t.get("failed", False) for t in timings] == [False] * (len(timings) - 1) + [True]

    # A replay that succeeds replaces them with its own, complete and unmarked.
    assert process(PipelineContext(settings, sessions), inbound_id) == Fate.TICKET
    timings = timings_of(sessions, inbound_id) or []
    assert [t["stage"] for t in timings] == [s.value for s in STAGES]
    assert not any("failed" in t for t in timings)


def test_a_message_failing_to_parse_has_one_timing(settings, sessions):
    limit = 100
    small = Settings(database=settings.database, intake={"max_message_bytes": limit})
    inbound_id = receive(sessions, simple_mail(body="x" * limit), FILE)
    assert process(PipelineContext(small, sessions), inbound_id) == Fate.FAILED
    timings = timings_of(sessions, inbound_id) or []
    assert [(t["stage"], t.get("failed")) for t in timings] == [("parse", True)]


def test_messages_show_and_failed_show_list_the_stages(shipped_cli, settings, sessions):
    cli = shipped_cli
    done = receive(sessions, simple_mail(subject="done"), FILE)
    process(PipelineContext(settings, sessions), done)
    failing = receive(sessions, simple_mail(subject="failing"), FILE)
    process(PipelineContext(settings, sessions, rule_exploded), failing)

    shown = cli("messages", "show", str(done), "--json")
    assert shown.exit_code == 0, shown.output
    assert [t["stage"] for t in json.loads(shown.stdout)["stage_timings"]] == [
        s.value for s in STAGES
    ]
    human = cli("messages", "show", str(done)).stdout
    assert "stages:" in human and all(f"  {s.value} " in human for s in STAGES)

    shown = cli("failed", "show", str(failing), "--json")
    assert json.loads(shown.stdout)["stage_timings"][-1] == {
        "stage": "route",
        "ms": json.loads(shown.stdout)["stage_timings"][-1]["ms"],
        "failed": True,
    }
    human = cli("failed", "show", str(failing)).stdout
    assert "  route " in human and "failed here" in human and "  decide " not in human


def test_upgrade_from_0007_keeps_old_rows_null_and_new_ones_get_timings(empty_engine: Engine):
    engine = empty_engine
    cfg = db.alembic_config(engine)
    command.upgrade(cfg, "0004")
    add_0004_store(engine)
    command.upgrade(cfg, "0007")
    command.upgrade(cfg, "0008")
    assert "stage_timings" in {c["name"] for c in inspect(engine).get_columns("inbound_ledger")}
    with engine.connect() as conn:
        old = conn.execute(text("SELECT stage_timings FROM inbound_ledger")).scalars().all()
        assert len(old) == 5 and set(old) == {None}
        # The view tools read keeps its columns, and still answers.
        assert conn.execute(text("SELECT count(*) FROM inbound_messages")).scalar_one() == 5

    sessions = db.make_session_factory(engine)
    settings = Settings(database={"url": engine.url.render_as_string(hide_password=False)})
    reply = simple_mail(subject="Re: 見積書の件", headers={"In-Reply-To": ORIGINAL_MID})
    reply_id = receive(sessions, reply, FILE)
    assert process(PipelineContext(settings, sessions), reply_id) == Fate.COMMENT
    assert [t["stage"] for t in timings_of(sessions, reply_id) or []] == [s.value for s in STAGES]

    command.downgrade(cfg, "0007")
    assert "stage_timings" not in {c["name"] for c in inspect(engine).get_columns("inbound_ledger")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM inbound_messages")).scalar_one() == 6
    command.upgrade(cfg, "head")
