"""Host facts that are the same on every platform: the ``Route`` record both ``netinfo``
implementations return, name resolution and whether an interface exists.

Kept apart so ``netinfo`` (Linux) and ``netinfo_darwin`` (macOS) share them without importing
each other; ``rsockd.dataplane.platform`` exports them with the platform's own functions.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ..errors import RsockdError


@dataclass(frozen=True)
class Route:
    """How the host reaches a destination: the outgoing interface, the source address the
    kernel picks (None when it names none) and the path's MTU."""

    interface: str
    source: str | None
    mtu: int


def interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def resolve(host: str, family: int = 0) -> str:
    """An IP literal for ``host`` (IP literals are returned as they are)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise RsockdError(f"cannot resolve {host}: {e.strerror}") from None
    return str(infos[0][4][0])
