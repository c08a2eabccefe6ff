"""systemd's readiness protocol (sd_notify) for `Type=notify` units, without libsystemd: one
datagram to the socket systemd names in $NOTIFY_SOCKET. Outside systemd it does nothing."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    """Send `state` (`READY=1`, `STOPPING=1`) when run by systemd; a lost one is logged."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot tell systemd %s at %s: %s", state, address, exc)
