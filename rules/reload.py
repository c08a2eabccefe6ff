"""Hot reload: the rules in force, swapped whole when the file changes or on SIGHUP.

A file that fails validation is refused and logged; the last good rules keep routing. Routers
take `holder.current()` once per message, and the swap is one attribute assignment, so every
message is routed with exactly one version, never a half-loaded file.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from zoneinfo import ZoneInfo

import watchfiles

from rules.engine import CompiledRules
from rules.load import RulesError, load_rules

log = logging.getLogger(__name__)


class RulesHolder:
    """The compiled rules in force, and the error of the last refused reload (if any)."""

    def __init__(self, path: Path, rules: CompiledRules, zone: ZoneInfo) -> None:
        self.path = path
        self.zone = zone
        self._rules = rules
        self._lock = threading.Lock()  # one reload at a time; readers never wait
        self.last_error: str | None = None

    @classmethod
    def load(cls, path: Path, zone: ZoneInfo) -> RulesHolder:
        """Load the initial rules; a bad file raises RulesError (nothing to fall back on)."""
        return cls(path, load_rules(path, zone), zone)

    def current(self) -> CompiledRules:
        return self._rules

    def reload(self) -> bool:
        """Read the file again; True if a new version is now in force."""
        with self._lock:
            old = self._rules
            try:
                new = load_rules(self.path, self.zone)
            except RulesError as exc:
                self.last_error = str(exc)
                log.error("rules file refused, rules %s stay in force:\n%s", old.version[:12], exc)
                return False
            self.last_error = None
            if new.version == old.version:
                return False
            self._rules = new
        log.info(
            "rules %s in force (%d rules, was %s) from %s",
            new.version[:12],
            len(new.rules),
            old.version[:12],
            self.path,
        )
        for warning in new.warnings:
            log.warning("%s", warning)
        return True


async def watch_rules(holder: RulesHolder, stop: asyncio.Event, debounce_ms: int = 400) -> None:
    """Reload when the rules file changes or on SIGHUP, until `stop` is set (a `serve` task).

    The directory is watched, not the file: editors save by writing a new file and renaming it
    over the old one, which a watch on the old file would miss. Loading runs in a thread so the
    event loop keeps serving meanwhile.
    """
    loop = asyncio.get_running_loop()
    target = holder.path.absolute()

    def is_target(_change: watchfiles.Change, changed: str) -> bool:
        return Path(changed).name == target.name

    hup = _handle_sighup(loop, holder)
    log.info("watching %s for rule changes%s", target, " (or send SIGHUP)" if hup else "")
    try:
        async for _changes in watchfiles.awatch(
            target.parent,
            watch_filter=is_target,
            debounce=debounce_ms,
            stop_event=stop,
            recursive=False,
        ):
            await asyncio.to_thread(holder.reload)
    finally:
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)


def _handle_sighup(loop: asyncio.AbstractEventLoop, holder: RulesHolder) -> bool:
    """Reload on SIGHUP; only possible in the main thread's loop (tests run serve in others)."""
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, holder.reload))
    except (RuntimeError, ValueError):
        return False
    return True
