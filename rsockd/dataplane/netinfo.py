"""What the host's network looks like: routes, interfaces, addresses, MTUs.

Linux asks rtnetlink directly (``rsockd.rtnl``): pyroute2 would cost the daemon 10 MB of memory,
and interface facts must come from netlink, not /sys (a daemon placed in a namespace by systemd's
``NetworkNamespacePath=`` still sees the host's sysfs).  On macOS the same functions come from
``rsockd.netinfo_darwin`` (``route``, ``ifconfig``).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass

from ..errors import RsockdError
from ..steer.rtnl import Rtnl

_DARWIN = sys.platform == "darwin"


@dataclass(frozen=True)
class Route:
    interface: str
    source: str | None
    mtu: int


def _text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def route_to(dest: str) -> Route:
    """The interface and source address the kernel would use to reach ``dest``."""
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.route_to(dest)
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
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.interface_mtu(name)
    with Rtnl() as nl:
        link = nl.link(name)
    if link is None:
        raise RsockdError(f"interface {name} does not exist")
    return int(link.mtu) or 1500


def interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def interface_addresses(name: str) -> list[str]:
    """Every address on ``name`` (IPv4 and IPv6, link-local included)."""
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.interface_addresses(name)
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise RsockdError(f"interface {name} does not exist") from None
    with Rtnl() as nl:
        return [_text(a) for _i, a in nl.addresses(index)]


def interface_of(address: str) -> str | None:
    """The interface holding ``address``, if any."""
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.interface_of(address)
    want = ipaddress.ip_address(address).packed
    with Rtnl() as nl:
        for index, addr in nl.addresses():
            if addr == want:
                return socket.if_indextoname(index)
    return None


def default_interfaces() -> list[str]:
    """Interfaces holding a default route (IPv4 first), without duplicates."""
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.default_interfaces()
    out: list[str] = []
    with Rtnl() as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            for index in nl.default_route_links(family):
                name = socket.if_indextoname(index)
                if name not in out:
                    out.append(name)
    return out


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
