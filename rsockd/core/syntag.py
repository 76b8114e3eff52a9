"""The SYN tag: a client's SYN proves that it knows the tunnel key.  Pure.

Port sharing (docs/security.md) hands the kernel every segment to a tunnel port except those
of rsockd's own connections.  A connection becomes one of ours by its SYN: the client's SYN
carries, as its timestamp value (TSval), a keyed hash of its initial sequence number and the
time, and the server's steering (the XDP program, or the nft backend's SYN queue) checks it
before anything of rsockd answers.  Every other SYN - a prober's, a scanner's, a browser's for
the real service on that port - reaches the kernel untouched.

    TSval = low 32 bits of SipHash-2-4(k, isn | slot << 32)     (8 bytes, little endian)

- ``k``: 16 bytes, BLAKE2s of the tunnel key (``framing.derive_key``; the well-known default key
  when none is configured) under its own personalisation, so the tag never reveals the MAC key.
- ``isn``: the SYN's sequence number, 32 random bits of the client's.
- ``slot = floor(unix time / SLOT_SECONDS) mod 2**32``, the client's wall clock.  The server
  accepts the slots before, at and after its own: a SYN is good for 64 to 128 s after the client
  made it, and both clocks may be up to 64 s apart.

Neither address nor port is in the tag: NAT rewrites them between client and server (the
client's side nearly always, the server's with a port forward).  What binds a SYN to an
address instead is the server's memory of the tags it has seen (``SeenSyns``; the XDP program
keeps the same in a map): the first source address and port a tag arrives from owns it for
its time window, and the same SYN from anywhere else - a prober replaying a captured one - goes
to the kernel.  The client's retransmitted SYNs carry the same ISN and TSval from the same
address, so they still reach rsockd.

A guess is right once in 2**32 tries and buys a prober only a SYN-ACK, since the hello that
follows is authenticated (docs/security.md).  The timestamp clock of the connection then runs on
from the tag at 1 kHz: a random offset per connection.  The XDP program (``bpf/ingress.c``,
``rsockd_syn_tag``) computes the same function; ``tests/unit/test_syntag.py`` holds SipHash's
reference vectors.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

SLOT_SECONDS = 64
SLOTS_ACCEPTED = (-1, 0, 1)  # the server's slot plus these
WINDOW_SECONDS = SLOT_SECONDS * (len(SLOTS_ACCEPTED) + 1)  # a tag is never good longer than this
_PERSON = b"rsockdS1"
_MASK = 0xFFFFFFFFFFFFFFFF
_M32 = 0xFFFFFFFF
SLOT_MASK = _M32


def tag_key(mac_key: bytes) -> bytes:
    """The 16-byte SYN tag key of a tunnel key (``framing.derive_key``'s output)."""
    return hashlib.blake2s(mac_key, digest_size=16, person=_PERSON).digest()


def slot_of(wall: float) -> int:
    """The time slot of a wall-clock time (seconds since the epoch)."""
    return (int(wall) // SLOT_SECONDS) & _M32


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
    k0, k1 = key_words(key)
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


def message(isn: int, slot: int) -> bytes:
    """The 8 bytes the tag covers."""
    return ((isn & _M32) | (slot & _M32) << 32).to_bytes(8, "little")


def syn_tag(key: bytes, isn: int, slot: int) -> int:
    """The TSval of a client's SYN with sequence number ``isn``, made in ``slot``."""
    return siphash24(key, message(isn, slot)) & _M32


def tag_ok(key: bytes, isn: int, tsval: int, wall: float) -> bool:
    """Whether a SYN's TSval is its tag for a slot the server accepts at ``wall``."""
    slot = slot_of(wall)
    return any(syn_tag(key, isn, (slot + d) & _M32) == tsval for d in SLOTS_ACCEPTED)


def key_words(key: bytes) -> tuple[int, int]:
    """``k0, k1`` as the XDP program's map holds them."""
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")
    return k0, k1


class SeenSyns:
    """The tags seen lately, and the connection (4-tuple, as the server sees it) that owns each.

    Bounded: at most ``size`` tags, the oldest forgotten first; a tag is forgotten anyway once
    its window is over, when ``tag_ok`` refuses it by itself.
    """

    __slots__ = ("_seen", "size")

    def __init__(self, size: int = 65536) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[int, int], tuple[object, float]] = OrderedDict()

    def claim(self, isn: int, tsval: int, owner: object, wall: float) -> bool:
        """True for a tag not seen before (``owner`` now owns it) or seen from ``owner``; False
        for a tag another owner sent first: a replay."""
        key = (isn, tsval)
        old = self._seen.get(key)
        if old is not None and wall - old[1] < WINDOW_SECONDS:
            return old[0] == owner
        self._seen[key] = (owner, wall)
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True


__all__ = ["SLOTS_ACCEPTED", "SLOT_MASK", "SLOT_SECONDS", "WINDOW_SECONDS", "SeenSyns", "key_words",
           "message", "siphash24", "slot_of", "syn_tag", "tag_key", "tag_ok"]
