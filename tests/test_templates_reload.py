"""templates.yaml reloads with the rules: a broken edit is refused and the last good templates
keep extracting; a fix (or the good file saved back) is picked up without restart, in the
workers of a real `mailintake serve` too; the versions in force are logged at start and on
every reload."""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import smtplib
from pathlib import Path

from sqlalchemy import select

from rules.reload import TemplatesHolder
from storage import db
from storage.models import Ticket
from tests.conftest import DATA
from tests.servers import LISTENING, ServeProcess

SHIPPED = Path(__file__).resolve().parents[1] / "templates.yaml"
OTHER_SERVICE = """
  - name: himawari-call
    source_kind: phone
    match:
      sender: ["*@himawari-call.example.org"]
      subject: "^【電話代行】"
    bound_to: {client_networks: [127.0.0.0/8]}  # the gateway connects from here
    fields:
      - {key: requester_company, labels: [会社名]}
      - {key: requester_name, labels: [お名前], type: name}
      - {key: requester_phone, labels: [電話番号], type: phone}
"""
BROKEN = "\n  - name: half-written\n    source_kind: telepathy\n    match: {}\n"


def version(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def replace_file(path: Path, text: str) -> None:
    """Save the way editors do: write a new file, rename it over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def test_a_refused_reload_keeps_the_last_good_templates(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "templates.yaml"
    good = SHIPPED.read_text(encoding="utf-8")
    path.write_text(good, encoding="utf-8")
    holder = TemplatesHolder.load(path)
    first = holder.current()
    path.write_text(good + BROKEN, encoding="utf-8")
    assert holder.reload() is False
    assert holder.current() is first
    assert holder.last_error is not None and "source_kind" in holder.last_error
    assert f"templates file refused, templates {holder.version[:12]} stay in force" in caplog.text
    path.write_text(good, encoding="utf-8")  # the good file saved back: logged, nothing swapped
    assert holder.reload() is False
    assert f"templates {version(path)} back in force" in caplog.text
    path.write_text(good + OTHER_SERVICE, encoding="utf-8")
    assert holder.reload() is True
    assert [t.name for t in holder.current()][-1] == "himawari-call"
    assert holder.version[:12] == version(path)
    assert f"templates {version(path)} in force (4 templates" in caplog.text
    assert holder.reload() is False  # same bytes: nothing to swap


def tickets(db_url: str) -> list[tuple[str, str | None]]:
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Ticket.source_kind, Ticket.requester_company).order_by(Ticket.id)
            )
            return [(kind, company) for kind, company in rows]
    finally:
        engine.dispose()


def test_serve_reloads_templates_in_its_workers(tmp_path, serve_processes):
    (tmp_path / "config.yaml").write_text(
        "templates:\n  path: templates.yaml\nprocessing:\n  workers: 1\n", encoding="utf-8"
    )
    templates = tmp_path / "templates.yaml"
    good = SHIPPED.read_text(encoding="utf-8")
    templates.write_text(good, encoding="utf-8")
    child = ServeProcess(tmp_path, port=0)
    serve_processes.append(child)
    v1 = version(templates)
    port = int(child.wait_for_line(LISTENING).group(1))
    child.wait_for_line(re.compile(rf"templates {v1} in force; watching .*templates\.yaml"))
    child.wait_for_line(re.compile(rf"worker-1: templates {v1} in force"))
    mails = [(DATA / f"other-answering-service-{n}.eml").read_bytes() for n in (1, 2, 3, 4)]

    def send(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail(
                "info@himawari-call.example.org", ["inquiry@wine-importer.example.jp"], mails[n - 1]
            )
        child.wait_for_line(re.compile(rf"message {n} .*ticket"))

    send(1)  # no template knows the service yet: a plain email ticket
    replace_file(templates, good + OTHER_SERVICE)
    v2 = version(templates)
    child.wait_for_line(
        re.compile(rf"INFO rules\.reload: templates {v2} in force \(4 templates, was {v1}\)")
    )
    child.wait_for_line(
        re.compile(rf"worker-1 rules\.reload: templates {v2} in force \(4 templates, was {v1}\)")
    )
    send(2)
    replace_file(templates, good + OTHER_SERVICE + BROKEN)  # refused: the workers keep v2
    child.wait_for_line(re.compile(rf"templates file refused, templates {v2} stay in force"))
    send(3)
    replace_file(templates, good + OTHER_SERVICE)  # saved back: logged again
    child.wait_for_line(re.compile(rf"templates {v2} back in force"))
    child.proc.send_signal(signal.SIGHUP)  # nothing changed: no swap, and no error
    send(4)
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output
    assert "Traceback" not in child.output
    assert tickets(child.db_url) == [
        ("email", None),
        ("phone", "株式会社ほしぞら商店"),
        ("phone", "レストラン青葉"),
        ("phone", "合同会社さくら酒店"),
    ]


def test_rules_saved_back_after_a_refused_edit_are_logged(tmp_path, caplog):
    from ingest.extract import DEFAULT_ZONE
    from rules.reload import RulesHolder
    from tests.rulesets import write_rules

    caplog.set_level(logging.INFO)
    good = "rules:\n  - {name: to-sato, when: {always: true}, then: {assignee: sato}}\n"
    path = write_rules(tmp_path, good)
    holder = RulesHolder.load(path, DEFAULT_ZONE)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("sato}", "nobody}"), encoding="utf-8")
    assert holder.reload() is False
    path.write_text(text, encoding="utf-8")
    assert holder.reload() is False
    assert f"rules {holder.current().version[:12]} back in force" in caplog.text
