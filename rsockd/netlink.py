"""pyroute2 for every netlink question of rsockd: links (with their XDP programs), routes with
a mark, neighbours, addresses.  ``Host`` wraps one ``IPRoute``; pyroute2 is imported on first use
so that ``import rsockd`` works where there is none (macOS).  Used by the steering backends and
by the data plane's host facts (``rsockd.dataplane.netinfo``).  The two requests pyroute2 0.7.2
gets wrong (XDP flags, cls_bpf program ids) are in ``rsockd.steer.xdplink``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ARPHRD_ETHER = 1
RT_TABLE_MAIN = 254
#: Neighbour states whose link-layer address can be used (reachable, stale, delay, probe,
#: noarp, permanent); not incomplete (0x01) or failed (0x20).
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80
#: IFLA_XDP_*_PROG_ID and IFLA_XDP_ATTACHED (as pyroute2 names its values) -> rsockd's XDP modes
_MODE_ATTR = {"IFLA_XDP_DRV_PROG_ID": "native", "IFLA_XDP_SKB_PROG_ID": "skb", "IFLA_XDP_HW_PROG_ID": "hw"}
_ATTACHED_MODE = {"xdp": "native", "xdpgeneric": "skb", "xdpoffload": "hw"}
#: Errors that mean "there is none" for a route, link or neighbour look-up.
_NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ESRCH)
_NO_LINK = (errno.ENODEV, errno.ENOENT)
_NO_NEIGHBOUR = (errno.ENOENT, errno.ENODEV, errno.EINVAL)


@dataclass(frozen=True)
class Link:
    """A link of the current network namespace and its XDP programs (mode -> program id)."""

    index: int
    name: str
    xdp: dict[str, int] = field(default_factory=dict)
    mtu: int = 0
    type: int = 0  # ARPHRD_*
    address: bytes = b""  # link-layer address


@dataclass(frozen=True)
class RouteInfo:
    """Where the kernel sends a packet: the outgoing link, the source address it would use and
    the next hop (packed addresses)."""

    oif: int
    prefsrc: bytes | None
    gateway: bytes | None = None
    mtu: int = 0  # the route's MTU (a metric or a learnt path MTU); 0: the link's
    hoplimit: int = 0  # the route's TTL / hop limit metric; 0: the system's default


def text_address(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _packed(text: str | None) -> bytes | None:
    return ipaddress.ip_address(text).packed if text else None


def _lladdr(text: str | None) -> bytes:
    return bytes.fromhex(text.replace(":", "")) if text else b""


class Host:
    """One rtnetlink socket (pyroute2's ``IPRoute``) in the calling thread's network namespace.

    Every failure is an ``OSError`` (of the errno's subclass) that says what was asked, so
    callers handle netlink errors as they handle socket errors.
    """

    def __init__(self) -> None:
        from pyroute2.iproute.linux import IPRoute

        self.ipr: Any = IPRoute(ext_ack=True)

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` (an ``IPRoute`` method) with its ``NetlinkError`` as an ``OSError``."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return fn(*args, **kwargs)
        except NetlinkError as e:
            strerror = os.strerror(e.code)
            message = e.args[1] if len(e.args) > 1 else ""  # the kernel's extended ack, if any
            detail = f" ({message})" if message and message != strerror else ""
            raise OSError(e.code, f"{what}: {strerror}{detail}") from None

    # -- links

    def links(self) -> list[Link]:
        """Every link of the namespace."""
        return [_link(m) for m in self.call("list links", self.ipr.get_links)]

    def link(self, name: str | None = None, index: int = 0) -> Link | None:
        """The link called ``name``, or with interface ``index``; None when there is none."""
        query: dict[str, Any] = {"ifname": name} if name is not None else {"index": index}
        try:
            replies = self.call(f"{name or f'interface {index}'}: get link", self.ipr.link, "get", **query)
        except OSError as e:
            if e.errno in _NO_LINK:
                return None
            raise
        return _link(replies[0]) if replies else None

    # -- routes, neighbours, addresses

    def route_get(self, dst: bytes, mark: int = 0) -> RouteInfo | None:
        """``ip route get`` for a packed IPv4/IPv6 address (``mark``: as for a packet with that
        SO_MARK); None when there is no route."""
        query: dict[str, Any] = {"dst": text_address(dst)}
        if mark:
            query["mark"] = mark
        try:
            replies = self.call("route get", self.ipr.route, "get", **query)
        except OSError as e:
            if e.errno in _NO_ROUTE:
                return None
            raise
        for msg in replies:
            oif = msg.get_attr("RTA_OIF")
            if oif:
                metrics = msg.get_attr("RTA_METRICS")
                mtu = (metrics.get_attr("RTAX_MTU") or 0) if metrics is not None else 0
                hoplimit = (metrics.get_attr("RTAX_HOPLIMIT") or 0) if metrics is not None else 0
                return RouteInfo(int(oif), _packed(msg.get_attr("RTA_PREFSRC")), _packed(msg.get_attr("RTA_GATEWAY")),
                                 int(mtu), int(hoplimit))
        return None

    def neighbour(self, ifindex: int, addr: bytes) -> bytes | None:
        """The link-layer address of neighbour ``addr`` on link ``ifindex`` when the kernel has a
        usable one (``ip neigh get``); None when it has none or is still resolving it."""
        try:
            replies = self.call("neighbour get", self.ipr.neigh, "get", dst=text_address(addr), ifindex=ifindex)
        except OSError as e:
            if e.errno in _NO_NEIGHBOUR:
                return None
            raise
        for msg in replies:
            if not msg["state"] & NUD_USABLE:
                return None
            lladdr = msg.get_attr("NDA_LLADDR")
            if lladdr:
                return _lladdr(lladdr)
        return None

    def default_route_links(self, family: int) -> list[int]:
        """The outgoing links of the main table's default routes of ``family``."""
        out: list[int] = []
        for msg in self.call("list routes", self.ipr.get_default_routes, family=family, table=RT_TABLE_MAIN):
            oif = msg.get_attr("RTA_OIF")
            if oif and oif not in out:
                out.append(int(oif))
        return out

    def addresses(self, index: int | None = None) -> list[tuple[int, bytes]]:
        """(link index, packed address) of every address, or of one link's."""
        query: dict[str, Any] = {} if index is None else {"index": index}
        out = []
        for msg in self.call("list addresses", self.ipr.get_addr, **query):
            # IFA_LOCAL is the address itself on point-to-point links, where IFA_ADDRESS is the peer's
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append((int(msg["index"]), ipaddress.ip_address(addr.split("%")[0]).packed))
        return out


def _link(msg: Any) -> Link:
    xdp: dict[str, int] = {}
    info = msg.get_attr("IFLA_XDP")
    if info is not None:
        for attr, mode in _MODE_ATTR.items():
            if info.get_attr(attr):
                xdp[mode] = int(info.get_attr(attr))
        prog_id, attached = info.get_attr("IFLA_XDP_PROG_ID"), info.get_attr("IFLA_XDP_ATTACHED")
        if prog_id and attached in _ATTACHED_MODE:
            xdp.setdefault(_ATTACHED_MODE[attached], int(prog_id))
    return Link(int(msg["index"]), msg.get_attr("IFLA_IFNAME") or "", xdp, int(msg.get_attr("IFLA_MTU") or 0),
                int(msg["ifi_type"]), _lladdr(msg.get_attr("IFLA_ADDRESS")))


# -- change notifications -------------------------------------------------------------------------

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_XFRM = 6
NETLINK_NETFILTER = 12
#: rtnetlink groups (<linux/rtnetlink.h> RTNLGRP_*): links, neighbours, addresses, routes and
#: rules, both families: what a route, MTU, address or next-hop look-up answers from.
RTNL_GROUPS = (1, 3, 5, 7, 8, 9, 11, 19)
XFRMNLGRP_POLICY = 4  # <linux/xfrm.h>
NFNLGRP_NFTABLES = 7  # <linux/netfilter/nfnetlink.h>
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15  # <linux/netfilter/nf_tables.h>: a transaction's commit, says nothing by itself
#: The attribute that names the table, in every nftables message about a table, chain, rule, set
#: or set element (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...).
NFTA_TABLE = 1


def nft_news_of_others(data: bytes, ours: str) -> bool:
    """Whether nftables notifications ``data`` (one read: netlink messages) tell of a change to a
    table whose name does not start with ``ours``; a message this cannot read counts as one."""
    i = 0
    while i + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, i)
        if length < 16 or i + length > len(data):
            return True
        if kind >> 8 == NFNL_SUBSYS_NFTABLES and kind & 0xFF == NFT_MSG_NEWGEN:
            i += (length + 3) & ~3
            continue
        table = None
        a, end = i + 20, i + length  # the attributes, after the nfgenmsg
        while a + 4 <= end:
            alen, atype = struct.unpack_from("=HH", data, a)
            if alen < 4 or a + alen > end:
                break
            if atype & 0x3FFF == NFTA_TABLE:
                table = data[a + 4 : a + alen].split(b"\0", 1)[0].decode(errors="replace")
                break
            a += (alen + 3) & ~3
        if table is None or not ours or not table.startswith(ours):
            return True
        i += (length + 3) & ~3
    return False


class ChangeWatch:
    """A netlink socket that joins multicast groups and says *that* something in them changed.

    What changed is not parsed: the daemon looks up what it needs again (``Host``) when the
    socket has had anything to read since the last ``changed()``, and not otherwise.  A socket
    that overflowed (``ENOBUFS``: notifications were lost) counts as a change."""

    def __init__(self, protocol: int, groups: tuple[int, ...], news: Callable[[bytes], bool] | None = None) -> None:
        self.news = news  # whether one read tells of a change that matters; None: any does
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            self.sock.setblocking(False)
            self.sock.bind((0, 0))
            for group in groups:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError:
            self.sock.close()
            raise

    @classmethod
    def routes(cls) -> ChangeWatch:
        """Links, addresses, routes, rules and neighbours of this network namespace."""
        return cls(socket.NETLINK_ROUTE, RTNL_GROUPS)

    @classmethod
    def nftables(cls, ours: str = "") -> ChangeWatch:
        """The nftables ruleset, except the tables whose names start with ``ours``."""
        return cls(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,), lambda data: nft_news_of_others(data, ours))

    @classmethod
    def xfrm_policies(cls) -> ChangeWatch:
        return cls(NETLINK_XFRM, (XFRMNLGRP_POLICY,))

    def fileno(self) -> int:
        return self.sock.fileno()

    def changed(self) -> bool:
        """Read everything pending: whether anything came (or was lost) since the last call."""
        got = False
        while True:
            try:
                data = self.sock.recv(65536)
                if not data:
                    return got
                got = got or self.news is None or self.news(data)
            except (BlockingIOError, InterruptedError):
                return got
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    return True  # cannot tell: look
                got = True  # the socket overflowed and notifications were lost: read on

    def close(self) -> None:
        self.sock.close()
