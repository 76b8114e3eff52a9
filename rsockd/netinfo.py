"""What the host's network looks like: routes, interfaces, addresses, MTUs (Linux, pyroute2).

On macOS the same functions come from ``rsockd.netinfo_darwin`` (``route``, ``ifconfig``).
pyroute2 is imported inside the functions so that ``import rsockd`` works anywhere.
Interface facts come from netlink, not /sys: a daemon placed in a namespace by systemd's
``NetworkNamespacePath=`` still sees the host's sysfs.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass
from typing import Any

from .errors import RsockdError

_DARWIN = sys.platform == "darwin"


@dataclass(frozen=True)
class Route:
    interface: str
    source: str | None
    mtu: int


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def route_to(dest: str) -> Route:
    """The interface and source address the kernel would use to reach ``dest``."""
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.route_to(dest)
    fam = socket.AF_INET6 if ipaddress.ip_address(dest).version == 6 else socket.AF_INET
    with _ipr() as ipr:
        try:
            msgs = ipr.route("get", dst=dest, family=fam)
        except Exception as e:  # pyroute2 raises NetlinkError (an OSError subclass) on no route
            raise RsockdError(f"no route to {dest}: {getattr(e, 'strerror', None) or e}") from None
        if not msgs:
            raise RsockdError(f"no route to {dest}")
        oif = msgs[0].get_attr("RTA_OIF")
        src = msgs[0].get_attr("RTA_PREFSRC")
        name = socket.if_indextoname(oif)
        return Route(name, src, _mtu(ipr, oif))


def _mtu(ipr: Any, index: int) -> int:
    links = ipr.get_links(index)
    return int(links[0].get_attr("IFLA_MTU")) if links else 1500


def interface_mtu(name: str) -> int:
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.interface_mtu(name)
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise RsockdError(f"interface {name} does not exist") from None
    with _ipr() as ipr:
        return _mtu(ipr, index)


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
    with _ipr() as ipr:
        index = socket.if_nametoindex(name)
        return [str(m.get_attr("IFA_ADDRESS")) for m in ipr.get_addr(index=index)]


def interface_of(address: str) -> str | None:
    """The interface holding ``address``, if any."""
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.interface_of(address)
    want = ipaddress.ip_address(address)
    with _ipr() as ipr:
        for m in ipr.get_addr():
            a = m.get_attr("IFA_ADDRESS") or m.get_attr("IFA_LOCAL")
            if a and ipaddress.ip_address(a) == want:
                return socket.if_indextoname(m["index"])
    return None


def default_interfaces() -> list[str]:
    """Interfaces holding a default route (IPv4 first), without duplicates."""
    if _DARWIN:
        from . import netinfo_darwin

        return netinfo_darwin.default_interfaces()
    out: list[str] = []
    with _ipr() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_default_routes(family=fam):
                oif = r.get_attr("RTA_OIF")
                if oif:
                    name = socket.if_indextoname(oif)
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
