"""Which backends a configured ``backend`` tries, on each platform (``rsockd.steer.choose``)."""

from __future__ import annotations

import sys

import pytest

from rsockd.errors import SteerError
from rsockd.steer.choose import candidates, unavailable


@pytest.mark.parametrize(("backend", "platform", "expected"), [
    ("auto", "linux", ("xdp", "nft")),
    ("xdp", "linux", ("xdp",)),
    ("nft", "linux", ("nft",)),
    ("bpfdev", "linux", ("bpfdev",)),  # tried, and unavailable says why not
    ("auto", "darwin", ("bpfdev",)),
    ("bpfdev", "darwin", ("bpfdev",)),
])
def test_candidates(backend: str, platform: str, expected: tuple[str, ...]) -> None:
    assert candidates(backend, platform) == expected


@pytest.mark.parametrize("backend", ["xdp", "nft"])
def test_linux_backends_on_macos_are_refused_in_one_line(backend: str) -> None:
    with pytest.raises(SteerError, match=rf"^backend {backend}: Linux only; on macOS use auto or bpfdev$"):
        candidates(backend, "darwin")


@pytest.mark.skipif(sys.platform == "darwin", reason="the macOS backend is available there")
def test_bpfdev_is_unavailable_off_macos_with_a_reason() -> None:
    assert unavailable("bpfdev") == "BPF devices and pf anchors are the macOS backend"
    assert unavailable("nosuch") == "no such backend"
