"""nfnetlink_queue (Linux): receive the packets an nftables ``queue`` rule holds back, and give
each its verdict.  Only what the nft backend's SYN queue needs; pyroute2 0.7 has no nfqueue.

One ``NETLINK_NETFILTER`` socket binds one queue number (``NFQNL_MSG_CONFIG``: command BIND,
copy mode PACKET with a small copy range, a queue length and ``NFQA_CFG_F_FAIL_OPEN``).  The
kernel then sends one ``NFQNL_MSG_PACKET`` per queued packet (its id, and its first
``copy_range`` bytes from the IP header on); the packet waits in the kernel until a
``NFQNL_MSG_VERDICT`` names its id.  Closing the socket unbinds the queue: the kernel releases
the binding of a netlink port that goes away, and a rule with ``bypass`` then lets its packets
through again.

Bounded: at most ``maxlen`` packets wait in the kernel, and at most a socket buffer of messages
wait for us; with ``FAIL_OPEN`` the kernel accepts what does not fit (a flood goes to the
kernel's own TCP, not to memory).

Messages (``include/uapi/linux/netfilter/nfnetlink_queue.h``): ``nlmsghdr``, ``nfgenmsg``
(family, version 0, the queue number big-endian), then attributes, their payloads big-endian.
The encoders and ``parse`` are pure, for the unit tests.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2

NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3

NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQA_CFG_F_FAIL_OPEN = 0x1

NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_PAYLOAD, NFQA_CAP_LEN = 1, 2, 3, 10, 13

NF_DROP, NF_ACCEPT, NF_REPEAT = 0, 1, 4

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, resource id (the queue number)
_NLA = struct.Struct("=HH")  # attribute length, type (host order)
_ERR = struct.Struct("=i")  # nlmsgerr.error (negative errno, 0 for an ack)
_PACKET_HDR = struct.Struct("!IHB")  # packet id, hw protocol, hook
_VERDICT_HDR = struct.Struct("!II")  # verdict, packet id
_U32 = struct.Struct("!I")

RCVBUF = 1 << 20  # ~4000 queued SYN messages; more are the kernel's (fail-open)


class NfQueueError(OSError):
    """The kernel refused a queue request (``errno`` as it reported it)."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One queued packet: its id (for the verdict), its first bytes from the IP header on, and
    whether the copy was cut short (the packet is longer than ``payload``)."""

    packet_id: int
    payload: bytes
    truncated: bool = False


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    n = _NLA.size + len(value)
    return _NLA.pack(n, kind) + value + bytes(_align(n) - n)


def message(msg: int, queue: int, attrs: bytes, *, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    """A whole nfnetlink_queue message (``msg``: one of the ``NFQNL_MSG_*``)."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NFNL_SUBSYS_QUEUE << 8 | msg, flags, seq, 0) + body


def bind_request(queue: int, copy_range: int, maxlen: int, seq: int = 1) -> bytes:
    """Bind ``queue``, copy ``copy_range`` bytes of each packet, hold at most ``maxlen``, fail open."""
    attrs = (attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))
             + attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
             + attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(maxlen))
             + attr(NFQA_CFG_FLAGS, _U32.pack(NFQA_CFG_F_FAIL_OPEN))
             + attr(NFQA_CFG_MASK, _U32.pack(NFQA_CFG_F_FAIL_OPEN)))
    return message(NFQNL_MSG_CONFIG, queue, attrs, flags=NLM_F_REQUEST | NLM_F_ACK, seq=seq)


def verdict(queue: int, packet_id: int, verdict: int, mark: int | None = None) -> bytes:
    """The verdict on one packet; ``mark``: the packet's new mark (``NF_REPEAT`` then lets the
    chain see it)."""
    attrs = attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    if mark is not None:
        attrs += attr(NFQA_MARK, _U32.pack(mark))
    return message(NFQNL_MSG_VERDICT, queue, attrs)


def _attrs(data: memoryview) -> dict[int, memoryview]:
    out: dict[int, memoryview] = {}
    off = 0
    while off + _NLA.size <= len(data):
        n, kind = _NLA.unpack_from(data, off)
        if n < _NLA.size or off + n > len(data):
            break
        out[kind & 0x3FFF] = data[off + _NLA.size : off + n]  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        off += _align(n)
    return out


def parse(data: bytes | memoryview) -> Iterator[Packet | int]:
    """The messages of one read: a ``Packet`` per queued packet, an int per error or ack
    (0 or a positive errno).  Anything else (other types, a short message) is skipped."""
    view = memoryview(data)
    off = 0
    while off + _NLMSGHDR.size <= len(view):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, off)
        if length < _NLMSGHDR.size or off + length > len(view):
            return
        body = view[off + _NLMSGHDR.size : off + length]
        off += _align(length)
        if kind == NLMSG_ERROR and len(body) >= _ERR.size:
            yield -_ERR.unpack_from(body)[0]
        elif kind == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET and len(body) >= _NFGENMSG.size:
            a = _attrs(body[_NFGENMSG.size :])
            hdr, payload = a.get(NFQA_PACKET_HDR), a.get(NFQA_PAYLOAD)
            if hdr is None or len(hdr) < _PACKET_HDR.size:
                continue
            packet_id = _PACKET_HDR.unpack_from(hdr)[0]
            pl = bytes(payload) if payload is not None else b""
            cap = a.get(NFQA_CAP_LEN)
            yield Packet(packet_id, pl, cap is not None and len(cap) >= 4 and _U32.unpack_from(cap)[0] > len(pl))


