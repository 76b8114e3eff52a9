"""What the host's network looks like: links, addresses, routes, neighbours, MTUs.

Linux: asked through ``rsockd.netlink.Host`` (pyroute2).  Interface facts must come from netlink,
not /sys: a daemon placed in a namespace by systemd's ``NetworkNamespacePath=`` still sees the
host's sysfs.  ``netinfo_darwin`` has the same functions for macOS; ``rsockd.dataplane.platform``
picks one of the two (import from there).
"""

from __future__ import annotations

import ipaddress
import socket

from ..errors import RsockdError
from ..netlink import Host, text_address
from .netcommon import Route


def route_to(dest: str) -> Route:
    """The interface and source address the kernel would use to reach ``dest``."""
    packed = ipaddress.ip_address(dest).packed
    try:
        with Host() as host:
            info = host.route_get(packed)
            if info is None:
                raise RsockdError(f"no route to {dest}")
            link = host.link(index=info.oif)  # one link, not a dump: the client asks on every change
    except OSError as e:
        raise RsockdError(f"no route to {dest}: {e.strerror}") from None
    if link is None:
        raise RsockdError(f"interface index {info.oif} disappeared")
    # The route's MTU (a metric, a learnt path MTU) before the link's: the kernel's advertised MSS
    # follows it.
    return Route(link.name, text_address(info.prefsrc) if info.prefsrc else None, info.mtu or link.mtu or 1500)


def interface_mtu(name: str) -> int:
    with Host() as host:
        link = host.link(name)
    if link is None:
        raise RsockdError(f"interface {name} does not exist")
    return int(link.mtu) or 1500


def interface_addresses(name: str) -> list[str]:
    """Every address on ``name`` (IPv4 and IPv6, link-local included)."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise RsockdError(f"interface {name} does not exist") from None
    with Host() as host:
        return [text_address(a) for _i, a in host.addresses(index)]


SIOCETHTOOL = 0x8946
ETHTOOL_GGRO = 0x2B  # <linux/ethtool.h>: get the GRO flag (struct ethtool_value)


def interface_gro(name: str) -> bool | None:
    """Whether ``name`` coalesces what it receives (GRO, ``ethtool -k``: generic-receive-offload):
    a server then reads a connection's segments in runs (docs/design.md, "Tags four at a time").
    None: the kernel would not say (no such interface, no permission)."""
    import ctypes
    import fcntl
    import struct

    value = (ctypes.c_uint32 * 2)(ETHTOOL_GGRO, 0)  # struct ethtool_value: cmd, data
    ifreq = struct.pack("16sP", name.encode()[:15], ctypes.addressof(value)).ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
    except OSError:
        return None
    return bool(value[1])


def interface_of(address: str) -> str | None:
    """The interface holding ``address``, if any."""
    want = ipaddress.ip_address(address).packed
    with Host() as host:
        for index, addr in host.addresses():
            if addr == want:
                return socket.if_indextoname(index)
    return None


def default_interfaces() -> list[str]:
    """Interfaces holding a default route (IPv4 first), without duplicates."""
    out: list[str] = []
    with Host() as host:
        for family in (socket.AF_INET, socket.AF_INET6):
            for index in host.default_route_links(family):
                name = socket.if_indextoname(index)
                if name not in out:
                    out.append(name)
    return out
