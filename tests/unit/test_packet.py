"""Headers, options and checksums against independent implementations."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, in4_chksum
from scapy.layers.inet6 import IPv6, in6_chksum

from rsockd.core.batching import runs
from rsockd.core.packet import (
    ACK,
    PROTO_UDP,
    PSH,
    SYN,
    TcpHeader,
    TcpOptions,
    build_options,
    internet_checksum,
    ipv4_header,
    ipv6_header,
    ones_sum,
    parse_ip,
    parse_meta,
    parse_options,
    parse_tcp,
    pseudo_sum,
    run_segments,
    segment_checksum,
    steer_rewrite,
    tcp_checksum_ok,
    transport_checksum,
    transport_checksum_ok,
)
from rsockd.errors import PacketError


def rfc1071(data: bytes) -> int:
    """RFC 1071 §4.1's loop, written out: the independent reference."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, length: int, proto: int = 6) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def test_rfc1071_worked_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2; the checksum is its complement.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D == rfc1071(data)


def test_zero_and_negative_zero_edges() -> None:
    assert ones_sum(b"") == 0 and ones_sum(b"\0\0\0") == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF  # one's complement -0, not +0
    assert ones_sum(b"\x80\x00\x7f\xff") == 0xFFFF
    assert internet_checksum(b"\xff\xff") == 0 == rfc1071(b"\xff\xff")


addresses4 = st.binary(min_size=4, max_size=4)
addresses6 = st.binary(min_size=16, max_size=16)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)),
       st.binary(min_size=20, max_size=1500))
def test_checksum_equals_rfc1071_and_scapy(addrs: tuple[bytes, bytes], segment: bytes) -> None:
    src, dst = addrs
    seg = segment[:16] + b"\0\0" + segment[18:]
    ours = transport_checksum(pseudo_sum(src, dst), seg)
    assert ours == rfc1071(pseudo_header(src, dst, len(seg)) + seg)
    if len(src) == 4:
        ip = IP(src=str(ipaddress.IPv4Address(src)), dst=str(ipaddress.IPv4Address(dst)))
        assert ours == in4_chksum(6, ip, seg)
    else:
        ip6 = IPv6(src=str(ipaddress.IPv6Address(src)), dst=str(ipaddress.IPv6Address(dst)))
        assert ours == in6_chksum(6, ip6, seg)
    filled = seg[:16] + struct.pack("!H", ours) + seg[18:]
    assert transport_checksum_ok(pseudo_sum(src, dst), filled)
    broken = filled[:16] + struct.pack("!H", ours ^ 0x0101) + filled[18:]
    assert not transport_checksum_ok(pseudo_sum(src, dst), broken)


options = st.builds(
    lambda mss, sack, ts, ws: build_options(mss=mss, sack_permitted=sack, timestamps=ts, wscale=ws),
    st.none() | st.integers(0, 0xFFFF), st.booleans(),
    st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), st.none() | st.integers(0, 14))


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 0x1FF), options, st.binary(max_size=1400), st.booleans())
def test_tcp_header_round_trip_with_options(sport: int, dport: int, seq: int, ack: int, flags: int,
                                            opts: bytes, payload: bytes, v6: bool) -> None:
    src, dst = (b"\x20\x01" + bytes(13) + b"\x01", b"\x20\x01" + bytes(13) + b"\x02") if v6 else (
        b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    seg = TcpHeader(sport, dport, seq, ack, flags, 5000, opts).pack(payload, pseudo_sum(src, dst))
    assert tcp_checksum_ok(src, dst, seg)
    hdr, body = parse_tcp(seg)
    assert (hdr.sport, hdr.dport, hdr.seq, hdr.ack, hdr.flags, hdr.window) == (sport, dport, seq, ack, flags, 5000)
    assert bytes(body) == payload and hdr.options == opts
    parse_options(hdr.options)  # what we build, we parse


def test_linux_syn_options_layout() -> None:
    o = build_options(mss=1460, sack_permitted=True, timestamps=(1, 0), wscale=7)
    assert o == bytes.fromhex("020405b4" "0402080a" "00000001" "00000000" "01030307")
    assert parse_options(o) == TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamps=(1, 0))
    assert build_options(timestamps=(5, 6)) == bytes.fromhex("0101080a0000000500000006")


@pytest.mark.parametrize("data, msg", [
    (b"\x02", "no length"),
    (b"\x02\x01", "< 2"),
    (b"\x02\x04\x05", "runs past"),
    (b"\x08\x0a\0\0", "runs past"),
    (b"\x02\x05\x05\xb4\x00", "expected 4"),
    (b"\x05\x05\0\0\0", r"2 \+ 8n"),
])
def test_malformed_options_are_typed_errors(data: bytes, msg: str) -> None:
    with pytest.raises(PacketError, match=msg):
        parse_options(data)


def test_eol_ends_options_and_unknown_kinds_are_kept() -> None:
    assert parse_options(b"\x1e\x04\xab\xcd\x00\x02\x04").unknown == ((30, b"\xab\xcd"),)


