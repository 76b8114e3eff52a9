"""Logging set-up (stderr; journald adds time and unit) and a per-key rate limiter."""

from __future__ import annotations

import logging
import sys
import time


def setup(level: str, prefix: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    # journald timestamps lines itself; a terminal user still wants to see the level.
    handler.setFormatter(logging.Formatter(f"%(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimit:
    """Allows one event per ``interval`` seconds per key; counts what it suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) >= self.interval:
            self._last[key] = now
            return True
        self.suppressed[key] = self.suppressed.get(key, 0) + 1
        return False
