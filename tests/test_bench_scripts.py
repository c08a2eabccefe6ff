"""Every bench/ script still starts (its imports resolve and `--help` prints its usage): the
benchmarks are run by hand, so without this a moved module breaks one unnoticed, as
bench/parse_bench.py once was. (Modules the scripts share, such as the corpus generators, are
imported by them.) Nothing is timed here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_starts(script):
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
