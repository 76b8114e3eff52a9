"""nfnetlink_queue messages, byte for byte (the kernel's side: tests/integration/test_nft_steer.py)."""

from __future__ import annotations

import socket
import struct

from rsockd.steer import nfqueue
from rsockd.steer.nfqueue import Packet, attr, bind_request, parse, verdict, xt_queue_rule

NLMSG = struct.Struct("=IHHII")


def attrs_of(body: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off < len(body):
        n, kind = struct.unpack_from("=HH", body, off)
        out.append((kind, body[off + 4 : off + n]))
        off += (n + 3) & ~3
    return out


def test_attr_is_padded_to_four_bytes() -> None:
    assert attr(7, b"\x01") == struct.pack("=HH", 5, 7) + b"\x01\x00\x00\x00"
    assert attr(7, b"\x01\x02\x03\x04") == struct.pack("=HH", 8, 7) + b"\x01\x02\x03\x04"


def test_bind_request() -> None:
    msg = bind_request(29123, 128, 1024, seq=9)
    length, kind, flags, seq, pid = NLMSG.unpack_from(msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 3 << 8 | 2, 0x1 | 0x4, 9, 0)
    assert msg[16:20] == struct.pack("!BBH", socket.AF_UNSPEC, 0, 29123)
    assert attrs_of(msg[20:]) == [
        (1, b"\x01\x00\x00\x00"),  # command BIND, pad, pf 0
        (2, struct.pack("!IB", 128, 2)),  # copy range, copy mode PACKET
        (3, struct.pack("!I", 1024)),  # queue length
        (5, struct.pack("!I", 1)),  # FAIL_OPEN ...
        (4, struct.pack("!I", 1)),  # ... under its mask
    ]


def test_verdicts() -> None:
    msg = verdict(7, 0x01020304, nfqueue.NF_ACCEPT)
    assert NLMSG.unpack_from(msg)[:3] == (len(msg), 3 << 8 | 1, 0x1)
    assert msg[16:20] == b"\x00\x00\x00\x07"
    assert attrs_of(msg[20:]) == [(2, struct.pack("!II", 1, 0x01020304))]
    marked = verdict(7, 5, nfqueue.NF_REPEAT, 0x72736B64)
    assert attrs_of(marked[20:]) == [(2, struct.pack("!II", 4, 5)), (3, struct.pack("!I", 0x72736B64))]


def packet_msg(packet_id: int, payload: bytes, cap_len: int | None = None) -> bytes:
    body = struct.pack("!BBH", socket.AF_INET, 0, 7)
    body += attr(1, struct.pack("!IHB", packet_id, 0x0800, 0)) + attr(5, struct.pack("!I", 2))
    body += attr(10, payload)
    if cap_len is not None:
        body += attr(13, struct.pack("!I", cap_len))
    return NLMSG.pack(16 + len(body), 3 << 8 | 0, 0, 0, 0) + body


def error_msg(err: int) -> bytes:
    body = struct.pack("=i", -err) + NLMSG.pack(16, 0, 0, 0, 0)
    return NLMSG.pack(16 + len(body), 2, 0, 0, 0) + body


def test_parse_packets_acks_and_errors() -> None:
    data = (packet_msg(1, b"\x45" + bytes(39)) + error_msg(0) + packet_msg(2, b"\x45" * 5, cap_len=60)
            + error_msg(1) + NLMSG.pack(16, 0x123, 0, 0, 0))
    assert list(parse(data)) == [Packet(1, b"\x45" + bytes(39)), 0, Packet(2, b"\x45" * 5, truncated=True), 1]


def test_parse_stops_at_a_broken_message() -> None:
    good = packet_msg(3, b"\x60" * 40)
    assert list(parse(good + NLMSG.pack(1000, 3 << 8, 0, 0, 0))) == [Packet(3, b"\x60" * 40)]
    assert list(parse(good[:20])) == []
    no_hdr = NLMSG.pack(16 + 4 + 8, 3 << 8, 0, 0, 0) + struct.pack("!BBH", 2, 0, 7) + attr(10, b"abcd")
    assert list(parse(no_hdr)) == []  # a packet without its id cannot be answered: skipped


def test_xt_queue_rule_batch() -> None:
    batch = xt_queue_rule("rsockd_x", "synqueue", 29001, seq=5)
    msgs = []
    off = 0
    while off < len(batch):
        length, kind, flags, seq, _ = NLMSG.unpack_from(batch, off)
        msgs.append((kind, flags, seq, batch[off + 16 : off + length]))
        off += length
    assert [(k, s) for k, _f, s, _b in msgs] == [(0x10, 5), (10 << 8 | 6, 6), (0x11, 7)]
    assert msgs[0][3][2:4] == msgs[2][3][2:4] == struct.pack("!H", 10)  # batch of the nf_tables subsystem
    rule = msgs[1][3]
    assert rule[0] == 1  # NFPROTO_INET
    top = dict(attrs_of(rule[4:]))
    assert top[1] == b"rsockd_x\0" and top[2] == b"synqueue\0"
    (elem_kind, elem), = attrs_of(top[4 | 0x8000])
    expr = dict(attrs_of(elem))
    assert elem_kind == 1 | 0x8000 and expr[1] == b"target\0"
    target = dict(attrs_of(expr[2 | 0x8000]))
    assert target == {1: b"NFQUEUE\0", 2: struct.pack("!I", 3), 3: struct.pack("=HHH", 29001, 1, 1) + bytes(2)}
