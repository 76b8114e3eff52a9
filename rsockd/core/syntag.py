"""The SYN tag: a client's ISN proves that it knows the tunnel key.  Pure.

Port sharing (docs/security.md) hands the kernel every segment to a tunnel port except those
of rsockd's own connections.  A connection becomes one of ours by its SYN: the client chooses
its initial sequence number as a keyed hash of the connection's addresses, ports and the time,
and the server's steering (the XDP program, or the nft backend's SYN queue) checks it before
anything of rsockd answers.  Every other SYN - a prober's, a scanner's, a browser's for the
real service on that port - reaches the kernel untouched.

    isn = r << 24 | low 24 bits of SipHash-2-4(k, src16 | dst16 | sport | dport | slot | r)

- ``k``: 16 bytes, BLAKE2s of the tunnel key (``framing.derive_key``; the well-known default key
  when none is configured) under its own personalisation, so the tag never reveals the MAC key.
- ``src16``, ``dst16``: the SYN's source and destination addresses as 16 bytes, IPv4 as
  IPv4-mapped IPv6 (``::ffff:a.b.c.d``).
- the last 8 bytes are the little-endian u64 ``sport | dport << 16 | slot << 32 | r << 56``, with
  ``slot = floor(unix time / SLOT_SECONDS) mod 2**24``, the client's wall clock, and ``r`` a
  random byte of the client's, which the ISN carries in the clear: a client that reconnects on
  the same ports within a slot still sends a new ISN (255 times in 256).

A guess is right once in 2**24 tries; it buys a prober a SYN-ACK and nothing more, since the
hello that follows is authenticated (docs/security.md).

The server accepts the slots before, at and after its own: a SYN is good for 64 to 128 s after
the client made it, from the addresses and ports it names, and both clocks may be up to 64 s
apart.  The message is 40 bytes: five 64-bit words read as the bytes are laid out (little
endian), then the final block holding only the length, so the XDP program
(``bpf/ingress.c``, ``rsockd_syn_tag``) computes the same function over the words it reads
from the packet.  ``tests/unit/test_syntag.py`` holds SipHash's reference vectors.
"""

from __future__ import annotations

import hashlib
import struct

SLOT_SECONDS = 64
SLOTS_ACCEPTED = (-1, 0, 1)  # the server's slot plus these
_PERSON = b"rsockdS1"
_MASK = 0xFFFFFFFFFFFFFFFF
SLOT_MASK = 0xFFFFFF
TAG_MASK = 0xFFFFFF
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def tag_key(mac_key: bytes) -> bytes:
    """The 16-byte SYN tag key of a tunnel key (``framing.derive_key``'s output)."""
    return hashlib.blake2s(mac_key, digest_size=16, person=_PERSON).digest()


def slot_of(wall: float) -> int:
    """The time slot of a wall-clock time (seconds since the epoch)."""
    return (int(wall) // SLOT_SECONDS) & SLOT_MASK


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def _rounds(count: int, v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    for _ in range(count):
        v0 = (v0 + v1) & _MASK
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _MASK
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _MASK
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _MASK
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 of ``data`` under a 16-byte ``key`` (Aumasson & Bernstein), as an integer."""
    k0, k1 = struct.unpack("<QQ", key)
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    n = len(data)
    tail = data[n - n % 8:] + bytes(7 - n % 8) + bytes(((n & 0xFF),))
    blocks = [int.from_bytes(data[i:i + 8], "little") for i in range(0, n - n % 8, 8)]
    blocks.append(int.from_bytes(tail, "little"))

    for m in blocks:
        v3 ^= m
        v0, v1, v2, v3 = _rounds(2, v0, v1, v2, v3)
        v0 ^= m
    v2 ^= 0xFF
    v0, v1, v2, v3 = _rounds(4, v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def addr16(packed: bytes) -> bytes:
    """A packed address as the tag's (and the XDP ``conns`` map's) 16 bytes: IPv4 as IPv4-mapped IPv6."""
    return _V4_MAPPED + packed if len(packed) == 4 else packed


def message(src: bytes, dst: bytes, sport: int, dport: int, slot: int, r: int) -> bytes:
    """The 40 bytes the tag covers (addresses packed, 4 or 16 bytes)."""
    tail = (sport & 0xFFFF) | (dport & 0xFFFF) << 16 | (slot & SLOT_MASK) << 32 | (r & 0xFF) << 56
    return addr16(src) + addr16(dst) + tail.to_bytes(8, "little")


def syn_isn(key: bytes, src: bytes, dst: bytes, sport: int, dport: int, slot: int, r: int) -> int:
    """The ISN of a client's SYN from ``src:sport`` to ``dst:dport`` in ``slot`` (``r``: 0-255)."""
    return (r & 0xFF) << 24 | siphash24(key, message(src, dst, sport, dport, slot, r)) & TAG_MASK


def tag_ok(key: bytes, src: bytes, dst: bytes, sport: int, dport: int, isn: int, wall: float) -> bool:
    """Whether a SYN's ISN carries the tag of a slot the server accepts at ``wall``."""
    slot, r = slot_of(wall), isn >> 24
    return any(syn_isn(key, src, dst, sport, dport, (slot + d) & SLOT_MASK, r) == isn for d in SLOTS_ACCEPTED)


def key_words(key: bytes) -> tuple[int, int]:
    """``k0, k1`` as the XDP program's map holds them."""
    k0, k1 = struct.unpack("<QQ", key)
    return k0, k1


__all__ = ["SLOTS_ACCEPTED", "SLOT_MASK", "SLOT_SECONDS", "TAG_MASK", "addr16", "key_words", "message", "siphash24",
           "slot_of", "syn_isn", "tag_key", "tag_ok"]