@pytest.mark.parametrize("seg, msg", [
    (bytes(19), "shorter than a header"),
    (bytes(12) + b"\x40" + bytes(7), "below 5"),
    (bytes(12) + b"\x80" + bytes(7), "runs past"),
])
def test_malformed_tcp_headers_are_typed_errors(seg: bytes, msg: str) -> None:
    with pytest.raises(PacketError, match=msg):
        parse_tcp(seg)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=120))
def test_parsers_raise_only_packet_error(data: bytes) -> None:
    for parser in (parse_tcp, parse_options, parse_ip, parse_meta):
        try:
            parser(data)  # type: ignore[operator]
        except PacketError:
            pass


def test_ip_headers_round_trip() -> None:
    src, dst = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 7])
    h = ipv4_header(src, dst, 100)
    assert internet_checksum(h) == 0  # a correct header sums to -0
    ip, l4 = parse_ip(h + bytes(100))
    assert (ip.version, ip.src, ip.dst, ip.proto, ip.fragment, len(l4)) == (4, src, dst, 6, False, 100)
    s6, d6 = ipaddress.IPv6Address("2001:db8::1").packed, ipaddress.IPv6Address("2001:db8::2").packed
    ip6, l4 = parse_ip(ipv6_header(s6, d6, 40) + bytes(50))
    assert (ip6.version, ip6.src, ip6.dst, len(l4)) == (6, s6, d6, 40)  # trimmed to the IP length
    with pytest.raises(PacketError, match="total length"):
        parse_ip(h + bytes(10))


@settings(max_examples=1000, deadline=None)
@given(st.booleans(), options, st.binary(max_size=1400), st.integers(0, 0x1FF))
def test_steered_rewrite_keeps_checksum_validity(v6: bool, opts: bytes, payload: bytes, flags: int) -> None:
    """The UDP checksum derived as the XDP program does is valid exactly when the TCP one was."""
    src, dst = (bytes(15) + b"\x01", bytes(15) + b"\x02") if v6 else (b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    seg = TcpHeader(40000, 10001, 0xFFFFFFF0, 77, flags | ACK, 502, opts).pack(payload, pseudo_sum(src, dst))
    udp = steer_rewrite(seg)
    assert len(udp) == len(seg)
    assert transport_checksum_ok(pseudo_sum(src, dst, PROTO_UDP), udp)
    assert udp[6:8] != b"\0\0"  # zero would mean "no checksum" to UDP
    hdr, body = parse_meta(udp[8:])
    assert (hdr.seq, hdr.ack, hdr.flags, hdr.window, hdr.options) == (0xFFFFFFF0, 77, flags | ACK, 502, opts)
    assert bytes(body) == payload and udp[8] >= 0x50
    bad = seg[:16] + bytes([seg[16] ^ 0x10]) + seg[17:]
    assert not transport_checksum_ok(pseudo_sum(src, dst, PROTO_UDP), steer_rewrite(bad))


def test_flags_constants() -> None:
    assert (SYN | ACK | PSH) == 0x1A


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.sampled_from([20, 32, 40, 60]), st.binary(max_size=1500), st.data())
def test_segment_checksum_of_the_parts_equals_the_whole(src: bytes, dst: bytes, hl: int, payload: bytes,
                                                         data: st.DataObject) -> None:
    """The raw send path checksums a header and a payload it never joins (one sendmsg of both)."""
    header = data.draw(st.binary(min_size=hl, max_size=hl))
    header = header[:16] + b"\0\0" + header[18:]
    psum = pseudo_sum(src, dst)
    assert segment_checksum(psum, header, payload) == transport_checksum(psum, header + payload)
    assert segment_checksum(psum, header + b"x", payload) == transport_checksum(psum, header + b"x" + payload)


def test_run_segments_number_each_payload_on() -> None:
    hdr = TcpHeader(1, 2, 0xFFFFFFF0, 7, ACK | PSH, 100).pack()
    segs = list(run_segments(hdr, [b"a" * 10, b"b" * 10, b"c" * 3]))
    assert [parse_tcp(h + p)[0].seq for h, p in segs] == [0xFFFFFFF0, 0xFFFFFFFA, 4]
    assert all(h[8:] == hdr[8:] and h[:4] == hdr[:4] for h, _p in segs)
    assert list(run_segments(hdr, [b"only"])) == [(hdr, b"only")]


def test_runs_are_equal_sized_with_a_shorter_last_within_the_bounds() -> None:
    assert list(runs([5, 5, 5, 3, 5, 5], 64)) == [(0, 4), (4, 6)]
    assert list(runs([5, 5, 5, 5], 2)) == [(0, 2), (2, 4)]
    assert list(runs([5, 6, 6], 64)) == [(0, 1), (1, 3)]  # a longer item starts a new run
    assert list(runs([0, 0, 4], 64)) == [(0, 1), (1, 2), (2, 3)]  # empty items stand alone
    assert list(runs([1000] * 10, 64, max_bytes=3500, overhead=100)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
