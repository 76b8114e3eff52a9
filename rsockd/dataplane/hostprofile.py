"""The host's own TCP/IP settings, read for rsockd's segments to copy (rsockd/core/tcpprofile.py).

Linux: the sysctls of the daemon's network namespace (``/proc/sys`` is per namespace for these)
and the route's metrics.  macOS: a Darwin profile (XNU's SYN and SYN-ACK) with what ``sysctl -n``
tells of the host's settings, macOS's defaults for what it cannot (docs/design.md, "Looking like the
host").
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..core.tcpprofile import TcpProfile
from ..netlink import Host

PROC_SYS = Path("/proc/sys")
DEFAULT_TTL = 64  # Linux's ip_default_ttl and IPv6 hop_limit, macOS's net.inet.ip.ttl and ip6.hlim
TTL_CACHE_SECONDS = 5.0
TTL_CACHE_SIZE = 4096


def _sysctl(name: str, root: Path = PROC_SYS) -> list[int] | None:
    """The integers of sysctl ``name`` (dotted), or None when it cannot be read."""
    try:
        return [int(v) for v in (root / name.replace(".", "/")).read_text().split()]
    except (OSError, ValueError):
        return None


def _secret(seed: bytes, root: Path) -> bytes:
    """The timestamp secret: the same in every process of one instance (a client's connections
    through several workers show one clock) until the host reboots, as the kernel's is; unknown
    to a remote observer (the boot id is random per boot, and only local users can read it)."""
    try:
        boot = (root / "kernel/random/boot_id").read_bytes()
    except OSError:
        boot = os.urandom(16)
    return hashlib.blake2b(seed + b"\0" + boot, digest_size=16, person=b"rsockd-tcp-ts").digest()


def darwin_sysctl(name: str) -> int | None:
    """An integer sysctl of macOS (``sysctl -n``), or None when it cannot be read."""
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def darwin_tcp_profile(secret: bytes, read: Callable[[str], int | None] = darwin_sysctl) -> TcpProfile:
    """macOS's TCP as XNU sets it up: ``net.inet.tcp.rfc1323`` (window scale and timestamps),
    ``sack``, ``win_scale_factor``, ``recvspace`` and ``autorcvbufmax``; macOS's default for each
    that ``read`` cannot give."""
    def get(name: str) -> int | None:
        got = read(f"net.inet.tcp.{name}")
        return got if got is not None and got >= 0 else None

    settings: dict[str, bool | int] = {}
    if (rfc1323 := get("rfc1323")) is not None:
        settings["window_scaling"] = settings["timestamps"] = rfc1323 != 0
    if (sack := get("sack")) is not None:
        settings["sack"] = sack != 0
    for name, setting in (("win_scale_factor", "win_scale_factor"), ("recvspace", "rmem_default"),
                          ("autorcvbufmax", "rmem_max")):
        if (value := get(name)) is not None:
            settings[setting] = value
    return TcpProfile.darwin(secret=secret, **settings)


def tcp_profile(seed: bytes = b"", root: Path = PROC_SYS) -> TcpProfile:
    """The host's TCP settings; a value that cannot be read keeps the platform's default.
    ``seed`` (the instance's key) keys the timestamp clocks."""
    base = TcpProfile(secret=_secret(seed, root))
    if sys.platform == "darwin":
        return darwin_tcp_profile(base.secret)
    if sys.platform != "linux":
        return base

    def one(name: str, default: int) -> int:
        got = _sysctl(name, root)
        return got[0] if got else default

    rmem = _sysctl("net.ipv4.tcp_rmem", root)
    if not rmem or len(rmem) != 3:
        rmem = [4096, base.rmem_default, base.rmem_max]
    return TcpProfile(
        secret=base.secret,
        rmem_default=rmem[1],
        rmem_max=rmem[2],
        core_rmem_max=one("net.core.rmem_max", base.core_rmem_max),
        window_scaling=one("net.ipv4.tcp_window_scaling", 1) != 0,
        timestamps=one("net.ipv4.tcp_timestamps", 1) != 0,
        sack=one("net.ipv4.tcp_sack", 1) != 0,
        signed_windows=one("net.ipv4.tcp_workaround_signed_windows", 0) != 0,
    )


def default_hop_limit(family: int, ifname: str | None = None, root: Path = PROC_SYS) -> int:
    """The TTL (IPv4) or hop limit (IPv6) the kernel gives a packet whose route sets none."""
    if sys.platform != "linux":
        return DEFAULT_TTL
    if family == socket.AF_INET:
        got = _sysctl("net.ipv4.ip_default_ttl", root)
    else:
        got = (_sysctl(f"net.ipv6.conf.{ifname}.hop_limit", root) if ifname else None) \
            or _sysctl("net.ipv6.conf.default.hop_limit", root)
    return got[0] if got and 0 < got[0] < 256 else DEFAULT_TTL


class HopLimits:
    """TTLs per destination as the kernel's route gives them (its ``hoplimit`` metric, else the
    system's default), looked up through netlink and kept a few seconds: a reset answering a
    stray segment must not cost a route look-up each."""

    def __init__(self, mark: int = 0) -> None:
        self.mark = mark
        self._cache: dict[bytes, tuple[int, float]] = {}
        self._nl: Host | None = None  # one netlink socket for every look-up

    def __call__(self, dst: bytes) -> int:
        now = time.monotonic()
        hit = self._cache.get(dst)
        if hit is not None and hit[1] > now:
            return hit[0]
        ttl = self._lookup(dst)
        if len(self._cache) >= TTL_CACHE_SIZE:
            self._cache.clear()
        self._cache[dst] = (ttl, now + TTL_CACHE_SECONDS)
        return ttl

    def _lookup(self, dst: bytes) -> int:
        family = socket.AF_INET if len(dst) == 4 else socket.AF_INET6
        if sys.platform != "linux":
            return DEFAULT_TTL
        ifname = None
        try:
            if self._nl is None:
                self._nl = Host()
            info = self._nl.route_get(dst, self.mark)
            if info is not None and info.hoplimit:
                return info.hoplimit
            if info is not None and family == socket.AF_INET6:
                ifname = socket.if_indextoname(info.oif)
        except OSError:
            self.close()  # a fresh socket next time
        return default_hop_limit(family, ifname)

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None
