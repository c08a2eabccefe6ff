"""The web pages in a real headless browser: Debian's chromium driven through its chromedriver
by Selenium (never Selenium Manager: nothing is downloaded). One server and one browser for
the module, on SQLite; the queries run on PostgreSQL too in tests/test_web.py.

`MAILINTAKE_SCREENSHOTS=docs/web pytest tests/test_web_browser.py` also saves the screenshots
docs/web.md shows."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from ingest.intake import receive
from ingest.mail import Decision, Envelope, IncomingMail
from pipeline.process import PipelineContext, process
from pipeline.stages import STAGES
from storage import db
from storage.models import InboundMessage, utcnow
from storage.states import Fate
from tests.mails import simple_mail
from tests.waiting import WAIT_SECONDS
from tests.web_server import ADMIN, RULES, VIEWER, WebServer, web_settings

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (scripts/test.sh installs them)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SHOTS = os.environ.get("MAILINTAKE_SCREENSHOTS")
FILE = Envelope(source="file")
FAILING_SUBJECT = "【注文】ロゼ 6本の追加"
SOUGHT_SUBJECT = "ボルドー2019の在庫について"
SUBJECTS = [
    "請求書の再発行のお願い",
    "Re: 見積書 No.2026-118",
    "配送日時の変更について",
    "Order inquiry: Chablis 2022",
    "【電話受付】折り返しのご依頼",
    "試飲会のご案内",
]


def rule_exploded(mail: IncomingMail) -> Decision:
    raise RuntimeError("rule exploded: lookup table unavailable")


def fill(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, int]:
    """A week of mail: tickets spread over the days, a few dropped, two failures."""
    pipeline = PipelineContext(settings, sessions)
    broken = PipelineContext(settings, sessions, rule_exploded)
    now = utcnow()
    for n in range(70):
        subject = SUBJECTS[n % len(SUBJECTS)]
        inbound_id = receive(sessions, simple_mail(subject=f"{subject} ({n})"), FILE)
        if n % 23 == 5:
            process(broken, inbound_id)
        else:
            process(pipeline, inbound_id)
        backdated = now - timedelta(days=n % 7, hours=(n * n) % 9, minutes=n)
        with sessions.begin() as session:
            session.execute(
                update(InboundMessage)
                .where(InboundMessage.id == inbound_id)
                .values(received_at=backdated)
            )
    mail = simple_mail(
        subject=SOUGHT_SUBJECT,
        body="田中です。ボルドー2019を12本、在庫はございますか。\n9時12分に送りました。",
        sender="田中 一郎 <tanaka@example.co.jp>",
        attachments=[("注文書.pdf", "application/pdf", b"%PDF-1.4 order")],
    )
    sought = receive(sessions, mail, FILE)
    process(pipeline, sought)
    failing = receive(sessions, simple_mail(subject=FAILING_SUBJECT), FILE)
    assert process(broken, failing) == Fate.FAILED
    return {"sought": sought, "failing": failing}


@pytest.fixture(scope="module")
def site(sqlite_migrated: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("web")
    shutil.copyfile(sqlite_migrated, folder / "web.db")
    rules = folder / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    settings = web_settings(f"sqlite:///{folder / 'web.db'}", rules)
    engine = db.make_engine(settings.database.url)
    sessions = db.make_session_factory(engine)
    ids = fill(settings, sessions)
    server = WebServer(settings, sessions).start()
    yield server, ids
    server.stop()
    engine.dispose()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--lang=ja",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def wait(driver: Any, condition: Any, what: str) -> Any:
    return WebDriverWait(driver, WAIT_SECONDS).until(condition, f"never saw {what}")


def log_in(driver: Any, base: str, name: str, password: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "form.who"), "the logged-in header")


def shoot(driver: Any, name: str, height: int = 900, whole: bool = True) -> None:
    """Save the page as docs/web/NAME.png when MAILINTAKE_SCREENSHOTS names the folder."""
    if not SHOTS:
        return
    width = driver.get_window_size()["width"]
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height, full), 2400) if whole else height)
    folder = Path(SHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"{name}.png"))
    driver.set_window_size(width, 900 if whole else height)


def post_from_page(driver: Any, path: str, fields: dict[str, str], with_csrf: bool) -> int:
    """POST a form from the page (as a forged or tampered form would), return the status."""
    script = """
        const [path, fields, withCsrf, done] = arguments;
        const form = new FormData();
        for (const [k, v] of Object.entries(fields)) form.append(k, v);
        if (withCsrf) form.append('csrf', document.querySelector('meta[name=csrf-token]').content);
        fetch(path, {method: 'POST', body: form}).then(r => done(r.status));
    """
    return int(driver.execute_async_script(script, path, fields, with_csrf))


def test_find_a_message_by_its_japanese_subject_and_open_it(site, browser):
    server, ids = site
    log_in(browser, server.url, *VIEWER)
    shoot(browser, "dashboard")
    assert browser.find_elements(By.CSS_SELECTOR, "figure.chart svg rect")
    browser.get(f"{server.url}/ledger")
    shoot(browser, "ledger", whole=False)
    box = browser.find_element(By.ID, "text")
    box.send_keys("ボルドー2019")
    browser.find_element(By.ID, "search").click()
    wait(browser, lambda d: "text=" in d.current_url, "the search results")
    found = browser.find_elements(By.CSS_SELECTOR, "#ledger a.subject")
    assert [a.text for a in found] == [SOUGHT_SUBJECT]
    found[0].click()
    wait(browser, lambda d: d.current_url.endswith(f"/messages/{ids['sought']}"), "the message")
    heading = browser.find_element(By.TAG_NAME, "h1")
    assert SOUGHT_SUBJECT in heading.text and heading.get_attribute("lang") == "ja"
    assert "9時12分に送りました" in browser.find_element(By.ID, "body").text
    assert browser.find_element(By.ID, "fate").text == "ticket"
    assert browser.find_element(By.LINK_TEXT, "注文書.pdf")
    stages = browser.find_elements(By.CSS_SELECTOR, "#stages tbody td:first-child")
    assert [cell.text for cell in stages] == [stage.value for stage in STAGES]
    shoot(browser, "message")
    browser.find_element(By.ID, "ticket-link").click()
    wait(browser, lambda d: d.find_elements(By.ID, "ticket-key"), "the ticket")
    assert "tanaka@example.co.jp" in browser.page_source
    shoot(browser, "ticket")


def test_viewer_is_refused_replay_and_a_form_without_its_token_is_refused(site, browser):
    server, ids = site
    log_in(browser, server.url, *VIEWER)
    browser.get(f"{server.url}/failures")
    assert not browser.find_elements(By.CSS_SELECTOR, "button.replay-selected")
    fields = {"id": str(ids["failing"])}
    assert post_from_page(browser, "/failures/replay", fields, with_csrf=True) == 403
    log_in(browser, server.url, *ADMIN)
    browser.get(f"{server.url}/failures")
    assert post_from_page(browser, "/failures/replay", fields, with_csrf=False) == 403
    browser.get(f"{server.url}/messages/{ids['failing']}")
    assert browser.find_element(By.ID, "fate").text == "failed"


def test_admin_replays_a_failed_message_and_sees_its_ticket(site, browser):
    server, ids = site
    log_in(browser, server.url, *ADMIN)
    browser.get(f"{server.url}/failures")
    shoot(browser, "failures")
    browser.find_element(By.ID, f"pick-{ids['failing']}").click()
    pick = browser.find_element(By.ID, f"pick-{ids['failing']}")
    pick.find_element(By.XPATH, "ancestor::form//button[@class='replay-selected']").click()
    wait(browser, lambda d: d.find_elements(By.ID, "outcomes"), "the replay outcome")
    assert "1 ticket" in browser.find_element(By.ID, "counts").text
    shoot(browser, "replayed", height=500)
    browser.find_element(By.CSS_SELECTOR, "a.ticket-link").click()
    wait(browser, lambda d: d.find_elements(By.ID, "ticket-key"), "the new ticket")
    assert FAILING_SUBJECT in browser.find_element(By.TAG_NAME, "h1").text
    assert browser.find_element(By.ID, "category").text == "order"


def test_a_rule_edit_in_the_playground_changes_the_decision(site, browser):
    server, ids = site
    log_in(browser, server.url, *VIEWER)  # trying rules writes nothing: viewers may
    browser.get(f"{server.url}/playground")
    area = browser.find_element(By.ID, "rules")
    assert "order-by-subject" in area.get_attribute("value")
    edited = RULES.replace("contains: 注文", "contains: ボルドー")
    area.clear()
    area.send_keys(edited)
    browser.find_element(By.ID, f"try-{ids['sought']}").click()
    browser.find_element(By.ID, "try").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "section.result"), "the result")
    result = browser.find_element(By.CSS_SELECTOR, "section.result")
    assert "order-by-subject" in result.find_element(By.CSS_SELECTOR, "li.hit").text
    assert "category order" in result.find_element(By.CSS_SELECTOR, ".edited-decision").text
    assert "category inquiry" in result.find_element(By.CSS_SELECTOR, ".running-decision").text
    diff = browser.find_element(By.ID, "diff").text
    assert SOUGHT_SUBJECT in diff and "category: inquiry → order" in diff
    shoot(browser, "playground", height=1400)
    assert Path(server.settings.rules.path).read_text(encoding="utf-8") == RULES


def test_the_ledger_reads_on_a_phone(site, browser):
    server, _ids = site
    log_in(browser, server.url, *VIEWER)
    browser.set_window_size(390, 844)
    try:
        browser.get(f"{server.url}/ledger")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"the ledger is {width} px wide on a 390 px phone"
        shoot(browser, "ledger-phone", height=844, whole=False)
    finally:
        browser.set_window_size(1280, 900)


def test_an_uploaded_eml_is_routed_in_the_playground(site, browser, tmp_path):
    server, _ids = site
    log_in(browser, server.url, *VIEWER)
    browser.get(f"{server.url}/playground")
    eml = tmp_path / "注文メール.eml"
    eml.write_bytes(simple_mail(subject="【注文】スパークリング 24本"))
    browser.find_element(By.NAME, "eml").send_keys(str(eml))
    browser.find_element(By.NAME, "days").clear()
    browser.find_element(By.NAME, "days").send_keys("1")
    browser.find_element(By.ID, "try").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "section.result"), "the result")
    result = browser.find_element(By.CSS_SELECTOR, "section.result")
    assert "注文メール.eml" in result.find_element(By.TAG_NAME, "h2").text
    assert "category order" in result.find_element(By.CSS_SELECTOR, ".edited-decision").text
    assert "changed" not in result.text  # the running rules decide the same
