"""Tunnel framing: authenticated records made of length-prefixed frames.  Pure.

A segment's payload is one or more *records*; a record is one or more *frames* sealed with a
64-bit counter and a truncated keyed BLAKE2b tag (docs/protocol.md has every field):

    record := length:u16  counter:u64  tag:8  frames          (length counts counter..frames)
    frame  := type:u8  length:u16  body

Records are self-delimiting so that segments coalesced by GRO before the XDP rewrite (the
payloads of several segments concatenated) still split correctly.  The tag covers the
connection's context (the client's hello nonce and the direction), the counter and the frames;
the receiver keeps a WireGuard-style sliding window (RFC 6479) over the counter, so a captured
record re-sent later is dropped.  Without a configured key the tag is computed with a
well-known default key: it marks rsockd traffic but authenticates nothing (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from ..errors import FrameError
from . import syntag

# 2: the record tag is BLAKE2b (half the cost of BLAKE2s for a 1200-byte record on 64-bit
# CPUs), and the client's SYN carries the SYN tag (core/syntag.py)
PROTOCOL_VERSION = 2

#: First byte of a datagram of the ``udp`` transport.  Steered TCP segments start with the data
#: offset nibble (>= 5), so any first byte below 0x50 cannot be a steered segment.
UDP_MARKER = 0x01

RECORD_HEADER = struct.Struct("!HQ8s")  # length counter tag
RECORD_OVERHEAD = RECORD_HEADER.size  # 18
TAG_LEN = 8
FRAME_HEADER = struct.Struct("!BH")
FRAME_OVERHEAD = FRAME_HEADER.size  # 3
DATA_HEADER = struct.Struct("!BHI")  # type length flow_id
DATA_OVERHEAD = DATA_HEADER.size  # 7
MAX_RECORD_BODY = 0xFFFF - 16  # counter + tag are inside the 16-bit length

DIR_CLIENT_TO_SERVER = 0
DIR_SERVER_TO_CLIENT = 1

DEFAULT_KEY_MATERIAL = b"rsockd default key: marks traffic, authenticates nothing"
_KEY_PERSON = b"rsockdK1"
_TAG_PERSON = b"rsockdT2"


class FrameType(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    DATA = 3
    KEEPALIVE = 4
    FLOW_CLOSE = 5
    CLOSE = 6


class CloseReason(IntEnum):
    """Why a peer ends a connection (the body of a CLOSE frame)."""

    SHUTDOWN = 0  # the daemon is stopping
    REFUSED = 1  # the server refused the hello (limits, version)
    REPLACED = 2  # a newer connection took this one's place
    DEAD = 3  # the peer stopped answering
    PROTOCOL = 4  # the peer broke the protocol


HELLO = struct.Struct("!BBHHH8s8sQI")  # version flags index count reserved client_id nonce ts_ns caps
HELLO_ACK = struct.Struct("!BBHI")  # version flags index caps


@dataclass(frozen=True, slots=True)
class Hello:
    """The client's announcement on a new connection (authenticated under ``nonce``)."""

    client_id: bytes  # 8 bytes, one per client process; names the session
    conn_index: int  # which of the client's connections (one per server port) this is
    conn_count: int
    nonce: bytes  # 8 random bytes per connection attempt; the tag context
    timestamp_ns: int  # client wall clock: the server rejects stale or repeated hellos
    capabilities: int = 0
    version: int = PROTOCOL_VERSION
    flags: int = 0

    def encode(self) -> bytes:
        body = HELLO.pack(self.version, self.flags, self.conn_index, self.conn_count, 0,
                          self.client_id, self.nonce, self.timestamp_ns, self.capabilities)
        return FRAME_HEADER.pack(FrameType.HELLO, len(body)) + body

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Hello:
        if len(body) < HELLO.size:
            raise FrameError(f"hello of {len(body)} bytes, expected {HELLO.size}")
        ver, flags, idx, count, _r, cid, nonce, ts, caps = HELLO.unpack_from(body)
        return cls(cid, idx, count, nonce, ts, caps, ver, flags)


@dataclass(frozen=True, slots=True)
class HelloAck:
    conn_index: int
    capabilities: int = 0
    version: int = PROTOCOL_VERSION
    flags: int = 0

    def encode(self) -> bytes:
        body = HELLO_ACK.pack(self.version, self.flags, self.conn_index, self.capabilities)
        return FRAME_HEADER.pack(FrameType.HELLO_ACK, len(body)) + body

    @classmethod
    def decode(cls, body: bytes | memoryview) -> HelloAck:
        if len(body) < HELLO_ACK.size:
            raise FrameError(f"hello-ack of {len(body)} bytes, expected {HELLO_ACK.size}")
        ver, flags, idx, caps = HELLO_ACK.unpack_from(body)
        return cls(idx, caps, ver, flags)


# ---------------------------------------------------------------------------------------------
# Frames


def data_frame(flow_id: int, datagram: bytes | memoryview) -> bytes:
    return DATA_HEADER.pack(FrameType.DATA, 4 + len(datagram), flow_id) + datagram


def keepalive_frame() -> bytes:
    return FRAME_HEADER.pack(FrameType.KEEPALIVE, 0)


def flow_close_frame(flow_id: int) -> bytes:
    return FRAME_HEADER.pack(FrameType.FLOW_CLOSE, 4) + struct.pack("!I", flow_id)