class NfQueue:
    """One bound queue, non-blocking.  ``read`` what is waiting, then ``send`` the verdicts in one
    write.  ``close`` (or the process ending) unbinds it."""

    def __init__(self, queue: int, *, copy_range: int = 128, maxlen: int = 1024, rcvbuf: int = RCVBUF) -> None:
        self.queue = queue
        self.overruns = 0  # reads that found messages lost (the socket buffer was full)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(5.0)
            self.sock.send(bind_request(queue, copy_range, maxlen))
            while True:
                for item in parse(self.sock.recv(65536)):
                    if isinstance(item, int):
                        if item:
                            raise NfQueueError(item, f"nfqueue {queue}: bind: {os.strerror(item)}")
                        self.sock.setblocking(False)
                        return
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, buf: bytearray, limit: int = 64) -> list[Packet]:
        """The packets waiting (at most ``limit`` reads' worth); never blocks."""
        out: list[Packet] = []
        for _ in range(limit):
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped messages for us (fail-open: accepted)
                    self.overruns += 1
                    continue
                raise
            out.extend(p for p in parse(memoryview(buf)[:n]) if isinstance(p, Packet))
        return out

    def send(self, verdicts: list[bytes]) -> None:
        """Send verdict messages (``verdict(...)``), all in one write; the kernel acts on each
        before the call returns."""
        if verdicts:
            self.sock.send(b"".join(verdicts))

    def close(self) -> None:
        self.sock.close()


def bound_queues() -> set[int]:
    """Queue numbers bound in this network namespace (``/proc/net/netfilter/nfnetlink_queue``)."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            return {int(line.split()[0]) for line in f if line.strip()}
    except OSError:
        return set()


# ---------------------------------------------------------------------------------------------
# The queue rule through nft_compat, for kernels without nft_queue

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWRULE = 6
NLM_F_CREATE, NLM_F_APPEND = 0x400, 0x800
NLA_F_NESTED = 0x8000
NFPROTO_INET = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_TARGET_NAME, NFTA_TARGET_REV, NFTA_TARGET_INFO = 1, 2, 3
NFQ_FLAG_BYPASS = 0x01


def xt_queue_rule(table: str, chain: str, queue: int, seq: int = 1) -> bytes:
    """A batch appending to ``inet table chain`` the rule ``-j NFQUEUE --queue-num queue
    --queue-bypass``: the xtables target (revision 3, ``struct xt_NFQ_info_v3``: queue number,
    queues in total, flags, in host order and padded to 8 bytes) run by nft_compat.  Kernels
    built without ``CONFIG_NFT_QUEUE`` still have it when they have ``CONFIG_NFT_COMPAT`` and
    ``CONFIG_NETFILTER_XT_TARGET_NFQUEUE``."""
    info = struct.pack("=HHH", queue, 1, NFQ_FLAG_BYPASS) + bytes(2)
    target = (attr(NFTA_TARGET_NAME, b"NFQUEUE\0") + attr(NFTA_TARGET_REV, _U32.pack(3))
              + attr(NFTA_TARGET_INFO, info))
    expr = attr(NFTA_EXPR_NAME, b"target\0") + attr(NFTA_EXPR_DATA | NLA_F_NESTED, target)
    rule = (attr(NFTA_RULE_TABLE, table.encode() + b"\0") + attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
            + attr(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, attr(NFTA_LIST_ELEM | NLA_F_NESTED, expr)))

    def msg(kind: int, family: int, res: int, body: bytes, flags: int, n: int) -> bytes:
        b = _NFGENMSG.pack(family, 0, res) + body
        return _NLMSGHDR.pack(_NLMSGHDR.size + len(b), kind, flags, n, 0) + b

    return (msg(NFNL_MSG_BATCH_BEGIN, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"", NLM_F_REQUEST, seq)
            + msg(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE, NFPROTO_INET, 0, rule,
                  NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK, seq + 1)
            + msg(NFNL_MSG_BATCH_END, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"", NLM_F_REQUEST, seq + 2))


def add_xt_queue_rule(table: str, chain: str, queue: int) -> None:
    """Append the xtables NFQUEUE rule (``xt_queue_rule``) in this network namespace.  Raises
    ``NfQueueError`` with the kernel's errno."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.bind((0, 0))
        s.settimeout(5.0)
        s.send(xt_queue_rule(table, chain, queue))
        while True:
            for item in parse(s.recv(65536)):
                if isinstance(item, int):
                    if item:
                        raise NfQueueError(item, f"xt NFQUEUE rule: {os.strerror(item)}")
                    return
