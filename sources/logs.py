"""Log lines on stderr, one per event: human text (the default) or JSON, one object per line.

`--log-format json` (or `log.format: json`) writes each record as
`{"time", "level", "logger", "process", "message"}`, plus the structured fields a line was given
with `extra=` (`inbound_id` and `message_id` on every line about a message) and `exception` (the
traceback) when there is one. Worker processes log the same way (`setup` in each).

What is logged at INFO never holds a secret or a message body: lines name the peer, the
Message-ID, the size and the ledger id; passwords and tokens are never formatted into lines, and
database errors never quote parameters (storage/db.py).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("human", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_NOT_FIELDS = {"color_message"}  # uvicorn's coloured copy of the message

_current = "human"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _NOT_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record is emitted, so a thread that outlives a
    swapped stderr (a test runner's capture) never writes to a closed stream."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup(log_format: str, level: int, human_format: str = HUMAN_FORMAT) -> None:
    """Send log records of `level` and above to stderr in `log_format` ("human" or "json")."""
    global _current
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = StderrHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(human_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aiosmtpd logs every command at INFO, with the client's bytes: our own lines say what counts.
    logging.getLogger("mail.log").setLevel(logging.WARNING if level > logging.DEBUG else level)
    _current = log_format


def current_format() -> str:
    """The format `setup` was last called with (worker processes are given the same)."""
    return _current
