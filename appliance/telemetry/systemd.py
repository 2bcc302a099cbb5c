"""systemd's notify protocol without a dependency: one datagram per message to $NOTIFY_SOCKET (RELIABILITY 13.6).

READY=1 once every model is ready, WATCHDOG=1 from the event loop while the workers make progress (so a
blocked loop or a stuck pool gets the service restarted), EXTEND_TIMEOUT_USEC during a slow start, and
STOPPING=1 when the drain begins. Without NOTIFY_SOCKET nothing is sent and nothing fails.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # A leading '@' names an abstract socket, which the kernel spells with a NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_seconds: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1_000_000
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            if self._socket is None:
                # Non-blocking: sent from the event loop, and a manager that stops reading its socket must not
                # stop the server (a full socket drops this message, with a warning).
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:
            log.warning("systemd notify failed: %s", error)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
