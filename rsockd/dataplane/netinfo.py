"""What the host's network looks like: routes, interfaces, addresses, MTUs.

Linux asks rtnetlink directly (``rsockd.rtnl``): pyroute2 would cost the daemon 10 MB of memory,
and interface facts must come from netlink, not /sys (a daemon placed in a namespace by systemd's
``NetworkNamespacePath=`` still sees the host's sysfs).  ``netinfo_darwin`` has the same
functions for macOS; ``rsockd.dataplane.platform`` picks one of the two (import from there).
"""

from __future__ import annotations

import ipaddress
import socket

from ..core.packet import family_of
from ..errors import RsockdError
from ..steer.rtnl import Rtnl

# Re-exported for the callers that still import them from here (rsockd.dataplane.platform is
# where they belong).
from .netcommon import Route as Route
from .netcommon import interface_exists as interface_exists
from .netcommon import resolve as resolve


def _text(packed: bytes) -> str:
    return socket.inet_ntop(family_of(packed), packed)


def route_to(dest: str) -> Route:
    """The interface and source address the kernel would use to reach ``dest``."""
    packed = ipaddress.ip_address(dest).packed
    with Rtnl() as nl:
        try:
            info = nl.route_get(packed)
        except OSError as e:
            raise RsockdError(f"no route to {dest}: {e.strerror}") from None
        if info is None:
            raise RsockdError(f"no route to {dest}")
        link = nl.link(index=info.oif)  # one link, not a dump: the client asks every second
        if link is None:
            raise RsockdError(f"interface index {info.oif} disappeared")
        return Route(link.name, _text(info.prefsrc) if info.prefsrc else None, link.mtu or 1500)


def interface_mtu(name: str) -> int:
    with Rtnl() as nl:
        link = nl.link(name)
    if link is None:
        raise RsockdError(f"interface {name} does not exist")
    return int(link.mtu) or 1500


def interface_addresses(name: str) -> list[str]:
    """Every address on ``name`` (IPv4 and IPv6, link-local included)."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise RsockdError(f"interface {name} does not exist") from None
    with Rtnl() as nl:
        return [_text(a) for _i, a in nl.addresses(index)]


def interface_of(address: str) -> str | None:
    """The interface holding ``address``, if any."""
    want = ipaddress.ip_address(address).packed
    with Rtnl() as nl:
        for index, addr in nl.addresses():
            if addr == want:
                return socket.if_indextoname(index)
    return None


def default_interfaces() -> list[str]:
    """Interfaces holding a default route (IPv4 first), without duplicates."""
    out: list[str] = []
    with Rtnl() as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            for index in nl.default_route_links(family):
                name = socket.if_indextoname(index)
                if name not in out:
                    out.append(name)
    return out
