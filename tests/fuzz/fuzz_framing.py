"""Fuzz the framing layer: records, frames, HELLO/HELLO_ACK bodies, tags, the anti-replay window.

    .venv/bin/python -m tests.fuzz.fuzz_framing -max_total_time=300

Parsers raise only ``FrameError``; sealing then opening any frames gives them back and a changed
byte never authenticates; the replay window agrees with a plain model (a set of seen counters).
"""

from __future__ import annotations

from tests.fuzz.harness import instrumented, main

with instrumented():
    from rsockd.core import framing
    from rsockd.errors import FrameError

RING = framing.Keyring.from_secret("fuzz")
NONCE = b"\x01" * 8
WINDOW = 64


def _model_window(data: bytes) -> None:
    """The window against a model: fresh = never seen and not ``WINDOW`` or more below the top."""
    w = framing.ReplayWindow(WINDOW)
    seen: set[int] = set()
    top = -1
    for i in range(0, len(data) - 1, 2):
        c = int.from_bytes(data[i : i + 2], "big") % 400
        fresh = c not in seen and (c > top or top - c < WINDOW)
        assert w.fresh(c) == fresh, (c, top)
        if fresh:
            w.mark(c)
            seen.add(c)
            top = max(top, c)


def TestOneInput(data: bytes) -> None:
    for parse in (lambda b: list(framing.split_records(b)), lambda b: list(framing.iter_frames(b)),
                  framing.Hello.decode, framing.HelloAck.decode):
        try:
            parse(data)
        except FrameError:
            pass
    frames = data[: framing.MAX_RECORD_BODY]
    rec = RING.sealer(NONCE, framing.DIR_CLIENT_TO_SERVER).seal(frames)
    opener = RING.opener(NONCE, framing.DIR_CLIENT_TO_SERVER)
    [(counter, tag, body)] = list(framing.split_records(rec))
    assert counter == 0 and bytes(body) == frames and opener.verify(counter, tag, body)
    if data:
        i = data[0] % len(rec)
        bad = rec[:i] + bytes((rec[i] ^ 0x01,)) + rec[i + 1 :]
        try:
            parts = list(framing.split_records(bad))
        except FrameError:
            parts = []
        assert not any(opener.verify(c, t, b) for c, t, b in parts), "a changed record authenticated"
    _model_window(data)


SEEDS = [
    framing.Hello(b"clientid", 0, 4, b"n" * 8, 1).encode(),
    framing.HelloAck(3).encode(),
    framing.data_frame(7, b"hello") + framing.keepalive_frame() + framing.close_frame(framing.CloseReason.DEAD),
    RING.sealer(NONCE, 0).seal(framing.flow_close_frame(9)),
]

if __name__ == "__main__":
    main(TestOneInput, SEEDS)
