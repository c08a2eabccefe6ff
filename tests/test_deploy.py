"""The deployment files in deploy/: the alert rules use only metrics the service exports, the
systemd unit passes `systemd-analyze verify`, and `serve` tells systemd it is ready."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.servers import MAILINTAKE, ServeProcess
from tests.waiting import WAIT_SECONDS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\bmailintake_[a-z_]+")
# What Prometheus adds to a family's name: counters, histograms, info metrics.
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")


def exported_names() -> set[str]:
    """Every metric family name sources/metrics.py declares."""
    source = (ROOT / "sources" / "metrics.py").read_text(encoding="utf-8")
    return set(re.findall(r'"(mailintake_[a-z_]+)"', source))


def family(name: str, known: set[str]) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in known:
            return name.removesuffix(suffix)
    return name


def alert_rules() -> list[dict]:
    data = YAML(typ="safe").load((DEPLOY / "prometheus-alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_parse_and_use_only_exported_metrics() -> None:
    known = exported_names()
    assert "mailintake_backlog_oldest_age_seconds" in known  # the scan finds the declarations
    rules = alert_rules()
    used = {family(m, known) for rule in rules for m in METRIC.findall(rule["expr"])}
    assert used - known == set(), (
        f"alert rules use metrics sources/metrics.py lacks: {used - known}"
    )
    for needed in ("mailintake_imap_stalled", "mailintake_failed_messages"):
        assert needed in used
    assert "mailintake_backlog_oldest_age_seconds" in used
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_the_metric_check_catches_a_misspelt_name() -> None:
    known = exported_names()
    assert family("mailintake_smtp_replies_total", known) in known
    assert family("mailintake_failed_message", known) not in known


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    # The unit names the install folder /srv/mailintake; verify checks that ExecStart exists.
    text = (DEPLOY / "mailintake.service").read_text(encoding="utf-8")
    text = text.replace("/srv/mailintake/.venv/bin", str(MAILINTAKE.parent))
    unit = tmp_path / "mailintake.service"
    unit.write_text(text.replace("/srv/mailintake", str(ROOT)), encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=WAIT_SECONDS
    )
    complaints = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_unit_and_postfix_snippet_are_what_deploy_md_uses() -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for name in ("mailintake.service", "postfix-transport.cf", "prometheus-alerts.yml"):
        assert f"deploy/{name}" in guide
    unit = (DEPLOY / "mailintake.service").read_text(encoding="utf-8")
    assert "Type=notify" in unit and "Restart=on-failure" in unit


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket where `serve` (run by the test as systemd would) reports its state."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(WAIT_SECONDS)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_serve_tells_systemd_ready_then_stopping(
    tmp_path: Path, notify_socket: socket.socket, serve_processes: list[ServeProcess]
) -> None:
    child = ServeProcess(tmp_path, port=0)
    serve_processes.append(child)
    assert notify_socket.recv(256) == b"READY=1"
    child.proc.terminate()
    assert notify_socket.recv(256) == b"STOPPING=1"
    assert child.finish() == 0
