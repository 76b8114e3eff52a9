"""IPv4/IPv6 and TCP headers: build, parse, checksum.  Pure: no sockets.

Checksums use the one's-complement sum of RFC 1071 computed the fast way: because
65536 = 1 (mod 65535), a byte string read as one big-endian integer is congruent, modulo 0xffff,
to the sum of its 16-bit words.  ``int.from_bytes(data, "big") % 0xffff`` is therefore the
one's-complement sum, except that it yields 0 where one's-complement arithmetic yields 0xffff
(a non-zero sum that is a multiple of 0xffff).  The pseudo-header sum of a connection (addresses
and protocol, RFC 9293 §3.1 and RFC 8200 §8.1) is computed once and added to each segment's sum.

Every parser raises ``PacketError`` on malformed input (truncated header, bad data offset,
options running past the header), never ``IndexError`` or ``struct.error``.

Besides real TCP, this module parses the form in which a segment reaches userspace after the XDP
program rewrote it (see docs/protocol.md, "Steered segments"): the 20-byte TCP header becomes an
8-byte UDP header followed by 12 bytes of metadata ``offflags(2) window(2) seq(4) ack(4)``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import PacketError

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

PROTO_TCP = 6
PROTO_UDP = 17

TCP_HEADER = struct.Struct("!HHIIHHHH")  # sport dport seq ack offflags window checksum urgent
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV6_HEADER = struct.Struct("!IHBB16s16s")
#: The 12 bytes of TCP metadata that follow the UDP header of a steered segment.
META = struct.Struct("!HHII")  # offflags window seq ack
META_LEN = META.size

TCP_MIN_HEADER = 20
TCP_CHECK = 16  # offset of the TCP checksum field
TCP_MAX_HEADER = 60
IPV4_MIN_HEADER = 20
IPV6_HEADER_LEN = 40

# TCP option kinds (RFC 9293 §3.1, RFC 7323, RFC 2018)
OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMPS = 8

_OPT_LEN = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERMITTED: 2, OPT_TIMESTAMPS: 10}


# ---------------------------------------------------------------------------------------------
# Checksums


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's-complement sum of ``data`` (odd length padded with a zero byte).

    Returns 0 only for all-zero data; a non-zero sum congruent to 0 is 0xffff.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    s = n % 0xFFFF
    if s == 0 and n:
        return 0xFFFF
    return s


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum: the complement of the one's-complement sum."""
    return ~ones_sum(data) & 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int = PROTO_TCP) -> int:
    """The part of the pseudo-header sum that is fixed for a connection (no length).

    IPv4 (RFC 9293 §3.1): src, dst, zero, protocol, TCP length.  IPv6 (RFC 8200 §8.1): src, dst,
    32-bit upper-layer length, three zero bytes, next header.  For lengths below 65536 both reduce
    to ``sum(addresses) + proto + length``; the length is added per segment.
    """
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("pseudo_sum needs two IPv4 or two IPv6 addresses in packed form")
    return int.from_bytes(src + dst, "big") % 0xFFFF + proto


def _length_sum(length: int) -> int:
    # IPv6 jumbograms have 32-bit lengths; fold them like any other 32-bit field.
    return (length >> 16) + (length & 0xFFFF)


def transport_checksum(psum: int, segment: bytes | bytearray | memoryview) -> int:
    """Checksum for ``segment`` (whose checksum field is zero) under pseudo-header sum ``psum``."""
    n = int.from_bytes(segment, "big")
    if len(segment) & 1:
        n <<= 8
    s = (psum + _length_sum(len(segment)) + n) % 0xFFFF
    # psum > 0 (it holds the protocol), so the true sum is never +0: a result of 0 means 0xffff.
    return (~s & 0xFFFF) if s else 0


def segment_checksum(psum: int, header: bytes | memoryview, payload: bytes | memoryview) -> int:
    """``transport_checksum`` of ``header + payload`` without joining them: a TCP header is of even
    length, and 2**16 = 1 modulo 0xffff, so the two parts add word-aligned."""
    if len(header) & 1:
        return transport_checksum(psum, bytes(header) + bytes(payload))
    p = int.from_bytes(payload, "big")
    if len(payload) & 1:
        p <<= 8
    s = (psum + _length_sum(len(header) + len(payload)) + int.from_bytes(header, "big") + p) % 0xFFFF
    return (~s & 0xFFFF) if s else 0


