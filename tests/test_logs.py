"""Log lines: human by default, JSON objects one a line with `--log-format json` or
`log.format: json`; lines about a message carry its ledger id and Message-ID as fields."""

from __future__ import annotations

import json
import logging
import re
import signal
import smtplib
import subprocess

from sources import logs
from tests.mails import simple_mail
from tests.servers import LISTENING, MAILINTAKE, ServeProcess

RECIPIENT = "inquiry@wine-importer.example.jp"


def test_the_json_formatter_writes_one_object_a_line_with_the_extra_fields():
    record = logging.LogRecord("sources.smtp", logging.INFO, __file__, 1, "a\nb %s", ("c",), None)
    record.inbound_id = 7
    record.message_id = "<x@example.com>"
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "a\nb c"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "sources.smtp"
    assert (entry["inbound_id"], entry["message_id"]) == (7, "<x@example.com>")


def test_serve_with_log_format_json_writes_lines_that_parse_and_carry_the_ledger_id(
    tmp_path, serve_processes, monkeypatch
):
    monkeypatch.setenv("MAILINTAKE_LOG__FORMAT", "json")  # log.format: json
    child = ServeProcess(tmp_path, port=0)
    serve_processes.append(child)
    port = int(child.wait_for_line(LISTENING).group(1))
    mail = simple_mail(message_id="<json-log-1@example.com>").replace(b"\n", b"\r\n")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("customer@example.com", [RECIPIENT], mail)
    child.wait_for_line(re.compile(r"message 1 .*ticket"))
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output
    entries = [json.loads(line) for line in child.output.splitlines() if line.strip()]
    stored = [e for e in entries if e.get("inbound_id") == 1]
    assert stored, child.output
    assert stored[0]["message_id"] == "<json-log-1@example.com>"
    assert "stored as ledger id 1" in stored[0]["message"]
    assert {"worker-1", "MainProcess"} <= {e["process"] for e in entries}  # workers too


def test_log_format_option_wins_over_the_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f'database: {{url: "sqlite:///{tmp_path / "x.db"}"}}\nlog: {{format: human}}\n'
    )
    mail = tmp_path / "mail.eml"
    mail.write_bytes(simple_mail(message_id="<json-cli@example.com>"))
    result = subprocess.run(
        [str(MAILINTAKE), "--config", str(config), "--log-format", "json", "ingest", str(mail)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_human_lines_by_default(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f'database: {{url: "sqlite:///{tmp_path / "x.db"}"}}\n')
    mail = tmp_path / "mail.eml"
    mail.write_bytes(simple_mail())
    result = subprocess.run(
        [str(MAILINTAKE), "--config", str(config), "ingest", str(mail)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert re.search(r"INFO pipeline\.process: message 1 ", result.stderr), result.stderr
