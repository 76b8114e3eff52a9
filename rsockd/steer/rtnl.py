"""The few rtnetlink operations the XDP backend needs, on a raw ``NETLINK_ROUTE`` socket.

List links with their XDP programs, attach/detach XDP in a given mode, and manage the
``clsact`` qdisc and ``cls_bpf`` filters of the TC guard.  It works in the network namespace
of the calling thread.

Why not pyroute2: the version Debian bookworm ships (0.7.2) encodes ``IFLA_XDP_FLAGS`` in two
bytes, which the kernel rejects, so it cannot attach or detach in a chosen mode (generic-mode
programs on a native-capable link cannot be detached without the flag); and it does not decode
``TCA_BPF_ID``, without which a guard filter cannot be traced back to its program and so to
the instance that attached it.  Two netlink stacks in one backend would be worse than these
200 lines.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..core.packet import family_of

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWQDISC = 36
RTM_DELQDISC = 37
RTM_NEWTFILTER = 44
RTM_DELTFILTER = 45
RTM_GETTFILTER = 46

IFLA_IFNAME = 3
IFLA_MTU = 4
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_MARK = 16
RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30
NDA_DST = 1
NDA_LLADDR = 2
IFLA_ADDRESS = 1
ARPHRD_ETHER = 1
#: Neighbour states whose link-layer address can be used (reachable, stale, delay, probe,
#: noarp, permanent); not incomplete (0x01) or failed (0x20).
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80
RTA_TABLE = 15
RT_TABLE_MAIN = 254
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFLA_EXT_MASK = 29
IFLA_XDP = 43
IFLA_XDP_FD = 1
IFLA_XDP_ATTACHED = 2
IFLA_XDP_FLAGS = 3
IFLA_XDP_PROG_ID = 4
IFLA_XDP_DRV_PROG_ID = 5
IFLA_XDP_SKB_PROG_ID = 6
IFLA_XDP_HW_PROG_ID = 7
IFLA_XDP_EXPECTED_FD = 8
RTEXT_FILTER_SKIP_STATS = 1 << 3

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

#: rsockd's names for XDP attach modes, and their flags.
XDP_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "skb": XDP_FLAGS_SKB_MODE, "hw": XDP_FLAGS_HW_MODE}
_ATTACHED_MODE = {1: "native", 2: "skb", 3: "hw"}  # IFLA_XDP_ATTACHED values (4 = several)
_MODE_ATTR = {IFLA_XDP_DRV_PROG_ID: "native", IFLA_XDP_SKB_PROG_ID: "skb", IFLA_XDP_HW_PROG_ID: "hw"}

TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_ID = 11
TCA_BPF_FLAG_ACT_DIRECT = 1

TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
TC_PARENT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
TC_PARENT_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
ETH_P_ALL = 0x0003

_NLMSGHDR = struct.Struct("=IHHII")  # len type flags seq pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family type index flags change
_NDMSG = struct.Struct("=BxxxiHBB")  # family ifindex state flags type
_TCMSG = struct.Struct("=BxxxiIII")  # family ifindex handle parent info
_RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
_IFADDRMSG = struct.Struct("=BBBBI")  # family prefixlen flags scope index
_NLATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Link:
    """A link of the current network namespace and its XDP programs (mode -> program id)."""

    index: int
    name: str
    xdp: dict[str, int]
    mtu: int = 0
    type: int = 0  # ARPHRD_*
    address: bytes = b""  # link-layer address


@dataclass(frozen=True)
class RouteInfo:
    """Where the kernel sends a packet: the outgoing link and the source address it would use."""

    oif: int
    prefsrc: bytes | None
    gateway: bytes | None = None


@dataclass(frozen=True)
class TcFilter:
    """A tc filter; ``name``/``prog_id`` are set for ``bpf`` filters."""

    ifindex: int
    parent: int
    prio: int
    handle: int
    protocol: int
    kind: str
    name: str = ""
    prog_id: int = 0


def _attr(kind: int, payload: bytes) -> bytes:
    data = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return data + bytes(-len(data) % 4)


def _attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        yield kind & NLA_TYPE_MASK, data[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3


def _asciiz(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def _u32(b: bytes) -> int:
    return int(struct.unpack("=I", b[:4])[0])


class Rtnl:
    """A NETLINK_ROUTE socket in the calling thread's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without the request echoed
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # ... but with the kernel's message
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, what: str, msg_type: int, flags: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Send one request; return the replies of a dump, or [] for an acknowledged change."""
        self.seq += 1
        seq = self.seq
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, mflags, mseq, _pid = _NLMSGHDR.unpack_from(data, offset)
                body = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code == 0:
                        return out
                    message = ""
                    if mflags & NLM_F_ACK_TLVS:
                        # the error code, the request's header (capped: no payload), then TLVs
                        for akind, value in _attrs(body, 4 + _NLMSGHDR.size):
                            if akind == NLMSGERR_ATTR_MSG:
                                message = _asciiz(value)
                    text = f"{what}: {os.strerror(code)}" + (f" ({message})" if message else "")
                    raise OSError(code, text)
                out.append((kind, body))
                if not flags & NLM_F_DUMP:
                    return out

    # -- links and XDP

    def links(self) -> list[Link]:
        """Every link of the namespace."""
        payload = _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
        return [
            self._parse_link(body)
            for _, body in self._request("list links", RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, payload)
        ]

    def link(self, name: str | None = None, index: int = 0) -> Link | None:
        """The link called ``name``, or with interface ``index``; None when there is none."""
        payload = _IFINFOMSG.pack(0, 0, index, 0, 0)
        if name is not None:
            payload += _attr(IFLA_IFNAME, name.encode() + b"\0")
        payload += _attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
        try:
            replies = self._request(f"{name or f'interface {index}'}: get link", RTM_GETLINK, NLM_F_REQUEST,
                                    payload)
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return self._parse_link(replies[0][1]) if replies else None

    @staticmethod
    def _parse_link(body: bytes) -> Link:
        _family, hwtype, index, _flags, _change = _IFINFOMSG.unpack_from(body)
        name, xdp, mtu, address = "", {}, 0, b""
        for kind, value in _attrs(body, _IFINFOMSG.size):
            if kind == IFLA_IFNAME:
                name = _asciiz(value)
            elif kind == IFLA_MTU:
                mtu = _u32(value)
            elif kind == IFLA_ADDRESS:
                address = bytes(value)
            elif kind == IFLA_XDP:
                attached, prog_id = 0, 0
                for xkind, xvalue in _attrs(value):
                    if xkind == IFLA_XDP_ATTACHED:
                        attached = xvalue[0]
                    elif xkind == IFLA_XDP_PROG_ID:
                        prog_id = _u32(xvalue)
                    elif xkind in _MODE_ATTR:
                        xdp[_MODE_ATTR[xkind]] = _u32(xvalue)
                if prog_id and attached in _ATTACHED_MODE:
                    xdp.setdefault(_ATTACHED_MODE[attached], prog_id)
        return Link(index, name, xdp, mtu, hwtype, address)

    # -- routes and addresses (what rsockd.netinfo needs; pyroute2 costs the daemon 10 MB)

    def route_get(self, dst: bytes, mark: int = 0) -> RouteInfo | None:
        """``ip route get`` for a packed IPv4/IPv6 address (``mark``: as for a packet with that
        SO_MARK); None when there is no route."""
        family = family_of(dst)
        payload = _RTMSG.pack(family, len(dst) * 8, 0, 0, 0, 0, 0, 0, 0) + _attr(RTA_DST, dst)
        if mark:
            payload += _attr(RTA_MARK, struct.pack("=I", mark))
        try:
            replies = self._request("route get", RTM_GETROUTE, NLM_F_REQUEST, payload)
        except OSError as e:
            if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ESRCH):
                return None
            raise
        for kind, body in replies:
            if kind == RTM_NEWROUTE:
                oif, src, gateway = 0, None, None
                for akind, value in _attrs(body, _RTMSG.size):
                    if akind == RTA_OIF:
                        oif = _u32(value)
                    elif akind == RTA_PREFSRC:
                        src = value
                    elif akind == RTA_GATEWAY:
                        gateway = bytes(value)
                if oif:
                    return RouteInfo(oif, src, gateway)
        return None

    def neighbour(self, ifindex: int, addr: bytes) -> bytes | None:
        """The link-layer address of neighbour ``addr`` on link ``ifindex`` when the kernel has a
        usable one (``ip neigh get``); None when it has none or is still resolving it."""
        family = family_of(addr)
        payload = _NDMSG.pack(family, ifindex, 0, 0, 0) + _attr(NDA_DST, addr)
        try:
            replies = self._request("neighbour get", RTM_GETNEIGH, NLM_F_REQUEST, payload)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return None
            raise
        for kind, body in replies:
            if kind == RTM_NEWNEIGH:
                _family, _index, state, _flags, _type = _NDMSG.unpack_from(body)
                if not state & NUD_USABLE:
                    return None
                for akind, value in _attrs(body, _NDMSG.size):
                    if akind == NDA_LLADDR:
                        return bytes(value)
        return None

    def default_route_links(self, family: int) -> list[int]:
        """The outgoing links of the main table's default routes of ``family``."""
        payload = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        out = []
        for kind, body in self._request("list routes", RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, payload):
            if kind != RTM_NEWROUTE:
                continue
            _fam, dst_len, _sl, _tos, table, _proto, _scope, _type, _fl = _RTMSG.unpack_from(body)
            oif = 0
            for akind, value in _attrs(body, _RTMSG.size):
                if akind == RTA_OIF:
                    oif = _u32(value)
                elif akind == RTA_TABLE:
                    table = _u32(value)
            if dst_len == 0 and table == RT_TABLE_MAIN and oif and oif not in out:
                out.append(oif)
        return out

    def addresses(self, index: int | None = None) -> list[tuple[int, bytes]]:
        """(link index, packed address) of every address, or of one link's."""
        out = []
        payload = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        for kind, body in self._request("list addresses", RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, payload):
            if kind != RTM_NEWADDR:
                continue
            _family, _plen, _flags, _scope, idx = _IFADDRMSG.unpack_from(body)
            if index is not None and idx != index:
                continue
            attrs = dict(_attrs(body, _IFADDRMSG.size))
            # IFA_LOCAL is the address itself on point-to-point links, where IFA_ADDRESS is the peer's
            addr = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if addr:
                out.append((idx, addr))
        return out

    def xdp_set(self, ifindex: int, fd: int, flags: int, *, expected_fd: int | None = None, what: str = "") -> None:
        """Attach program ``fd`` (-1: detach) to the link in the mode ``flags`` names.

        With ``expected_fd`` the change happens only if that program is the one attached
        (``XDP_FLAGS_REPLACE``), so a detach never removes someone else's program.
        """
        attrs = _attr(IFLA_XDP_FD, struct.pack("=i", fd))
        if expected_fd is not None:
            flags |= XDP_FLAGS_REPLACE
            attrs += _attr(IFLA_XDP_EXPECTED_FD, struct.pack("=i", expected_fd))
        attrs += _attr(IFLA_XDP_FLAGS, struct.pack("=I", flags))
        payload = _IFINFOMSG.pack(0, 0, ifindex, 0, 0) + _attr(IFLA_XDP | NLA_F_NESTED, attrs)
        self._request(what or f"ifindex {ifindex}: set XDP", RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, payload)

    # -- tc: clsact and cls_bpf

    def clsact_add(self, ifindex: int) -> bool:
        """Add the clsact qdisc; False when the link already has one."""
        payload = _TCMSG.pack(0, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0) + _attr(TCA_KIND, b"clsact\0")
        try:
            self._request(f"ifindex {ifindex}: add clsact", RTM_NEWQDISC,
                          NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, payload)
        except FileExistsError:
            return False
        return True

    def clsact_del(self, ifindex: int) -> None:
        payload = _TCMSG.pack(0, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0)
        self._request(f"ifindex {ifindex}: delete clsact", RTM_DELQDISC, NLM_F_REQUEST | NLM_F_ACK, payload)

    def filters(self, ifindex: int, parent: int) -> list[TcFilter]:
        """The filters under ``parent`` (e.g. ``TC_PARENT_EGRESS``); [] when there is no qdisc."""
        payload = _TCMSG.pack(0, ifindex, 0, parent, 0)
        try:
            replies = self._request(f"ifindex {ifindex}: list filters", RTM_GETTFILTER,
                                    NLM_F_REQUEST | NLM_F_DUMP, payload)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return []
            raise
        out = []
        for _, body in replies:
            _family, index, handle, fparent, info = _TCMSG.unpack_from(body)
            kind, name, prog_id, has_options = "", "", 0, False
            for akind, value in _attrs(body, _TCMSG.size):
                if akind == TCA_KIND:
                    kind = _asciiz(value)
                elif akind == TCA_OPTIONS:
                    has_options = True
                    for okind, ovalue in _attrs(value):
                        if okind == TCA_BPF_NAME:
                            name = _asciiz(ovalue)
                        elif okind == TCA_BPF_ID:
                            prog_id = _u32(ovalue)
            if not has_options:
                continue  # the head of a priority's chain, not a filter
            out.append(TcFilter(index, fparent, info >> 16, handle, socket.ntohs(info & 0xFFFF), kind, name,
                                prog_id))
        return out

    def filter_add_bpf(self, ifindex: int, parent: int, *, prio: int, handle: int, fd: int, name: str) -> None:
        """Add a direct-action ``cls_bpf`` filter running program ``fd``."""
        info = (prio << 16) | socket.htons(ETH_P_ALL)
        options = (
            _attr(TCA_BPF_FD, struct.pack("=I", fd))
            + _attr(TCA_BPF_NAME, name.encode() + b"\0")
            + _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
        )
        payload = _TCMSG.pack(0, ifindex, handle, parent, info) + _attr(TCA_KIND, b"bpf\0")
        payload += _attr(TCA_OPTIONS | NLA_F_NESTED, options)
        self._request(f"ifindex {ifindex}: add tc filter {name}", RTM_NEWTFILTER,
                      NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, payload)

    def filter_del(self, f: TcFilter) -> None:
        info = (f.prio << 16) | socket.htons(f.protocol)
        payload = _TCMSG.pack(0, f.ifindex, f.handle, f.parent, info) + _attr(TCA_KIND, f.kind.encode() + b"\0")
        self._request(f"ifindex {f.ifindex}: delete tc filter {f.name or f.kind}", RTM_DELTFILTER,
                      NLM_F_REQUEST | NLM_F_ACK, payload)
