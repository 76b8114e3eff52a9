"""systemd notifications (sd_notify(3)) through ``sdnotify``; a no-op without NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

LOG = logging.getLogger(__name__)


class Notifier:
    """READY/RELOADING/STOPPING/STATUS/WATCHDOG for a ``Type=notify`` service."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._n: Any = None
        if env.get("NOTIFY_SOCKET"):
            try:
                import sdnotify

                self._n = sdnotify.SystemdNotifier()
                if self._n.socket is not None:
                    # Never block the event loop on a slow reader: a lost STATUS is harmless.
                    self._n.socket.setblocking(False)
            except ImportError:
                LOG.warning("NOTIFY_SOCKET is set but the sdnotify module is missing")
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_usec = int(usec) if usec and usec.isdigit() and (not pid or pid == str(os.getpid())) else 0
        self._status = ""

    @property
    def enabled(self) -> bool:
        return self._n is not None

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> None:
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half of WATCHDOG_USEC (sd_watchdog_enabled(3))."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None
