"""The web pages over real HTTP (uvicorn on a free port) without a browser: access rules,
CSRF, the same replay as the CLI, and the queries behind the ledger and dashboard on both
databases. The browser drives them in tests/test_web_browser.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli import app
from config import Settings
from ingest.intake import receive
from ingest.mail import Envelope
from pipeline.process import PipelineContext, process
from pipeline.stages import STAGES
from storage import repo
from storage.models import Ticket, utcnow
from storage.states import Fate, Stage
from tests.mails import simple_mail
from tests.servers import ServeProcess
from tests.web_server import ADMIN, RULES, VIEWER, Client, WebServer, web_settings
from views.records import history_of
from web.app import safe_next
from web.auth import check_login
from web.dashboard import BAR_WIDTH, CHART_HEIGHT, CHART_HOURS, chart
from web.site import Site
from web.throttle import LoginThrottle, retry_after

FILE = Envelope(source="file")


def rule_exploded(mail):
    raise RuntimeError("rule exploded")


def failed(settings: Settings, sessions: sessionmaker[Session], subject: str) -> int:
    inbound_id = receive(sessions, simple_mail(subject=subject), FILE)
    assert process(PipelineContext(settings, sessions, rule_exploded), inbound_id) == Fate.FAILED
    return inbound_id


@pytest.fixture
def rules_path(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES, encoding="utf-8")
    return path


@pytest.fixture
def web(db_url: str, rules_path: Path, sessions) -> Iterator[WebServer]:
    server = WebServer(web_settings(db_url, rules_path), sessions).start()
    yield server
    server.stop()


def ticket_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Ticket)) or 0


def test_pages_need_a_login_and_a_right_password(web):
    client = Client(web.url)
    first = client.request("/ledger")
    assert first.url.endswith("/login?next=/ledger") and 'id="login"' in first.body
    assert client.login(ADMIN[0], "wrong password!").status == 401
    assert client.login("nobody", ADMIN[1]).status == 401
    assert client.request("/failures").url.endswith("/login?next=/failures")
    assert client.login(*ADMIN).status == 200
    assert "Failures" in client.request("/failures").body
    # the admin endpoints stay as they were, without a login
    assert Client(web.url).request("/healthz").body == '{"alive":true}'


def test_viewer_may_look_but_not_replay_and_every_post_needs_the_csrf_token(web, sessions):
    inbound_id = failed(web.settings, sessions, "再送してください")
    viewer = Client(web.url)
    viewer.login(*VIEWER)
    page = viewer.request("/failures")
    assert "再送してください" in page.body and "need the admin role" in page.body
    token = viewer.csrf("/failures")
    refused = viewer.request("/failures/replay", {"csrf": token, "id": inbound_id})
    assert refused.status == 403 and "admin role" in refused.body
    admin = Client(web.url)
    admin.login(*ADMIN)
    no_token = admin.request("/failures/replay", {"id": inbound_id})
    assert no_token.status == 403 and "CSRF" in no_token.body
    wrong = admin.request("/failures/replay", {"id": inbound_id, "csrf": token})  # viewer's
    assert wrong.status == 403
    assert ticket_count(sessions) == 0
    with sessions() as session:
        assert session.get_one(repo.InboundMessage, inbound_id).status == Fate.FAILED


def test_the_same_replay_through_the_cli_and_the_web(web, sessions, tmp_path):
    by_cli, by_web = (failed(web.settings, sessions, "【注文】赤ワイン 12本") for _ in range(2))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database:\n  url: {web.settings.database.url}\nrules:\n  path: rules.yaml\n",
        encoding="utf-8",
    )
    cli = CliRunner().invoke(
        app, ["--config", str(config), "failed", "replay", str(by_cli), "--json"]
    )
    assert cli.exit_code == 0, cli.output
    admin = Client(web.url)
    admin.login(*ADMIN)
    reply = admin.request("/failures/replay", {"csrf": admin.csrf("/failures"), "id": by_web})
    assert reply.status == 200
    assert json.loads(cli.stdout)["fates"]["ticket"] == 1 and "1 ticket" in reply.body

    with sessions() as session:
        made = {t.inbound_message_id: t for t in session.scalars(select(Ticket))}
        decided = [
            (t.category, t.assignee, t.priority, t.subject, t.rule_names)
            for t in (made[by_cli], made[by_web])
        ]
        histories = [
            [(h["outcome"], h["stage"]) for h in history_of(session, i)] for i in (by_cli, by_web)
        ]
    assert (
        decided[0]
        == decided[1]
        == ("order", "sato", "high", "【注文】赤ワイン 12本", ["order-by-subject"])
    )
    assert histories[0] == histories[1] == [("failed", "route"), ("ticket", None)]
    assert f'href="/tickets/{made[by_web].key}"' in reply.body

    # Neither way makes a second ticket: each replays the other's message as `skipped`.
    again = admin.request("/failures/replay", {"csrf": admin.csrf("/failures"), "id": by_cli})
    assert "1 skipped" in again.body
    cli_again = CliRunner().invoke(
        app, ["--config", str(config), "failed", "replay", str(by_web), "--json"]
    )
    assert json.loads(cli_again.stdout)["fates"]["skipped"] == 1
    assert ticket_count(sessions) == 2


def test_discard_needs_a_reason_and_keeps_the_row(web, sessions):
    inbound_id = failed(web.settings, sessions, "不要なメール")
    admin = Client(web.url)
    admin.login(*ADMIN)
    token = admin.csrf("/failures")
    assert admin.request("/failures/discard", {"csrf": token, "id": inbound_id}).status == 400
    done = admin.request(
        "/failures/discard", {"csrf": token, "id": inbound_id, "discard_reason": "テスト送信"}
    )
    assert done.status == 200 and "1 discarded" in done.body
    with sessions() as session:
        row = session.get_one(repo.InboundMessage, inbound_id)
        assert (row.status, row.discard_reason) == (Fate.DISCARDED, "テスト送信")


def test_ledger_finds_a_japanese_subject_and_shows_the_message(web, sessions):
    pipeline = PipelineContext(web.settings, sessions)
    mail = simple_mail(
        subject="ｶﾀﾛｸﾞ送付のお願い", attachments=[("見積.pdf", "application/pdf", b"%PDF-1.4 x")]
    )
    wanted = receive(sessions, mail, FILE)
    process(pipeline, wanted)
    process(pipeline, receive(sessions, simple_mail(subject="別件"), FILE))
    client = Client(web.url)
    client.login(*VIEWER)
    found = client.request("/ledger?text=" + quote("カタログ"))  # NFKC: half-width ｶﾀﾛｸﾞ matches
    assert "ｶﾀﾛｸﾞ送付のお願い" in found.body and "別件" not in found.body
    page = client.request(f"/messages/{wanted}").body
    assert 'lang="ja"' in page and "ボルドーの在庫はありますか。" in page
    with sessions() as session:
        [attachment] = repo.attachments_of_message(session, wanted)
    assert f'href="/attachments/{attachment.id}"' in page
    download = client.request(f"/attachments/{attachment.id}")
    assert download.body == "%PDF-1.4 x"
    raw = client.request(f"/messages/{wanted}/raw")
    assert raw.body.encode() == mail


def test_a_proxy_header_is_trusted_only_when_configured(db_url, rules_path, sessions):
    settings = web_settings(db_url, rules_path, trust_proxy_user="X-Forwarded-User")
    server = WebServer(settings, sessions).start()
    try:
        as_admin = Client(server.url, {"X-Forwarded-User": ADMIN[0]})
        assert "Dashboard" in as_admin.request("/").body
        stranger = Client(server.url, {"X-Forwarded-User": "visitor"})
        assert "visitor (viewer)" in stranger.request("/").body
    finally:
        server.stop()
    plain = web_settings(db_url, rules_path)
    server = WebServer(plain, sessions).start()
    try:
        ignored = Client(server.url, {"X-Forwarded-User": ADMIN[0]}).request("/")
        assert ignored.url.endswith("/login?next=/")
    finally:
        server.stop()


def test_web_needs_a_secret_and_accounts_are_argon2(db_url, rules_path):
    with pytest.raises(ValidationError, match=r"web\.secret"):
        Settings(web={"enabled": True})
    with pytest.raises(ValidationError, match=r"needs http\.enabled"):
        Settings(http={"enabled": False}, web={"enabled": True, "secret": "x" * 16})
    settings = web_settings(db_url, rules_path)
    assert settings.web.accounts[ADMIN[0]].password_hash.get_secret_value().startswith("$argon2id$")
    assert check_login(settings, *ADMIN) is not None
    assert check_login(settings, ADMIN[0], VIEWER[1]) is None


def test_adduser_prints_an_entry_the_config_accepts(tmp_path):
    result = CliRunner().invoke(
        app,
        ["web", "adduser", "田中", "--role", "admin", "--password-stdin", "--json"],
        input="a long password\n",
    )
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    settings = Settings(web={"enabled": True, "secret": "x" * 16, "accounts": entry})
    assert check_login(settings, "田中", "a long password").role == "admin"
    short = CliRunner().invoke(app, ["web", "adduser", "x", "--password-stdin"], input="short\n")
    assert short.exit_code == 2


def test_hourly_fates_and_the_ledger_query(settings, sessions):
    """The dashboard's per-hour counts and the ledger's filters, on each database."""
    pipeline = PipelineContext(settings, sessions)
    ids = [receive(sessions, simple_mail(subject=f"件名 {n}"), FILE) for n in range(3)]
    for inbound_id in ids[:2]:
        process(pipeline, inbound_id)
    with sessions() as session:
        hourly = repo.fates_per_hour(session, utcnow() - timedelta(hours=2))
        tickets = repo.ledger_with_head(
            session, repo.LedgerFilter(status=Fate.TICKET), 10, 4096, None
        )
        older = repo.ledger_with_head(session, repo.LedgerFilter(), 10, 4096, ids[2])
    by_fate: dict[str, int] = {}
    for hour, fate, count in hourly:
        assert hour.minute == 0 and hour.tzinfo is not None and hour <= utcnow()
        by_fate[fate] = by_fate.get(fate, 0) + count
    assert by_fate == {"ticket": 2, "received": 1}
    assert [m.id for m, _head, key in tickets] == ids[1::-1]
    assert all(key and key.startswith("INQ-") and b"Subject:" in head for _m, head, key in tickets)
    assert [m.id for m, _head, _key in older] == ids[1::-1]


HTTP_LISTENING = re.compile(r"listening for HTTP on 127\.0\.0\.1:(\d+)")


def test_serve_mounts_the_pages_only_when_enabled(tmp_path, serve_processes, monkeypatch):
    """`mailintake serve` as it runs: the pages beside /metrics when `web.enabled`."""
    assert Settings().web.enabled is False
    monkeypatch.setenv("MAILINTAKE_PROCESSING__MODE", "thread")
    child = ServeProcess(tmp_path, port=0)
    serve_processes.append(child)
    plain = Client(f"http://127.0.0.1:{int(child.wait_for_line(HTTP_LISTENING).group(1))}")
    assert plain.request("/login").status == 404
    assert plain.request("/healthz").status == 200
    child.proc.terminate()
    assert child.finish() == 0

    settings = web_settings("sqlite://", tmp_path / "rules.yaml")
    accounts = {n: a.model_dump(mode="json") for n, a in settings.web.accounts.items()}
    for name, account in accounts.items():
        account["password_hash"] = settings.web.accounts[name].password_hash.get_secret_value()
    monkeypatch.setenv("MAILINTAKE_WEB__ENABLED", "true")
    monkeypatch.setenv("MAILINTAKE_WEB__SECRET", "a-secret-of-32-characters-000000")
    monkeypatch.setenv("MAILINTAKE_WEB__ACCOUNTS", json.dumps(accounts))
    (tmp_path / "web").mkdir()
    child = ServeProcess(tmp_path / "web", port=0)
    serve_processes.append(child)
    client = Client(f"http://127.0.0.1:{int(child.wait_for_line(HTTP_LISTENING).group(1))}")
    assert client.login(*ADMIN).status == 200
    assert "Dashboard" in client.request("/").body
    assert "No failed messages." in client.request("/failures").body
    assert client.request("/metrics").status == 200
    child.proc.terminate()
    assert child.finish() == 0


def test_the_playground_lists_problems_of_a_broken_edit_and_saves_nothing(web, rules_path):
    client = Client(web.url)
    client.login(*VIEWER)
    broken = RULES.replace("assignee: sato", "assignee: satou")
    page = client.request("/playground", {"csrf": client.csrf("/playground"), "rules": broken})
    assert page.status == 200
    assert (
        "rules.yaml:10:29: rules.0.then.assignee" in page.body
        and "unknown assignee `satou`" in page.body
    )
    assert "mailintake-playground" not in page.body  # the temporary copy's folder stays hidden
    assert rules_path.read_text(encoding="utf-8") == RULES


@pytest.mark.parametrize(
    ("asked", "goes_to"),
    [
        ("/failures", "/failures"),
        ("/tickets/INQ-7", "/tickets/INQ-7"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("/\t/evil.example", "/"),
    ],
)
def test_login_sends_back_only_to_a_page_of_this_site(asked, goes_to):
    assert safe_next(asked) == goes_to


def test_a_web_replay_routes_with_the_rules_in_force_after_a_reload(web, sessions, rules_path):
    inbound_id = failed(web.settings, sessions, "【注文】白ワイン")
    rules_path.write_text(RULES.replace("assignee: sato", "assignee: yamada"), encoding="utf-8")
    assert web.holder.reload()  # what `serve` does when the file changes
    admin = Client(web.url)
    admin.login(*ADMIN)
    admin.request("/failures/replay", {"csrf": admin.csrf("/failures"), "id": inbound_id})
    with sessions() as session:
        [ticket] = session.scalars(select(Ticket)).all()
    assert (ticket.category, ticket.assignee) == ("order", "yamada")
    assert ticket.rules_version == web.holder.current().version


def test_the_chart_stacks_each_hours_fates_to_scale():
    site = Site(Settings(), sessionmaker())
    now = utcnow()
    hour = now.replace(minute=0, second=0, microsecond=0)
    counts = [
        (hour, "ticket", 2),
        (hour, "failed", 1),
        (hour - timedelta(hours=5), "ticket", 1),
        (hour - timedelta(days=8), "ticket", 50),  # before the chart: ignored
    ]
    drawn = chart(site, counts, now)
    assert drawn["peak"] == 3
    last = [b for b in drawn["bars"] if b.x == (CHART_HOURS - 1) * BAR_WIDTH]
    assert [(b.height, b.title.split(": ")[1]) for b in last] == [
        (80.0, "2 ticket"),
        (40.0, "1 failed"),
    ]
    assert last[0].y + last[0].height == CHART_HEIGHT and last[1].y == 0
    [earlier] = [b for b in drawn["bars"] if b.x == (CHART_HOURS - 6) * BAR_WIDTH]
    assert earlier.height == 40.0
    assert len(drawn["days"]) == 7  # a line at each local midnight of the week


def test_every_answer_forbids_scripts_and_framing(web, sessions):
    inbound_id = receive(sessions, simple_mail(subject="<script>alert(1)</script>"), FILE)
    client = Client(web.url)
    client.login(*VIEWER)
    for path in ("/ledger", f"/messages/{inbound_id}", f"/messages/{inbound_id}/raw", "/login"):
        with client.opener.open(web.url + path) as reply:
            headers = reply.headers
            body = reply.read().decode()
        assert "script-src 'none'" in headers["Content-Security-Policy"], path
        assert (
            headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
        )
        if path != f"/messages/{inbound_id}/raw":
            assert "<script>alert" not in body, path


STAGE_ROW = re.compile(r"<tr(?: class=\"problem\")?><td>(\w+)( \(failed here\))?</td>")


def stage_rows(page: str) -> list[tuple[str, bool]]:
    """The message page's stage table: (stage, marked as the failing one) per row."""
    table = page[page.index('id="stages"') :]
    table = table[: table.index("</table>")]
    return [(name, bool(mark)) for name, mark in STAGE_ROW.findall(table)]


