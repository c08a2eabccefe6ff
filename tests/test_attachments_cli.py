"""`attachments list TICKET` and `attachments save ID`: the FAX's PDF comes out byte for byte."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli import app
from tests.conftest import DATA


def test_the_fax_pdf_is_listed_and_saved_byte_for_byte(tmp_path, db_url, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(f"database: {{url: '{db_url}'}}\n", encoding="utf-8")

    def run(*args: str):
        return CliRunner().invoke(app, ["--config", str(config), *args])

    assert run("ingest", str(DATA / "fax-gateway-pdf.eml")).exit_code == 0
    listed = run("attachments", "list", "INQ-1", "--json")
    assert listed.exit_code == 0, listed.output
    (pdf,) = [a for a in json.loads(listed.stdout) if a["content_type"] == "application/pdf"]

    target = tmp_path / "fax.pdf"
    assert run("attachments", "save", str(pdf["id"]), "-o", str(target)).exit_code == 0
    content = target.read_bytes()
    assert content.startswith(b"%PDF") and len(content) == pdf["size"]
    refused = run("attachments", "save", str(pdf["id"]), "-o", str(target))
    assert refused.exit_code == 2 and "--force" in refused.output

    monkeypatch.chdir(tmp_path)
    assert run("attachments", "save", str(pdf["id"])).exit_code == 0
    assert (tmp_path / pdf["filename"]).read_bytes() == content
    assert run("attachments", "save", "999").exit_code == 1
    assert run("attachments", "list", "INQ-99").exit_code == 1
