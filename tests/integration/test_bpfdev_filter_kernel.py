"""The classic BPF program the macOS backend installs, run by the Linux kernel.

Classic BPF is one instruction set on both kernels, so the program ``bpfdev.receiver_filter``
builds for a macOS device (the very bytes ``BIOCSETF`` would get) is attached with
``SO_ATTACH_FILTER`` to an ``AF_PACKET``/``SOCK_RAW`` socket in the server namespace, and the
client namespace sends it tunnel segments and everything that must not match (other TCP ports,
wrong peers, fragments, UDP, ICMP), IPv4 and IPv6, for both roles:

- DLT_EN10MB: real Ethernet frames, as the kernel builds them for raw IP sends;
- DLT_NULL: the 4-byte host-order address family followed by the IP packet (what macOS's
  ``lo0``/``utun`` deliver) sent as a whole frame through a packet socket on the client's veth,
  so the server's tap sees exactly the bytes a macOS loopback tap would.  macOS's AF_INET6 is
  30; Linux's 10 and the other BSDs' 24/28 must not match;
- DLT_RAW: the IP packet alone (``SOCK_DGRAM``, L3 first).

What the socket queues is then wrapped in ``bpf_hdr`` records exactly as xnu lays them out and
read back with ``parse_records``: the packets must come out byte for byte as sent.
(tests/integration/test_cbpf_kernel.py covers ``cbpf.tunnel_filter`` itself the same way.)
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from rsockd.core.packet import ACK
from rsockd.steer import SteerPlan, bpfdev, cbpf
from rsockd.steer.bpfdev import DLT_EN10MB, DLT_NULL, DLT_RAW
from tests.integration.test_cbpf_kernel import LOCAL, PORTS, Sender, cases, pair_with_wrong_peers, segment
from tests.netns import NetnsPair
from tests.unit.test_bpfdev_records import bpf_buffer

pytestmark = pytest.mark.root

ETH_P_ALL = 3
SOL_PACKET, PACKET_IGNORE_OUTGOING = 263, 23
AF_INET_DARWIN, AF_INET6_DARWIN = 2, 30


@pytest.fixture(scope="module")
def net() -> Iterator[NetnsPair]:
    with pair_with_wrong_peers() as pair:
        yield pair


def plan_for(net: NetnsPair, role: str) -> SteerPlan:
    """The namespace ``s`` receives in both roles: as a server it serves ``PORTS``; as a client
    its peers are ``c``'s first addresses and its local port is ``LOCAL`` (as in ``cases``)."""
    return SteerPlan("itest", role, (net.dev["s"],), PORTS, frozenset({LOCAL}),  # type: ignore[arg-type]
                     frozenset({net.cli4, net.cli6}))


class NullSender:
    """Sends DLT_NULL-framed packets as raw frames on the client's veth."""

    def __init__(self, dev: str) -> None:
        self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.s.bind((dev, 0))

    def send(self, pkt: bytes, af: int | None = None) -> None:
        if af is None:
            af = AF_INET6_DARWIN if pkt[0] >> 4 == 6 else AF_INET_DARWIN
        self.s.send(struct.pack("=I", af) + pkt)

    def close(self) -> None:
        self.s.close()


def collect(rx: socket.socket, end: bytes) -> list[bytes]:
    got = []
    deadline = time.monotonic() + 5
    while True:
        assert select.select([rx], [], [], max(0.0, deadline - time.monotonic()))[0], "end marker not received"
        frame = rx.recv(65536)
        if end in frame:
            return got
        got.append(frame)


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("dlt", [DLT_EN10MB, DLT_NULL, DLT_RAW], ids=["en10mb", "null", "raw"])
def test_macos_filter_in_the_linux_kernel(net: NetnsPair, role: str, dlt: int) -> None:
    plan = plan_for(net, role)
    program = bpfdev.receiver_filter(plan, dlt)
    assert len(program) <= bpfdev.BPF_MAXINSNS
    kind = socket.SOCK_DGRAM if dlt == DLT_RAW else socket.SOCK_RAW
    with net.inside("s"):
        rx = socket.socket(socket.AF_PACKET, kind, 0)
    with net.inside("c"):
        tx: Sender | NullSender = NullSender(net.dev["c"]) if dlt == DLT_NULL else Sender()
    try:
        cbpf.attach_filter(rx, program)
        rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        rx.bind((net.dev["s"], ETH_P_ALL))
        sent = cases(net, role)
        for pkt, _want in sent:
            tx.send(pkt)
        extra_rejects: list[bytes] = []
        if isinstance(tx, NullSender):
            # Right packet, wrong family word: Linux's AF_INET6, the other BSDs', and a family
            # that disagrees with the IP version.
            good = next(p for p, want in sent if want and p[0] >> 4 == 6)
            good4 = next(p for p, want in sent if want and p[0] >> 4 == 4)
            for af, pkt in ((10, good), (24, good), (28, good), (AF_INET_DARWIN, good), (AF_INET6_DARWIN, good4)):
                tagged = pkt[:-9] + b"<bad%04d>" % af  # a distinct tag (checksum no longer matters)
                extra_rejects.append(tagged)
                tx.send(tagged, af)
        end = b"<end>"
        if role == "server":
            tx.send(segment(net.cli4, net.srv4, 40001, 10001, end))
        else:
            tx.send(segment(net.cli4, net.srv4, 10001, LOCAL, end, ACK))
        frames = collect(rx, end)

        l3 = {DLT_EN10MB: 14, DLT_NULL: 4, DLT_RAW: 0}[dlt]
        for pkt, want in sent:
            hit = any(pkt[-9:] in f for f in frames)
            assert hit == want, f"{'missed' if want else 'wrongly received'} {pkt.hex()}"
        for pkt in extra_rejects:
            assert not any(pkt[-9:] in f for f in frames), f"wrongly received {pkt.hex()}"
        assert len(frames) == sum(w for _, w in sent)

        # The same frames through the macOS record reader: out come the IP packets, whole (the
        # kernel filled in the IPv4 id and checksum the raw sends left 0; the rest is as sent).
        out = [bytes(p) for p in bpfdev.parse_records(bpf_buffer(frames, dlt), 1 << 20, dlt)]
        assert out == [f[l3:] for f in frames]
        assert sorted(p[20:] if p[0] >> 4 == 4 else p for p in out) == \
            sorted(p[20:] if p[0] >> 4 == 4 else p for p, w in sent if w)
    finally:
        rx.close()
        tx.close()
