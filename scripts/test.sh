#!/usr/bin/env bash
# The whole test suite on a fresh machine: makes .venv, installs mailintake with its test extra
# and the system packages the tests run for real (Dovecot, Postfix's smtp-source), then runs
# ruff, mypy and pytest (on up to 2 xdist workers). Tests that cannot run here skip with the
# reason.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v dovecot >/dev/null || missing+=(dovecot-imapd)
  command -v smtp-source >/dev/null || missing+=(postfix)
  command -v chromedriver >/dev/null || missing+=(chromium chromium-driver)  # tests/test_web_browser.py
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
# Two xdist workers (fewer on a 1-core machine): tests that share nothing run side by side;
# PYTEST_WORKERS=0 runs them in this one process.
workers="${PYTEST_WORKERS:-$(nproc)}"
if [ "$workers" -gt 2 ]; then workers=2; fi
exec .venv/bin/pytest -n "$workers" "$@"
