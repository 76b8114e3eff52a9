"""The two rtnetlink requests pyroute2 0.7.2 gets wrong, written by hand.

Everything else about links, addresses, routes, qdiscs and filters goes through pyroute2
(``rsockd.netlink.Host`` and the TC guard in ``rsockd.steer.xdp``).  These two stay:

- **XDP attach/detach in a mode.**  pyroute2 0.7.2 encodes ``IFLA_XDP_FLAGS`` in two bytes
  (``ifinfmsg.xdp.xdp_flags``, ``'>H'``); the kernel wants a u32 and rejects the request, so
  neither a mode nor ``XDP_FLAGS_REPLACE`` can be asked for, and a generic-mode program on a
  native-capable link cannot even be detached.
- **Listing cls_bpf filters with their program id.**  pyroute2 0.7.2's ``cls_bpf`` options stop
  at ``TCA_BPF_FLAGS`` and never decode ``TCA_BPF_ID``; without it a guard filter cannot be traced
  back to its program, and so to the instance that attached it.

tests/unit/test_xdplink.py and tests/integration/test_pyroute2_gaps.py show both gaps against the
installed pyroute2: when they fail, pyroute2 is fixed and this module can go.  Each request opens
its own ``NETLINK_ROUTE`` socket in the calling thread's network namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

RTM_SETLINK = 19
RTM_GETTFILTER = 46
IFLA_XDP = 43
IFLA_XDP_FD = 1
IFLA_XDP_FLAGS = 3
IFLA_XDP_EXPECTED_FD = 8
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_NAME = 7
TCA_BPF_ID = 11

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4
#: rsockd's names for XDP attach modes, and their flags.
XDP_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "skb": XDP_FLAGS_SKB_MODE, "hw": XDP_FLAGS_HW_MODE}

TC_PARENT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
TC_PARENT_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
ETH_P_ALL = 0x0003

_NLMSGHDR = struct.Struct("=IHHII")  # len type flags seq pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family type index flags change
_TCMSG = struct.Struct("=BxxxiIII")  # family ifindex handle parent info
_NLATTR = struct.Struct("=HH")


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


def _request(what: str, msg_type: int, flags: int, payload: bytes) -> list[bytes]:
    """Send one request; return the bodies of a dump's replies, or [] for an acknowledged change.
    Errors are ``OSError``s saying ``what`` failed, with the kernel's extended-ack message."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without the request echoed
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # ... but with the kernel's message
        sock.bind((0, 0))
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, 1, 0) + payload)
        out: list[bytes] = []
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, mflags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                body = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
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
                    raise OSError(code, f"{what}: {os.strerror(code)}" + (f" ({message})" if message else ""))
                out.append(body)
                if not flags & NLM_F_DUMP:
                    return out


def xdp_set(ifindex: int, fd: int, flags: int, *, expected_fd: int | None = None, what: str = "") -> None:
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
    _request(what or f"ifindex {ifindex}: set XDP", RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, payload)


def filters(ifindex: int, parent: int) -> list[TcFilter]:
    """The filters under ``parent`` (e.g. ``TC_PARENT_EGRESS``), bpf ones with their program id;
    [] when the link has no such qdisc."""
    try:
        replies = _request(f"ifindex {ifindex}: list filters", RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP,
                           _TCMSG.pack(0, ifindex, 0, parent, 0))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise
    out = []
    for body in replies:
        _family, index, handle, fparent, info = _TCMSG.unpack_from(body)
        kind, name, prog_id, has_options = "", "", 0, False
        for akind, value in _attrs(body, _TCMSG.size):
            if akind == TCA_KIND:
                kind = _asciiz(value)
            elif akind == TCA_OPTIONS:
                has_options = True
                for okind, ovalue in _attrs(value) if kind == "bpf" else ():
                    if okind == TCA_BPF_NAME:
                        name = _asciiz(ovalue)
                    elif okind == TCA_BPF_ID:
                        prog_id = int(struct.unpack("=I", ovalue[:4])[0])
        if not has_options:
            continue  # the head of a priority's chain, not a filter
        out.append(TcFilter(index, fparent, info >> 16, handle, socket.ntohs(info & 0xFFFF), kind, name, prog_id))
    return out