def run_segments(header: bytes, payloads: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The segments of a run (``endpoint.Transmit``), as (TCP header, payload): each header as
    ``header`` with the sequence number moved on by the payloads before it, as the kernel's TCP
    segmentation offload numbers them."""
    if len(payloads) == 1:
        yield header, payloads[0]
        return
    seq = int.from_bytes(header[4:8], "big")
    head, tail = header[:4], header[8:]
    for payload in payloads:
        yield head + (seq & 0xFFFFFFFF).to_bytes(4, "big") + tail, payload
        seq += len(payload)


def transport_checksum_ok(psum: int, segment: bytes | bytearray | memoryview) -> bool:
    """True when the checksum field of ``segment`` (TCP or UDP layout) is correct."""
    n = int.from_bytes(segment, "big")
    if len(segment) & 1:
        n <<= 8
    return (psum + _length_sum(len(segment)) + n) % 0xFFFF == 0


def tcp_checksum_ok(src: str | bytes, dst: str | bytes, segment: bytes | bytearray | memoryview) -> bool:
    """Verify a whole TCP segment (header + payload) sent from ``src`` to ``dst``."""
    s, d = pack_address(src), pack_address(dst)
    if len(s) != len(d):
        raise ValueError("source and destination are of different address families")
    return transport_checksum_ok(pseudo_sum(s, d), segment)


def pack_address(addr: str | bytes) -> bytes:
    """An address as 4 or 16 packed bytes (accepts text or packed form)."""
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ValueError(f"packed address of {len(addr)} bytes")
        return addr
    return ipaddress.ip_address(addr).packed


# ---------------------------------------------------------------------------------------------
# TCP options


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The options of one TCP header, decoded.  Absent options are None/False/empty."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamps: tuple[int, int] | None = None  # (TSval, TSecr)
    sack: tuple[tuple[int, int], ...] = ()
    unknown: tuple[tuple[int, bytes], ...] = field(default=())


def parse_options(data: bytes | bytearray | memoryview) -> TcpOptions:
    """Decode a TCP option list (RFC 9293 §3.2).  Raises ``PacketError`` when malformed."""
    b = bytes(data)
    i, end = 0, len(b)
    mss = wscale = None
    sack_perm = False
    ts: tuple[int, int] | None = None
    sack: list[tuple[int, int]] = []
    unknown: list[tuple[int, bytes]] = []
    while i < end:
        kind = b[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise PacketError(f"option {kind} at offset {i} has no length byte")
        length = b[i + 1]
        if length < 2:
            raise PacketError(f"option {kind} at offset {i} has length {length} < 2")
        if i + length > end:
            raise PacketError(f"option {kind} at offset {i} runs past the header ({length} bytes)")
        want = _OPT_LEN.get(kind)
        if want is not None and length != want:
            raise PacketError(f"option {kind} has length {length}, expected {want}")
        body = b[i + 2 : i + length]
        if kind == OPT_MSS:
            mss = int.from_bytes(body, "big")
        elif kind == OPT_WSCALE:
            wscale = body[0]
        elif kind == OPT_SACK_PERMITTED:
            sack_perm = True
        elif kind == OPT_TIMESTAMPS:
            ts = (int.from_bytes(body[:4], "big"), int.from_bytes(body[4:], "big"))
        elif kind == OPT_SACK:
            if (length - 2) % 8:
                raise PacketError(f"SACK option length {length} is not 2 + 8n")
            sack.extend((int.from_bytes(body[j:j + 4], "big"), int.from_bytes(body[j + 4:j + 8], "big"))
                        for j in range(0, length - 2, 8))
        else:
            unknown.append((kind, body))
        i += length
    return TcpOptions(mss, wscale, sack_perm, ts, tuple(sack), tuple(unknown))


def _padded(out: bytearray) -> bytes:
    """Options padded to a multiple of 4 with EOL, refused past the header's 40 bytes."""
    if len(out) % 4:
        out += bytes(4 - len(out) % 4)
    if len(out) > TCP_MAX_HEADER - TCP_MIN_HEADER:
        raise ValueError("TCP options longer than 40 bytes")
    return bytes(out)


def build_options(
    *,
    mss: int | None = None,
    sack_permitted: bool = False,
    timestamps: tuple[int, int] | None = None,
    wscale: int | None = None,
) -> bytes:
    """Encode options in the order and padding Linux uses, so the result looks like Linux.

    SYN with all four: ``MSS, SACK_PERM, TS, NOP, WS`` (20 bytes).  Without SACK_PERM the
    timestamps get two leading NOPs, and a data segment's lone timestamps are ``NOP NOP TS``.
    """
    out = bytearray()
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if sack_permitted and timestamps is not None:
        out += struct.pack("!BBBBII", OPT_SACK_PERMITTED, 2, OPT_TIMESTAMPS, 10, *timestamps)
    else:
        if sack_permitted:
            out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
        if timestamps is not None:
            out += struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMPS, 10, *timestamps)
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    return _padded(out)


