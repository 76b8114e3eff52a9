"""The process's effective capabilities (Linux, ``/proc/self/status``; see capabilities(7))."""

from __future__ import annotations

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21
CAP_BPF = 39


def effective_caps() -> int:
    """The ``CapEff`` bit set; 0 where it cannot be read (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def has(cap: int) -> bool:
    return bool(effective_caps() >> cap & 1)
