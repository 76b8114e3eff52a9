"""Fuzz the packet layer: IPv4/IPv6 and TCP headers, TCP options, steered-segment metadata, checksums.

    .venv/bin/python -m tests.fuzz.fuzz_packet -max_total_time=300

Every parser raises only ``PacketError``; what parses re-packs to the same bytes; the XDP rewrite
(``steer_rewrite``) of a segment parses back (``parse_meta``) to the same header and payload, and
keeps a checksum valid exactly when it was.
"""

from __future__ import annotations

import struct

from tests.fuzz.harness import instrumented, main

with instrumented():
    from rsockd.core import packet
    from rsockd.errors import PacketError

SRC, DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
PSUM_TCP = packet.pseudo_sum(SRC, DST)
PSUM_UDP = packet.pseudo_sum(SRC, DST, packet.PROTO_UDP)


def TestOneInput(data: bytes) -> None:
    for parse in (packet.parse_ip, packet.parse_meta, packet.parse_options):
        try:
            parse(data)
        except PacketError:
            pass
    try:
        hdr, payload = packet.parse_tcp(data)
    except PacketError:
        return
    again = hdr.pack(bytes(payload))
    # The three reserved bits between the data offset and the flags are not kept.
    assert again[:12] == data[:12] and again[14:] == data[14:], (again, data)
    assert struct.unpack_from("!H", again, 12)[0] == struct.unpack_from("!H", data, 12)[0] & ~0x0E00
    try:
        packet.parse_options(hdr.options)
    except PacketError:
        pass
    steered = packet.steer_rewrite(data)
    meta, rest = packet.parse_meta(steered[8:])
    assert (meta.seq, meta.ack, meta.flags, meta.window, meta.options, bytes(rest)) == (
        hdr.seq, hdr.ack, hdr.flags, hdr.window, hdr.options, bytes(payload))
    tcp_ok = packet.transport_checksum_ok(PSUM_TCP, data)
    assert packet.transport_checksum_ok(PSUM_UDP, steered) == tcp_ok
    blank = data[:16] + b"\0\0" + data[18:]
    fixed = blank[:16] + struct.pack("!H", packet.transport_checksum(PSUM_TCP, blank)) + blank[18:]
    assert packet.transport_checksum_ok(PSUM_TCP, fixed)


def _seeds() -> list[bytes]:
    opts = packet.build_options(mss=1460, sack_permitted=True, timestamps=(1, 2), wscale=7)
    syn = packet.TcpHeader(40000, 10001, 1, 0, packet.SYN, 65535, opts).pack(b"", PSUM_TCP)
    data = packet.TcpHeader(40000, 10001, 2, 3, packet.ACK | packet.PSH, 65535,
                            packet.build_options(timestamps=(5, 6))).pack(b"\x00\x20" + bytes(32), PSUM_TCP)
    return [syn, data, packet.ipv4_header(SRC, DST, len(syn)) + syn,
            packet.ipv6_header(bytes(15) + b"\1", bytes(15) + b"\2", len(data)) + data, packet.steer_rewrite(syn)[8:]]


SEEDS = _seeds()

if __name__ == "__main__":
    main(TestOneInput, SEEDS)
