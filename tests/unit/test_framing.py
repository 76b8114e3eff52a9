"""Records, frames, tags and the anti-replay window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsockd.core import framing
from rsockd.core.framing import FrameType, Hello, HelloAck, Keyring, ReplayWindow, split_records
from rsockd.errors import FrameError

NONCE = b"\x01" * 8


def seal_open(frames: bytes, key: str | None = "k") -> list[tuple[int, bytes]]:
    ring = Keyring.from_secret(key)
    rec = ring.sealer(NONCE, framing.DIR_CLIENT_TO_SERVER).seal(frames)
    opener = ring.opener(NONCE, framing.DIR_CLIENT_TO_SERVER)
    out = []
    for counter, tag, body in split_records(rec):
        assert opener.verify(counter, tag, body)
        out += [(t, bytes(b)) for t, b in framing.iter_frames(body)]
    return out


def test_frames_round_trip() -> None:
    hello = Hello(b"C" * 8, 3, 10, NONCE, 123456789, capabilities=5)
    frames = (hello.encode() + HelloAck(3).encode() + framing.data_frame(7, b"payload")
              + framing.keepalive_frame() + framing.flow_close_frame(9) + framing.close_frame(framing.CloseReason.DEAD))
    got = seal_open(frames)
    assert [t for t, _ in got] == [FrameType.HELLO, FrameType.HELLO_ACK, FrameType.DATA, FrameType.KEEPALIVE,
                                   FrameType.FLOW_CLOSE, FrameType.CLOSE]
    assert Hello.decode(got[0][1]) == hello
    assert HelloAck.decode(got[1][1]) == HelloAck(3)
    assert got[2][1] == b"\0\0\0\x07payload"


def test_coalesced_segments_split_into_their_records() -> None:
    """GRO may concatenate the payloads of several segments: records still split."""
    ring = Keyring.from_secret("k")
    sealer = ring.sealer(NONCE, 0)
    blob = b"".join(sealer.seal(framing.data_frame(i, bytes([i]) * i)) for i in range(1, 6))
    opener = ring.opener(NONCE, 0)
    seen = []
    for counter, tag, body in split_records(blob):
        assert opener.verify(counter, tag, body)
        seen += [bytes(b) for _t, b in framing.iter_frames(body)]
    assert [s[4:] for s in seen] == [bytes([i]) * i for i in range(1, 6)]


def test_tag_depends_on_key_nonce_direction_and_counter() -> None:
    frames = framing.data_frame(1, b"x")
    ring = Keyring.from_secret("k")
    rec = ring.sealer(NONCE, 0).seal(frames)
    (counter, tag, body), = split_records(rec)
    assert ring.opener(NONCE, 0).verify(counter, tag, body)
    assert not Keyring.from_secret("other").opener(NONCE, 0).verify(counter, tag, body)
    assert not Keyring.from_secret(None).opener(NONCE, 0).verify(counter, tag, body)
    assert not ring.opener(b"\x02" * 8, 0).verify(counter, tag, body)
    assert not ring.opener(NONCE, 1).verify(counter, tag, body)  # reflected back: refused
    assert not ring.opener(NONCE, 0).verify(counter + 1, tag, body)
    assert not ring.opener(NONCE, 0).verify(counter, tag, bytes(body[:-1]) + b"y")


def test_replay_window() -> None:
    w = ReplayWindow(64)
    for c in (0, 1, 5, 3):
        assert w.fresh(c)
        w.mark(c)
    assert not w.fresh(5) and not w.fresh(3) and w.fresh(4) and w.fresh(2)
    w.mark(100)
    assert not w.fresh(36) and w.fresh(37) and not w.fresh(100) and w.fresh(99)
    w.mark(100 + 1000)  # a jump larger than the window resets it
    assert w.fresh(1099) and not w.fresh(1100) and not w.fresh(1000)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 3000), max_size=300))
def test_replay_window_accepts_each_recent_counter_once(counters: list[int]) -> None:
    w = ReplayWindow(1024)
    seen: set[int] = set()
    top = -1
    for c in counters:
        expected = c not in seen and (c > top or top - c < 1024)
        assert w.fresh(c) == expected
        if expected:
            w.mark(c)
            seen.add(c)
            top = max(top, c)


@pytest.mark.parametrize("blob", [b"\x00", b"\x00\x10" + bytes(15), b"\x00\x05" + bytes(20), b"\x00\x40" + bytes(20)])
def test_truncated_records_are_frame_errors(blob: bytes) -> None:
    with pytest.raises(FrameError):
        list(split_records(blob))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_framing_parsers_raise_only_frame_error(blob: bytes) -> None:
    for fn in (lambda b: list(split_records(b)), lambda b: list(framing.iter_frames(b)), Hello.decode,
               HelloAck.decode):
        try:
            fn(blob)
        except FrameError:
            pass


def test_a_record_is_as_protocol_md_writes_it() -> None:
    # docs/protocol.md §3, computed here from its text alone: length, counter, then
    # tag = BLAKE2b(key=BLAKE2s-256(secret, person "rsockdK1"), digest 8, person "rsockdT2")
    #       (nonce ‖ direction ‖ counter ‖ frames).
    import hashlib
    import struct

    frames = framing.data_frame(7, b"payload")
    sealer = Keyring.from_secret("k").sealer(NONCE, framing.DIR_SERVER_TO_CLIENT)
    sealer.seal(b"first")
    rec = sealer.seal(frames)
    key = hashlib.blake2s(b"k", digest_size=32, person=b"rsockdK1").digest()
    counter = struct.pack("!Q", 1)
    tag = hashlib.blake2b(NONCE + bytes([1]) + counter + frames, key=key, digest_size=8, person=b"rsockdT2").digest()
    assert rec == struct.pack("!H", 16 + len(frames)) + counter + tag + frames
    assert framing.PROTOCOL_VERSION == 2
