"""Bounds on the work for one hostile input: process CPU time, enforced by a profiling timer
so that a runaway parse is stopped rather than waited for, and the peak of Python's allocations.

These bound hostile input only; no test asserts the speed of normal operation.
"""

from __future__ import annotations

import signal
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from ingest.mail import ParsedMail


class CPUTimeExceeded(BaseException):
    """Raised in the parse that used up its CPU time. A BaseException, so that no `except
    Exception` in the parser can take it for a defect."""


@dataclass
class Usage:
    cpu: float = 0.0  # seconds
    peak: int = 0  # bytes allocated at most, while measured


@contextmanager
def bounded(cpu_seconds: float, measure_memory: bool = False) -> Iterator[Usage]:
    """Stop the block with CPUTimeExceeded once it has used `cpu_seconds` of process CPU time;
    the usage is filled in when the block ends."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise CPUTimeExceeded(f"over {cpu_seconds} s of CPU time")

    usage = Usage()
    previous = signal.signal(signal.SIGPROF, stop)
    started_tracing = measure_memory and not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    elif measure_memory:
        tracemalloc.reset_peak()
    start = time.process_time()
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        yield usage
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        usage.cpu = time.process_time() - start
        if measure_memory:
            usage.peak = tracemalloc.get_traced_memory()[1]
        if started_tracing:
            tracemalloc.stop()


def assert_storable(parsed: ParsedMail) -> None:
    """Every text the pipeline stores is valid Unicode without NUL (PostgreSQL refuses both)."""
    texts = [
        parsed.subject,
        parsed.text,
        parsed.html or "",
        parsed.from_name or "",
        parsed.from_email or "",
        parsed.message_id or "",
        *parsed.to,
        *parsed.cc,
        *parsed.in_reply_to,
        *parsed.references,
        *parsed.defects,
        *(text for header in parsed.headers for text in header),
    ]
    for attachment in parsed.attachments:
        texts += [
            attachment.filename,
            attachment.original_filename or "",
            attachment.content_type,
            attachment.content_id or "",
        ]
    for text in texts:
        text.encode("utf-8")  # raises on a lone surrogate
        assert "\x00" not in text, text[:200]


SAFETY_NET = "part not read ("  # the walker's defect for an exception it did not expect


def assert_no_safety_net(parsed: ParsedMail) -> None:
    """Each known hostile input has its own defect; the walker's catch-all must not be needed."""
    assert not [d for d in parsed.defects if SAFETY_NET in d], parsed.defects