def build_options_darwin(
    *,
    mss: int | None = None,
    sack_permitted: bool = False,
    timestamps: tuple[int, int] | None = None,
    wscale: int | None = None,
) -> bytes:
    """Encode options in the order and padding macOS (XNU's ``tcp_output()``) uses.

    SYN and SYN-ACK with all four: ``MSS, NOP, WS, NOP, NOP, TS, SACK_PERM, EOL, 0`` (24 bytes),
    p0f's ``mss,nop,ws,nop,nop,ts,sok,eol+1``; each option it leaves out drops its own bytes
    (p0f.fp's Mac OS X ``[tcp:response]`` signatures list every subset).  A data segment's lone
    timestamps are ``NOP NOP TS``, as Linux's.
    """
    out = bytearray()
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    if timestamps is not None:
        out += struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMPS, 10, *timestamps)
    if sack_permitted:
        out += bytes((OPT_SACK_PERMITTED, 2))
    return _padded(out)


# ---------------------------------------------------------------------------------------------
# TCP header


@dataclass(slots=True)
class TcpHeader:
    """A TCP header.  ``options`` is the raw option bytes (a multiple of 4 long)."""

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes = b""
    urgent: int = 0
    checksum: int = 0

    @property
    def header_len(self) -> int:
        return TCP_MIN_HEADER + len(self.options)

    def pack(self, payload: bytes = b"", psum: int | None = None) -> bytes:
        """Header + payload; with ``psum`` (see ``pseudo_sum``) the checksum is filled in."""
        if len(self.options) % 4 or len(self.options) > 40:
            raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
        offflags = (self.header_len // 4) << 12 | (self.flags & 0x1FF)
        hdr = TCP_HEADER.pack(
            self.sport, self.dport, self.seq & 0xFFFFFFFF, self.ack & 0xFFFFFFFF,
            offflags, self.window, 0, self.urgent,
        )
        seg = hdr + self.options + payload
        if psum is None:
            return seg[:16] + struct.pack("!H", self.checksum) + seg[18:]
        c = transport_checksum(psum, seg)
        return seg[:16] + struct.pack("!H", c) + seg[18:]


def parse_tcp(data: bytes | bytearray | memoryview) -> tuple[TcpHeader, memoryview]:
    """Split a TCP segment into its header and payload.  Raises ``PacketError``."""
    mv = memoryview(data)
    if len(mv) < TCP_MIN_HEADER:
        raise PacketError(f"TCP segment of {len(mv)} bytes is shorter than a header")
    sport, dport, seq, ack, offflags, window, csum, urg = TCP_HEADER.unpack_from(mv)
    hlen = (offflags >> 12) * 4
    if hlen < TCP_MIN_HEADER:
        raise PacketError(f"TCP data offset {hlen // 4} is below 5")
    if hlen > len(mv):
        raise PacketError(f"TCP data offset {hlen // 4} runs past the segment ({len(mv)} bytes)")
    options = bytes(mv[TCP_MIN_HEADER:hlen])
    return TcpHeader(sport, dport, seq, ack, offflags & 0x1FF, window, options, urg, csum), mv[hlen:]


# ---------------------------------------------------------------------------------------------
# IP headers


@dataclass(frozen=True, slots=True)
class IpHeader:
    """The fields of an IPv4 or IPv6 header rsockd uses.  Addresses are packed bytes."""

    version: int
    src: bytes
    dst: bytes
    proto: int  # IPv4 protocol / IPv6 next header
    ttl: int
    header_len: int
    fragment: bool = False  # IPv4 MF set or offset non-zero


def parse_ip(data: bytes | bytearray | memoryview) -> tuple[IpHeader, memoryview]:
    """Parse an IPv4 or IPv6 header; returns it and the L4 payload (trimmed to the IP length).

    IPv6 extension headers are not walked: ``proto`` is the first next-header value.
    """
    mv = memoryview(data)
    if not mv:
        raise PacketError("empty packet")
    version = mv[0] >> 4
    if version == 4:
        if len(mv) < IPV4_MIN_HEADER:
            raise PacketError(f"IPv4 packet of {len(mv)} bytes is shorter than a header")
        vihl, _tos, total, _ident, frag, ttl, proto, _csum, src, dst = IPV4_HEADER.unpack_from(mv)
        ihl = (vihl & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or ihl > len(mv):
            raise PacketError(f"IPv4 header length {ihl} is invalid for a {len(mv)}-byte packet")
        if total < ihl or total > len(mv):
            raise PacketError(f"IPv4 total length {total} does not fit the {len(mv)}-byte packet")
        fragment = bool(frag & 0x3FFF)
        return IpHeader(4, src, dst, proto, ttl, ihl, fragment), mv[ihl:total]
    if version == 6:
        if len(mv) < IPV6_HEADER_LEN:
            raise PacketError(f"IPv6 packet of {len(mv)} bytes is shorter than a header")
        _vtf, plen, nxt, hop, src, dst = IPV6_HEADER.unpack_from(mv)
        if IPV6_HEADER_LEN + plen > len(mv):
            raise PacketError(f"IPv6 payload length {plen} runs past the {len(mv)}-byte packet")
        return IpHeader(6, src, dst, nxt, hop, IPV6_HEADER_LEN), mv[IPV6_HEADER_LEN : IPV6_HEADER_LEN + plen]
    raise PacketError(f"IP version {version} is neither 4 nor 6")


def ipv4_header(src: bytes, dst: bytes, payload_len: int, *, proto: int = PROTO_TCP, ttl: int = 64,
                ident: int = 0, checksum: bool = True) -> bytes:
    """An option-less IPv4 header with DF set (and its checksum unless ``checksum=False``)."""
    hdr = IPV4_HEADER.pack(0x45, 0, IPV4_MIN_HEADER + payload_len, ident, 0x4000, ttl, proto, 0, src, dst)
    if not checksum:
        return hdr
    return hdr[:10] + struct.pack("!H", internet_checksum(hdr)) + hdr[12:]


def ipv6_header(src: bytes, dst: bytes, payload_len: int, *, proto: int = PROTO_TCP, hop_limit: int = 64) -> bytes:
    """An IPv6 header without extension headers."""
    return IPV6_HEADER.pack(6 << 28, payload_len, proto, hop_limit, src, dst)


def family_of(packed: bytes) -> int:
    """``AF_INET`` or ``AF_INET6`` for a packed address."""
    return socket.AF_INET if len(packed) == 4 else socket.AF_INET6


# ---------------------------------------------------------------------------------------------
# Steered segments (after the XDP rewrite)


def parse_meta(data: bytes | bytearray | memoryview) -> tuple[TcpHeader, memoryview]:
    """Parse the UDP payload of a segment rewritten by XDP into a header (ports 0) and payload.

    Layout: ``offflags(2) window(2) seq(4) ack(4) options payload`` (docs/protocol.md).
    """
    mv = memoryview(data)
    if len(mv) < META_LEN:
        raise PacketError(f"steered segment of {len(mv)} bytes is shorter than its metadata")
    offflags, window, seq, ack = META.unpack_from(mv)
    hlen = (offflags >> 12) * 4
    if hlen < TCP_MIN_HEADER:
        raise PacketError(f"steered segment has data offset {hlen // 4} below 5")
    end = META_LEN + hlen - TCP_MIN_HEADER
    if end > len(mv):
        raise PacketError("steered segment options run past its end")
    return TcpHeader(0, 0, seq, ack, offflags & 0x1FF, window, bytes(mv[META_LEN:end])), mv[end:]


def steer_rewrite(tcp_segment: bytes) -> bytes:
    """What the XDP program makes of ``tcp_segment``: UDP header + metadata + options + payload.

    The UDP checksum is derived from the TCP checksum exactly as the BPF program derives it, so
    a segment with a bad TCP checksum gets a bad UDP checksum.  Used to test the program and the
    parsers against the same specification.
    """
    if len(tcp_segment) < TCP_MIN_HEADER:
        raise PacketError("segment shorter than a TCP header")
    sport, dport, seq, ack, offflags, window, tcsum, urg = TCP_HEADER.unpack_from(tcp_segment)
    ulen = len(tcp_segment)
    # One's-complement arithmetic (RFC 1624): pseudo-header protocol 6 -> 17 and the words
    # {checksum, urgent} -> {length, checksum}; seq/ack/offflags/window only move, which
    # leaves the sum unchanged.
    s = tcsum + urg + PROTO_TCP + (~PROTO_UDP & 0xFFFF) + (~ulen & 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ucsum = s or 0xFFFF
    return struct.pack("!HHHHHHII", sport, dport, ulen, ucsum, offflags, window, seq, ack) + tcp_segment[20:]
