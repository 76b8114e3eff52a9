"""The packet and framing properties of the atheris harnesses (tests/fuzz), driven by hypothesis.

One statement of each property (``tests.fuzz.fuzz_packet`` / ``fuzz_framing``), two drivers: here
hypothesis feeds it structured inputs -- real TCP segments with Linux's or arbitrary options,
steered segments, IP packets, sealed records -- and mutations of them, which random bytes alone
seldom reach (a header that parses, a record that splits); atheris runs the same functions for
hours.  What they check: parsers raise only their own error; what parses re-packs to the same
bytes; the XDP rewrite parses back to the same header and keeps checksum validity; sealed records
open, changed ones never authenticate; the replay window equals a set model.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("RSOCKD_FUZZ_NO_ATHERIS", "1")  # plain imports: no atheris instrumentation in the suite

from rsockd.core import framing
from rsockd.core.packet import (
    TcpHeader,
    build_options,
    ipv4_header,
    ipv6_header,
    pseudo_sum,
    steer_rewrite,
)
from tests.fuzz import fuzz_framing, fuzz_packet

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = bytes(15) + b"\1", bytes(15) + b"\2"

options = st.one_of(
    st.just(b""),
    st.builds(lambda m, s, t, w: build_options(mss=m, sack_permitted=s, timestamps=t, wscale=w),
              st.none() | st.integers(0, 0xFFFF), st.booleans(),
              st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
              st.none() | st.integers(0, 14)),
    st.integers(1, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
)
segments = st.builds(
    lambda sp, dp, seq, ack, fl, win, opts, payload, good: TcpHeader(sp, dp, seq, ack, fl, win, opts).pack(
        payload, pseudo_sum(A4, B4) if good else None),
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 0x1FF), st.integers(0, 0xFFFF), options, st.binary(max_size=200), st.booleans())


def _mutated(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


mutations = st.tuples(segments, st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1,
                                         max_size=4)).map(lambda t: _mutated(*t))
packets = st.one_of(
    st.binary(max_size=200),
    segments,
    mutations,
    segments.map(lambda s: ipv4_header(A4, B4, len(s)) + s),
    segments.map(lambda s: ipv6_header(A6, B6, len(s)) + s),
    segments.map(lambda s: steer_rewrite(s)[8:]),
)


@settings(max_examples=1500, deadline=None)
@given(packets)
def test_packet_properties(data: bytes) -> None:
    fuzz_packet.TestOneInput(data)


frames = st.lists(st.one_of(
    st.builds(framing.data_frame, st.integers(0, 2**32 - 1), st.binary(max_size=60)),
    st.just(framing.keepalive_frame()),
    st.builds(framing.flow_close_frame, st.integers(0, 2**32 - 1)),
    st.sampled_from(list(framing.CloseReason)).map(framing.close_frame),
    st.builds(lambda *a: framing.Hello(*a).encode(), st.binary(min_size=8, max_size=8), st.integers(0, 0xFFFF),
              st.integers(0, 0xFFFF), st.binary(min_size=8, max_size=8), st.integers(0, 2**64 - 1)),
    st.builds(lambda i: framing.HelloAck(i).encode(), st.integers(0, 0xFFFF)),
    st.binary(max_size=20),
), max_size=5).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=300), frames, frames.map(lambda f: framing.Keyring.from_secret("x").sealer(
    b"n" * 8, 0).seal(f))))
def test_framing_properties(data: bytes) -> None:
    fuzz_framing.TestOneInput(data)
