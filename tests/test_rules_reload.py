"""Hot reload: a broken edit is refused and the last good rules keep routing; a fix is picked
up without restart, by file watching (in-process and in a real `mailintake serve`) and SIGHUP."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from ingest.extract import DEFAULT_ZONE
from rules.load import load_rules
from rules.reload import RulesHolder, watch_rules
from storage import db
from storage.models import Ticket
from tests.mails import simple_mail
from tests.rulesets import write_rules
from tests.servers import LISTENING, ServeProcess
from tests.waiting import WAIT_SECONDS, wait_for

GOOD = "rules:\n  - {name: to-sato, when: {always: true}, then: {assignee: sato}}\n"
FIXED = "rules:\n  - {name: to-suzuki, when: {always: true}, then: {assignee: suzuki}}\n"
BROKEN = "rules:\n  - {name: to-yamada, when: {always: true}, then: {assignee: yamda}}\n"


def replace_file(path: Path, text: str) -> None:
    """Save the way editors do: write a new file, rename it over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def test_a_refused_reload_keeps_the_last_good_rules(tmp_path, caplog):
    path = write_rules(tmp_path, GOOD)
    holder = RulesHolder.load(path, DEFAULT_ZONE)
    good = holder.current()
    path.write_text(path.read_text().replace(GOOD, BROKEN), encoding="utf-8")
    assert holder.reload() is False
    assert holder.current() is good
    assert holder.last_error is not None
    assert "unknown assignee `yamda` — did you mean `yamada`?" in holder.last_error
    assert f"{path}:9:" in holder.last_error
    assert "rules file refused" in caplog.text
    path.write_text(path.read_text().replace(BROKEN, FIXED), encoding="utf-8")
    assert holder.reload() is True
    assert holder.last_error is None
    assert [r.name for r in holder.current().rules] == ["to-suzuki"]
    assert holder.reload() is False  # same bytes: nothing to swap


@pytest.fixture
def watching(tmp_path) -> Iterator[RulesHolder]:
    """A holder whose file is watched by `watch_rules` on an event loop in a thread."""
    holder = RulesHolder.load(write_rules(tmp_path, GOOD), DEFAULT_ZONE)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(watch_rules(holder, stop, debounce_ms=50),)
    )
    thread.start()
    # The watch is live once it has loaded an edit: save harmless ones (a comment) until one is
    # in force, then wait until the file's last bytes are (no reload of a probe still to come).
    original, probes = holder.current(), itertools.count()

    def probe_loaded() -> bool:
        if holder.current() is original:
            replace_file(holder.path, f"{holder.path.read_text()}# probe {next(probes)}\n")
            return False
        return holder.current().version == load_rules(holder.path, DEFAULT_ZONE).version

    wait_for(probe_loaded, "the rules watch to load a saved edit")
    yield holder
    loop.call_soon_threadsafe(stop.set)
    thread.join(WAIT_SECONDS)
    loop.close()
    assert not thread.is_alive()


def test_watching_refuses_a_broken_save_then_picks_up_the_fix(watching):
    good = watching.current()
    text = watching.path.read_text()
    replace_file(watching.path, text.replace(GOOD, BROKEN))
    wait_for(lambda: watching.last_error is not None, "the broken save to be refused")
    assert watching.current() is good
    replace_file(watching.path, text.replace(GOOD, FIXED))
    wait_for(lambda: watching.current().version != good.version, "the fix to be loaded")
    assert [r.name for r in watching.current().rules] == ["to-suzuki"]
    assert watching.last_error is None


def ticket_assignees(db_url: str) -> list[tuple[str | None, str | None]]:
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(Ticket.assignee, Ticket.rules_version)).all())
    finally:
        engine.dispose()


def test_serve_keeps_old_rules_on_a_broken_edit_and_reloads_the_fix(tmp_path, serve_processes):
    (tmp_path / "config.yaml").write_text("rules:\n  path: rules.yaml\n", encoding="utf-8")
    real = tmp_path / "real"
    real.mkdir()
    rules_file = write_rules(real, GOOD)
    (tmp_path / "rules.yaml").symlink_to(rules_file)  # for the SIGHUP part, below
    child = ServeProcess(tmp_path, port=0)
    serve_processes.append(child)
    port = int(child.wait_for_line(LISTENING).group(1))
    child.wait_for_line(re.compile(r"in force; watching "))

    def send(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            raw = simple_mail(subject=f"在庫 {n}", message_id=f"<reload-{n}@example.com>")
            client.sendmail("c@example.com", ["inquiry@wine-importer.example.jp"], raw)
        child.wait_for_line(re.compile(rf"message {n} .*ticket"))

    send(1)
    # A broken edit the service sees (the symlink is replaced by a real file): refused.
    replace_file(tmp_path / "rules.yaml", rules_file.read_text().replace(GOOD, BROKEN))
    child.wait_for_line(re.compile(r"rules file refused, rules \w+ stay in force"))
    child.wait_for_line(re.compile(r"unknown assignee `yamda` — did you mean `yamada`\?"))
    send(2)
    # The fix, saved: picked up without restart.
    replace_file(tmp_path / "rules.yaml", rules_file.read_text().replace(GOOD, FIXED))
    child.wait_for_line(re.compile(r"rules \w+ in force \(1 rules"))
    send(3)
    # A change the file watch cannot see (inside a symlinked directory) is loaded on SIGHUP.
    (tmp_path / "rules.yaml").unlink()
    (tmp_path / "rules.yaml").symlink_to(rules_file)
    child.wait_for_line(re.compile(r"rules \w+ in force"))  # back to GOOD via the symlink
    rules_file.write_text(rules_file.read_text().replace(GOOD, FIXED), encoding="utf-8")
    os.kill(child.proc.pid, signal.SIGHUP)
    child.wait_for_line(re.compile(r"rules \w+ in force"))
    send(4)
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output
    assignees = [a for a, _version in ticket_assignees(child.db_url)]
    assert assignees == ["sato", "sato", "suzuki", "suzuki"]
