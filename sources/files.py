"""Reading messages from files for backfill and MTA pipes: .eml, directories, mbox, Maildir, stdin.

Everything streams: an mbox is indexed, then read one message at a time.
"""

from __future__ import annotations

import mailbox
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.mail import Envelope
from storage.states import Source

STDIN = "-"


@dataclass(frozen=True)
class FileMessage:
    raw: bytes
    origin: str  # where it came from, for logs and the envelope: path, path#key, or stdin
    source: Source

    def envelope(self) -> Envelope:
        return Envelope(source=self.source, extra={"origin": self.origin})


def is_maildir(path: Path) -> bool:
    return path.is_dir() and all((path / sub).is_dir() for sub in ("cur", "new", "tmp"))


def is_mbox(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(5) == b"From "


class MessageSource:
    """The messages behind one CLI argument; `len()` is known before reading any of them.

    In a plain directory every file matching `glob` (recursively) is one message.
    """

    def __init__(self, spec: str, glob: str = "*") -> None:
        self.spec = spec
        self.path = Path(spec)
        if spec != STDIN and not self.path.exists():
            raise FileNotFoundError(f"{spec}: no such file or directory")
        self._mailbox: mailbox.Mailbox | None = None  # type: ignore[type-arg]
        self._files: list[Path] = []
        if spec == STDIN:
            return
        if is_maildir(self.path):
            self._mailbox = mailbox.Maildir(self.path, create=False)
        elif self.path.is_dir():
            self._files = sorted(p for p in self.path.rglob(glob) if p.is_file())
        elif is_mbox(self.path):
            self._mailbox = mailbox.mbox(self.path, create=False)
        else:
            self._files = [self.path]

    def __len__(self) -> int:
        if self.spec == STDIN:
            return 1
        return len(self._mailbox) if self._mailbox is not None else len(self._files)

    def __iter__(self) -> Iterator[FileMessage]:
        if self.spec == STDIN:
            yield FileMessage(sys.stdin.buffer.read(), "stdin", Source.STDIN)
        elif self._mailbox is not None:
            try:
                for key in self._mailbox.iterkeys():
                    yield FileMessage(
                        self._mailbox.get_bytes(key), f"{self.spec}#{key}", Source.FILE
                    )
            finally:
                self._mailbox.close()
        else:
            for path in self._files:
                yield FileMessage(path.read_bytes(), str(path), Source.FILE)
