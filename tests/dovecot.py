"""A private Dovecot IMAP server for tests: 127.0.0.1, a free port, everything in a temp dir.

Given a certificate, it also serves TLS on a second port and offers STARTTLS on the first.
Users live in a passwd-file (Dovecot re-reads it when it changes, so tests add users while the
server runs) and mail in Maildirs under the same temp dir. Started as root (the usual CI
container), Dovecot runs its processes as the `dovecot`/`dovenull` users the package created and
stores mail as `dovecot`; started as anybody else, everything runs as that user.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.waiting import wait_for

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
STOP_TIMEOUT = 5.0  # then SIGKILL
# Ports come from below Linux's ephemeral range (32768 and up), so no client connection's local
# port can take a stopped server's port before it starts again; each is checked free first, and
# a start that still finds its port taken (a parallel test run chose it too) tries others.
PORTS = range(20000, 32000)
START_ATTEMPTS = 5

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailintake-test-{port}
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2
auth_failure_delay = 0
default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = {mail_uid}
last_valid_uid = {mail_uid}
mail_location = maildir:{root}/mail/%u
mailbox_idle_check_interval = 1 secs
imap_idle_notify_interval = 1 mins

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
  # No growing delay after failed logins: tests fail logins on purpose.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

SSL_ON = """\
ssl = yes
ssl_cert = <{root}/tls-cert.pem
ssl_key = <{root}/tls-key.pem
"""


def unavailable_reason() -> str | None:
    """Why Dovecot cannot run here, or None if it can."""
    if not Path(DOVECOT).is_file():
        return f"no dovecot binary at {DOVECOT} (install the dovecot-imapd package)"
    version = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True, check=False)
    if version.returncode != 0 or not version.stdout.startswith("2.3"):
        return f"{DOVECOT} is not Dovecot 2.3 ({version.stdout.strip() or version.stderr.strip()})"
    if os.geteuid() == 0 and not _user_exists("dovecot"):
        return "running as root but the `dovecot` system user is missing"
    return None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def free_port(avoid: tuple[int, ...] = ()) -> int:
    """A port on 127.0.0.1 outside the ephemeral range that nothing listens on now."""
    while True:
        port = random.choice(PORTS)
        if port in avoid:
            continue
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Dovecot binds
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class Dovecot:
    """One Dovecot instance; `start()`/`stop()` may be called repeatedly (same port, same mail).

    `tls` is (certificate chain, private key), both PEM: then `tls_port` serves implicit TLS
    and `port` offers STARTTLS (plain-text login stays allowed there, for test helpers).
    """

    def __init__(self, tls: tuple[bytes, bytes] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailintake-dovecot-"))
        self.tls = tls
        self.port = self.tls_port = 0
        self.started_once = False
        self.process: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            mail_user = pwd.getpwnam("dovecot")
            internal_user = "dovecot"
            login_user = "dovenull" if _user_exists("dovenull") else "dovecot"
        else:
            mail_user = pwd.getpwuid(os.geteuid())
            internal_user = login_user = mail_user.pw_name
        self.uid, self.gid = mail_user.pw_uid, mail_user.pw_gid
        self.root.chmod(0o755)
        (self.root / "mail").mkdir()
        os.chown(self.root / "mail", self.uid, self.gid)
        (self.root / "users").write_text("")
        if tls:
            (self.root / "tls-cert.pem").write_bytes(tls[0])
            (self.root / "tls-key.pem").write_bytes(tls[1])
        self.config = self.root / "dovecot.conf"
        self._users = (internal_user, login_user)
        self._choose_ports()

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.tls_port = free_port(avoid=(self.port,)) if self.tls else 0
        internal_user, login_user = self._users
        self.config.write_text(
            CONFIG.format(
                root=self.root,
                port=self.port,
                tls_port=self.tls_port,
                ssl=SSL_ON.format(root=self.root) if self.tls else "ssl = no",
                internal_user=internal_user,
                login_user=login_user,
                mail_uid=self.uid,
            )
        )

    def add_user(self, name: str, password: str) -> None:
        with (self.root / "users").open("a") as users:
            users.write(f"{name}:{password}:{self.uid}:{self.gid}::{self.root}/mail/{name}::\n")

    def start(self) -> None:
        """Start and wait until it greets; the first start moves to other ports if its are
        taken (later starts keep them: clients know them)."""
        for _attempt in range(START_ATTEMPTS):
            failure = self._start()
            if failure is None:
                self.started_once = True
                return
            if self.started_once or "Address already in use" not in failure:
                break
            self._choose_ports()
        raise RuntimeError(f"dovecot did not start on 127.0.0.1:{self.port}: {failure}")

    def _start(self) -> str | None:
        """None once the server greets; why not if it exits first."""
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stop() ends every child too
        )
        process = self.process
        try:
            wait_for(
                lambda: process.poll() is not None or self._greets(),
                f"dovecot to greet on 127.0.0.1:{self.port}",
            )
        except AssertionError as exc:
            self.stop()  # its stderr is closed then: the log tells why
            return f"{exc}: {self.log()[-2000:]}"
        if process.poll() is not None:
            return f"it exited: {self._failure()}"
        return None

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(100).startswith(b"* OK")
        except OSError:
            return False

    def log(self) -> str:
        """What Dovecot logged so far (logins, with `TLS` when the session is encrypted)."""
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _failure(self) -> str:
        """What the exited server said on stderr and in its log."""
        pipe = self.process.stderr if self.process else None
        stderr = ""
        if pipe is not None and not pipe.closed:
            stderr = pipe.read().decode(errors="replace")
            pipe.close()
        return (stderr + self.log())[-2000:]

    def stop(self) -> None:
        """Stop the server and every process of it, so clients see their connections drop (a
        plain SIGTERM to the master leaves running imap processes serving their clients)."""
        if self.process is None or self.process.returncode is not None:
            return
        group = self.process.pid
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _group_alive(group):
            if time.monotonic() > deadline:
                os.killpg(group, signal.SIGKILL)
            time.sleep(0.02)
            self.process.poll()
        self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