def test_the_message_page_shows_each_stage_with_its_time(web, sessions):
    done = receive(sessions, simple_mail(subject="時間"), FILE)
    process(PipelineContext(web.settings, sessions), done)
    failing = failed(web.settings, sessions, "失敗")
    client = Client(web.url)
    client.login(*VIEWER)
    page = client.request(f"/messages/{done}").body
    assert stage_rows(page) == [(stage.value, False) for stage in STAGES]
    assert page.count("<meter ") == len(STAGES)
    rows = stage_rows(client.request(f"/messages/{failing}").body)
    assert rows[-1] == ("route", True) and [name for name, _ in rows] == [
        s.value for s in STAGES[: STAGES.index(Stage.ROUTE) + 1]
    ]


class Clock:
    """The login throttle's monotonic clock, moved by the test instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def throttled(db_url: str, rules_path: Path, sessions) -> Iterator[tuple[WebServer, Clock]]:
    settings = web_settings(db_url, rules_path)
    web_part = settings.web.model_copy(update={"login_failure_window_seconds": 60})
    clock = Clock()
    server = WebServer(settings.model_copy(update={"web": web_part}), sessions, clock).start()
    yield server, clock
    server.stop()


def test_five_wrong_passwords_shut_the_account_and_address_out_until_the_window_passes(
    throttled,
):
    web, clock = throttled
    client = Client(web.url)
    for attempt in range(5):
        assert client.login(ADMIN[0], f"wrong {attempt}").status == 401
        clock.now += 1
    refused = client.login(*ADMIN)  # the right password, too late
    assert refused.status == 429 and "Too many failed logins" in refused.body
    assert client.request("/").url.endswith("/login?next=/")
    assert Client(web.url, source="127.0.0.3").login(*ADMIN).status == 429  # the account
    assert client.login(*VIEWER).status == 429  # the address
    assert Client(web.url, source="127.0.0.2").login(*VIEWER).status == 200

    clock.now += 60 - 5  # the oldest failure is 60 s old: one of the five has expired
    assert client.login(*ADMIN).status == 200
    assert "Dashboard" in client.request("/").body


def test_failures_from_one_address_shut_it_out_whatever_the_names(throttled):
    web, clock = throttled
    elsewhere = Client(web.url, source="127.0.0.2")
    for attempt in range(5):
        assert elsewhere.login(f"nobody{attempt}", "guess").status == 401
    assert elsewhere.login(*VIEWER).status == 429
    assert Client(web.url).login(*VIEWER).status == 200  # the account itself is not shut
    clock.now += 60
    assert elsewhere.login(*VIEWER).status == 200


def test_a_right_password_clears_the_account_count_not_the_address_count(throttled):
    web, _clock = throttled
    client = Client(web.url)
    for _ in range(4):
        assert client.login(ADMIN[0], "wrong").status == 401
    assert client.login(*ADMIN).status == 200
    other = Client(web.url, source="127.0.0.2")
    for _ in range(4):  # four more for the account: refused only after a fifth
        assert other.login(ADMIN[0], "wrong").status == 401
    assert other.login(*ADMIN).status == 200
    assert client.login(VIEWER[0], "wrong").status == 401  # the address's fifth
    assert client.login(*VIEWER).status == 429


def test_the_throttle_remembers_a_bounded_number_of_names_and_addresses():
    clock = Clock()
    throttle = LoginThrottle(limit=2, window=10, clock=clock, max_keys=3)
    for key in ("a", "b", "c", "d"):
        throttle.failed([key])
        throttle.failed([key])
    assert throttle.wait(["a"]) == 0  # forgotten: the least recently failed went first
    assert throttle.wait(["d"]) == 10
    clock.now += 4
    assert throttle.wait(["b", "c"]) == 6
    assert retry_after(0.2) == "1" and retry_after(6.0) == "6"