def close_frame(reason: CloseReason) -> bytes:
    return FRAME_HEADER.pack(FrameType.CLOSE, 1) + bytes((reason,))


def iter_frames(frames: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(type, body)`` for each frame.  Raises ``FrameError`` on a truncated frame.

    Unknown frame types are yielded too; the caller skips them (forward compatibility).
    """
    mv = memoryview(frames)
    i, end = 0, len(mv)
    while i < end:
        if i + FRAME_OVERHEAD > end:
            raise FrameError(f"frame header truncated at offset {i}")
        ftype, length = FRAME_HEADER.unpack_from(mv, i)
        i += FRAME_OVERHEAD
        if i + length > end:
            raise FrameError(f"frame of type {ftype} and length {length} runs past the record")
        yield ftype, mv[i : i + length]
        i += length


# ---------------------------------------------------------------------------------------------
# Keys, tags, records


def derive_key(secret: str | bytes | None) -> bytes:
    """The 32-byte MAC key for a configured secret (``None``: the well-known default)."""
    material = DEFAULT_KEY_MATERIAL if secret is None else (
        secret.encode() if isinstance(secret, str) else secret)
    return hashlib.blake2s(material, digest_size=32, person=_KEY_PERSON).digest()


class Keyring:
    """A keyed BLAKE2b state, copied per record (cheaper than re-keying)."""

    __slots__ = ("_base", "is_default", "key", "syn_key")

    def __init__(self, key: bytes, *, is_default: bool = False) -> None:
        self.key = key
        self._base = hashlib.blake2b(key=key, digest_size=TAG_LEN, person=_TAG_PERSON)
        self.is_default = is_default
        self.syn_key = syntag.tag_key(key)  # the SYN tag's key (core/syntag.py)

    @classmethod
    def from_secret(cls, secret: str | bytes | None) -> Keyring:
        return cls(derive_key(secret), is_default=secret is None)

    def sealer(self, nonce: bytes, direction: int) -> Sealer:
        """The sealing state for one direction of one connection."""
        context = nonce + bytes((direction,))
        h = self._base.copy()
        h.update(context)
        return Sealer(h, (self.key, _TAG_PERSON, context))

    def opener(self, nonce: bytes, direction: int, window: int = 1024) -> Opener:
        context = nonce + bytes((direction,))
        h = self._base.copy()
        h.update(context)
        return Opener(h, ReplayWindow(window), (self.key, _TAG_PERSON, context))


class Sealer:
    """Seals frames into records with a per-direction counter."""

    __slots__ = ("_ctx", "counter", "mac_key")

    def __init__(self, ctx: hashlib.blake2b, mac_key: tuple[bytes, bytes, bytes] = (b"", b"", b"")) -> None:
        self._ctx = ctx
        self.counter = 0
        self.mac_key = mac_key  # (key, personalization, context): the tag, for the compiled writer

    def seal(self, frames: bytes) -> bytes:
        counter = self.counter
        self.counter = counter + 1
        head = struct.pack("!Q", counter)
        h = self._ctx.copy()
        h.update(head)
        h.update(frames)
        return struct.pack("!H", 16 + len(frames)) + head + h.digest() + frames


class ReplayWindow:
    """Sliding anti-replay window over 64-bit counters (RFC 6479 / WireGuard).

    ``top`` is the highest counter accepted; bit ``i`` of ``bits`` says ``top - i`` was seen.
    """

    __slots__ = ("bits", "size", "top")

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.top = -1
        self.bits = 0

    def fresh(self, counter: int) -> bool:
        """Would ``counter`` be accepted (not yet seen, not too old)?  Does not record it."""
        if counter > self.top:
            return True
        age = self.top - counter
        return age < self.size and not (self.bits >> age) & 1

    def mark(self, counter: int) -> None:
        """Record ``counter`` as seen (call only after the record authenticated)."""
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)


class Opener:
    """Splits a payload into records, authenticates them, rejects replays."""

    __slots__ = ("_ctx", "mac_key", "window")

    def __init__(self, ctx: hashlib.blake2b, window: ReplayWindow,
                 mac_key: tuple[bytes, bytes, bytes] = (b"", b"", b"")) -> None:
        self._ctx = ctx
        self.window = window
        self.mac_key = mac_key  # (key, personalization, context): the tag, for the compiled reader

    def verify(self, counter: int, tag: bytes | memoryview, frames: bytes | memoryview) -> bool:
        h = self._ctx.copy()
        h.update(struct.pack("!Q", counter))
        h.update(frames)
        return hmac.compare_digest(h.digest(), tag)


class RecordError(FrameError):
    """A record that failed authentication or replay checks; ``reason`` is the counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def split_records(payload: bytes | memoryview) -> Iterator[tuple[int, memoryview, memoryview]]:
    """Yield ``(counter, tag, frames)`` per record.  Raises ``FrameError`` when truncated."""
    mv = memoryview(payload)
    i, end = 0, len(mv)
    while i < end:
        if i + RECORD_OVERHEAD > end:
            raise FrameError(f"record header truncated at offset {i}")
        length, counter, _tag = RECORD_HEADER.unpack_from(mv, i)
        if length < 16:
            raise FrameError(f"record length {length} is shorter than counter + tag")
        stop = i + 2 + length
        if stop > end:
            raise FrameError(f"record of length {length} runs past the payload")
        yield counter, mv[i + 10 : i + 18], mv[i + 18 : stop]
        i = stop
