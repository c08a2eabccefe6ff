"""Hot reload: the rules and the source templates in force, each swapped whole when its file
changes or on SIGHUP.

A file that fails validation is refused and logged; the last good version keeps working. Routers
and the extract stage take `holder.current()` once per message, and the swap is one attribute
assignment, so every message is handled with exactly one version, never a half-loaded file.
Versions are the sha256 of the file's bytes; logs show the first 12 hex digits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

import watchfiles

from config import ConfigError
from ingest.extract import NO_FILE, Template, read_templates
from rules.engine import CompiledRules
from rules.load import RulesError, load_rules

log = logging.getLogger(__name__)


class RulesHolder:
    """The compiled rules in force, and the error of the last refused reload (if any)."""

    def __init__(self, path: Path, rules: CompiledRules, zone: ZoneInfo) -> None:
        self.path = path
        self.zone = zone
        self.authserv_id = rules.authserv_id  # from the configuration, which never reloads
        self._rules = rules
        self._lock = threading.Lock()  # one reload at a time; readers never wait
        self.last_error: str | None = None

    @classmethod
    def load(cls, path: Path, zone: ZoneInfo, authserv_id: str | None = None) -> RulesHolder:
        """Load the initial rules; a bad file raises RulesError (nothing to fall back on)."""
        return cls(path, load_rules(path, zone, authserv_id), zone)

    def current(self) -> CompiledRules:
        return self._rules

    def reload(self) -> bool:
        """Read the file again; True if a new version is now in force."""
        with self._lock:
            old = self._rules
            try:
                new = load_rules(self.path, self.zone, self.authserv_id)
            except RulesError as exc:
                self.last_error = str(exc)
                log.error("rules file refused, rules %s stay in force:\n%s", old.version[:12], exc)
                return False
            refused_before, self.last_error = self.last_error, None
            if new.version == old.version:
                if refused_before is not None:
                    log.info("rules %s back in force from %s", new.version[:12], self.path)
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

    def describe(self) -> str:
        return f"rules {self._rules.version[:12]}"


class TemplatesHolder:
    """The source templates in force, and the error of the last refused reload (if any)."""

    def __init__(self, path: Path, templates: list[Template], version: str, required: bool):
        self.path = path
        self.required = required  # False: the default path, never configured; absent is fine
        self._templates = templates
        self.version = version
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @classmethod
    def load(cls, path: Path, *, required: bool = True) -> TemplatesHolder:
        """Load the initial templates; a bad file raises ConfigError (nothing to fall back on)."""
        templates, version = read_templates(path, required=required)
        return cls(path, templates, version, required)

    def current(self) -> list[Template]:
        return self._templates

    def reload(self) -> bool:
        """Read the file again; True if a new version is now in force."""
        with self._lock:
            old = self.version
            try:
                templates, version = read_templates(self.path, required=self.required)
            except ConfigError as exc:
                self.last_error = str(exc)
                log.error("templates file refused, templates %s stay in force:\n%s", old[:12], exc)
                return False
            refused_before, self.last_error = self.last_error, None
            if version == old:
                if refused_before is not None:
                    log.info("templates %s back in force from %s", version[:12], self.path)
                return False
            self._templates, self.version = templates, version
        log.info(
            "templates %s in force (%d templates, was %s) from %s",
            version[:12],
            len(templates),
            old[:12],
            self.path,
        )
        return True

    def describe(self) -> str:
        return f"templates {self.version[:12]}" + (" (no file)" if self.version == NO_FILE else "")


class Reloadable(Protocol):
    path: Path

    def reload(self) -> bool: ...

    def describe(self) -> str: ...


async def watch_rules(holder: RulesHolder, stop: asyncio.Event, debounce_ms: int = 400) -> None:
    """`watch_files` for the rules alone."""
    await watch_files([holder], stop, debounce_ms)


async def watch_files(
    holders: Sequence[Reloadable], stop: asyncio.Event, debounce_ms: int = 400
) -> None:
    """Reload a holder when its file changes, and all on SIGHUP, until `stop` is set (a `serve`
    task). The versions in force are logged now and on every change.

    The directory is watched, not the file: editors save by writing a new file and renaming it
    over the old one, which a watch on the old file would miss. Loading runs in a thread so the
    event loop keeps serving meanwhile.
    """
    loop = asyncio.get_running_loop()
    targets = {h.path.absolute(): h for h in holders}

    def is_target(_change: watchfiles.Change, changed: str) -> bool:
        return Path(changed).absolute() in targets

    def reload_all() -> None:
        for holder in holders:
            holder.reload()

    hup = _handle_sighup(loop, reload_all)
    running = ", ".join(h.describe() for h in holders)
    watched = ", ".join(str(t) for t in targets)
    log.info("%s in force; watching %s%s", running, watched, " (or send SIGHUP)" if hup else "")
    try:
        async for changes in watchfiles.awatch(
            *{t.parent for t in targets},
            watch_filter=is_target,
            debounce=debounce_ms,
            stop_event=stop,
            recursive=False,
        ):
            changed = {Path(path).absolute() for _change, path in changes}
            for target, holder in targets.items():
                if target in changed:
                    await asyncio.to_thread(holder.reload)
    finally:
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)


def _handle_sighup(loop: asyncio.AbstractEventLoop, reload: Callable[[], None]) -> bool:
    """Reload on SIGHUP; only possible in the main thread's loop (tests run serve in others)."""
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload))
    except (RuntimeError, ValueError):
        return False
    return True
