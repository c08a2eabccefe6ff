"""A private Postfix for tests: its own config and queue directories in a temp dir, SMTP on
127.0.0.1 and a free port, relaying every recipient by LMTP to the port it is given (as
docs/deploy.md sets up Postfix in front of mailintake).

Postfix needs root to start (`postfix -c DIR start`: the master binds, then runs its daemons as
the `postfix` user the Debian package created); the Debian package installs the programs. Queue
retries are an hour apart, so a deferred message stays queued until the test flushes it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.dovecot import free_port
from tests.waiting import wait_for

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mta.mailintake.test
mydomain = mailintake.test
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
relay_domains = {domain}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relay_transport = lmtp:inet:127.0.0.1:{lmtp_port}
default_transport = lmtp:inet:127.0.0.1:{lmtp_port}
queue_run_delay = 1h
minimal_backoff_time = 1h
maximal_backoff_time = 1h
smtputf8_enable = no
biff = no
"""

# master.cf without chroot (the temp dir holds no copy of /etc) and with SMTP on our port only.
MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n - 0 cleanup
qmgr       unix  n - n 300 1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n - - trivial-rewrite
bounce     unix  - - n - 0 bounce
defer      unix  - - n - 0 bounce
trace      unix  - - n - 0 bounce
verify     unix  - - n - 1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n - - proxymap
smtp       unix  - - n - - smtp
relay      unix  - - n - - smtp
showq      unix  n - n - - showq
error      unix  - - n - - error
retry      unix  - - n - - error
discard    unix  - - n - - discard
lmtp       unix  - - n - - lmtp
anvil      unix  - - n - 1 anvil
scache     unix  - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def unavailable_reason() -> str | None:
    """Why a private Postfix cannot run here, or None if it can."""
    if not Path(POSTFIX).is_file():
        return f"no postfix at {POSTFIX} (install the postfix package)"
    if os.geteuid() != 0:
        return "a private Postfix needs root to start (postfix start); run the tests as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "the `postfix` system user is missing (install the postfix package)"
    return None


class Postfix:
    """One Postfix instance under `root`, relaying mail for `domain` to LMTP on `lmtp_port`."""

    def __init__(self, lmtp_port: int, domain: str) -> None:
        # Not in pytest's tmp_path: its base folder is private to root, and the master takes
        # its lock in data_directory as `postfix`, who must reach it.
        self.root = root = Path(tempfile.mkdtemp(prefix="mailintake-postfix-"))
        root.chmod(0o755)
        self.etc = root / "etc"
        self.port = free_port()
        self.started = False
        for folder in ("etc", "queue", "data"):
            (root / folder).mkdir(parents=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(root / "data", postfix.pw_uid, postfix.pw_gid)
        (self.etc / "main.cf").write_text(
            MAIN_CF.format(root=root, domain=domain, lmtp_port=lmtp_port)
        )
        (self.etc / "master.cf").write_text(MASTER_CF.format(smtp_port=self.port))

    def _run(self, *command: str) -> str:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {done.returncode}: {done.stderr}\n{self.log()}"
            )
        return done.stdout

    def start(self) -> None:
        """Start the master and wait until SMTP greets."""
        self._run(POSTFIX, "-c", str(self.etc), "start")
        self.started = True
        wait_for(self._greets, f"postfix to greet on 127.0.0.1:{self.port}")

    def _greets(self) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as client:
                return client.noop()[0] == 250
        except OSError:
            return False

    def stop(self) -> None:
        if self.started:
            self.started = False
            self._run(POSTFIX, "-c", str(self.etc), "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def queue(self) -> list[dict[str, Any]]:
        """The queued messages (`postqueue -j`): queue_name, recipients with delay_reason..."""
        out = self._run(POSTQUEUE, "-c", str(self.etc), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """Attempt delivery of every queued message now (`postqueue -f`)."""
        self._run(POSTQUEUE, "-c", str(self.etc), "-f")

    def send(self, raw: bytes, sender: str, recipient: str) -> None:
        """Submit a message by SMTP; Postfix's 250 means it is queued."""
        with smtplib.SMTP("127.0.0.1", self.port) as client:
            client.sendmail(sender, [recipient], raw)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def delivery_statuses(self) -> list[str]:
        """The `status=` of each delivery attempt the log shows (sent, deferred, bounced)."""
        return [
            line.split("status=", 1)[1].split()[0]
            for line in self.log().splitlines()
            if " status=" in line
        ]
