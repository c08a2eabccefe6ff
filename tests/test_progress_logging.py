"""While `ingest` shows its progress bar on a terminal, log lines are printed above the bar by
its console instead of being written through it; afterwards they go to stderr again."""

from __future__ import annotations

import io
import logging
import sys

from rich.console import Console

import cli


def test_log_lines_go_through_the_bar_console_while_it_is_shown(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=100))
    plain_stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain_stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setattr(root, "level", logging.INFO)
    try:
        with cli.progress_bar("ingesting") as bar:
            task = bar.add_task("ingest", total=2)
            logging.getLogger("pipeline.process").info("message 1 <a@example.com>: ticket")
            bar.advance(task)
        assert handler.stream is plain_stderr  # given back when the bar ends
        logging.getLogger("pipeline.process").info("after the bar")
    finally:
        root.removeHandler(handler)
    assert "INFO pipeline.process: message 1 <a@example.com>: ticket" in screen.getvalue()
    assert "message 1" not in plain_stderr.getvalue()
    assert "after the bar" in plain_stderr.getvalue()
