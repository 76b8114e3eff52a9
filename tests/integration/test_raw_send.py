"""The raw send path, compiled (a run in one ``sendmmsg``, checksums in C: ``_datapath.send_raw``)
against rsockd/dataplane/rawsock.py's own loop: the same runs leave as the same packets, byte for
byte (the kernel's IPv4 length and checksum, our IDs and TCP checksums; IPv6's kernel checksum),
captured on the far end of a veth."""

from __future__ import annotations

import select
import socket
import struct
from typing import Any

import pytest

import rsockd
from rsockd.core.packet import pseudo_sum, transport_checksum_ok
from rsockd.core.tcpprofile import IpIdent
from rsockd.dataplane.rawsock import RawSender
from tests.netns import NetnsPair

datapath = pytest.importorskip("rsockd.dataplane._datapath", reason="the compiled data path is not built")
pytestmark = [pytest.mark.root, pytest.mark.skipif(rsockd.PURE, reason="RSOCKD_PURE: the package runs its source")]

ETH_P_ALL = 0x0003
PORT = 47001


def tcp_header(seq: int, sport: int) -> bytes:
    """A 32-byte header (timestamps), checksum 0, as the endpoint makes them."""
    return struct.pack("!HHIIHHHH", sport, PORT, seq, 7, (8 << 12) | 0x18, 502, 0, 0) + \
        bytes((1, 1, 8, 10)) + struct.pack("!II", 1234, 5678)


def capture(net: NetnsPair) -> socket.socket:
    with net.inside("s"):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    cap.bind((net.dev["s"], 0))
    cap.setblocking(False)
    return cap


def packets(cap: socket.socket, want: int) -> list[bytes]:
    """The IP packets to PORT that reach the server's side, in order."""
    out: list[bytes] = []
    while len(out) < want and select.select([cap], [], [], 2.0)[0]:
        frame = cap.recv(65536)
        kind = struct.unpack_from("!H", frame, 12)[0]
        ip = frame[14:]
        if kind == 0x0800 and ip[9] == 6 and struct.unpack_from("!H", ip, (ip[0] & 15) * 4 + 2)[0] == PORT:
            out.append(ip[: struct.unpack_from("!H", ip, 2)[0]])
        elif kind == 0x86DD and ip[6] == 6 and struct.unpack_from("!H", ip, 42)[0] == PORT:
            out.append(ip[: 40 + struct.unpack_from("!H", ip, 4)[0]])
    return out


def send_runs(sender: RawSender, src: bytes, dst: bytes, sport: int) -> int:
    path = sender.path(src, dst)
    ident = IpIdent()
    ident._next = 0xFFF0  # started, and wrapping within the runs
    sent = 0
    for seq, sizes in ((1000, [1200]), (0xFFFFFF00, [1200, 1200, 700]), (5, [1, 0, 999, 64] * 5)):
        path(tcp_header(seq, sport), [bytes([n & 0xFF]) * n for n in sizes], ident)
        sent += len(sizes)
    path(tcp_header(9, sport), [b"x" * 100, b"y" * 100], None)  # no IDs (a reset's): 0
    return sent + 2


@pytest.mark.parametrize("family", [4, 6])
def test_compiled_runs_leave_as_the_python_loop_sends_them(family: int) -> None:
    with NetnsPair() as net:
        src, dst = (net.cli4, net.srv4) if family == 4 else (net.cli6, net.srv6)
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        s, d = socket.inet_pton(fam, src), socket.inet_pton(fam, dst)
        cap = capture(net)
        got: dict[str, list[bytes]] = {}
        try:
            for name, io in (("python", None), ("compiled", datapath)):
                with net.inside("c"):
                    sender = RawSender(0, io=io)
                    try:
                        n = send_runs(sender, s, d, 40000)
                    finally:
                        sender.close()
                got[name] = packets(cap, n)
                assert len(got[name]) == n, name
                assert not sender.errors, sender.errors
        finally:
            cap.close()
        assert got["compiled"] == got["python"]
        for pkt in got["compiled"]:
            hl = (pkt[0] & 15) * 4 if family == 4 else 40
            assert transport_checksum_ok(pseudo_sum(s, d), pkt[hl:])
        if family == 4:
            ids = [struct.unpack_from("!H", p, 4)[0] for p in got["compiled"]]
            assert ids[:4] == [0xFFF0, 0xFFF1, 0xFFF2, 0xFFF3] and ids[-2:] == [0, 0]


def test_a_failed_send_is_counted_and_the_run_goes_on() -> None:
    """A destination the kernel refuses (no route): every segment is counted by errno, once."""
    with NetnsPair() as net:
        with net.inside("c"):
            sender = RawSender(0, io=datapath)
            try:
                path: Any = sender.path(socket.inet_pton(socket.AF_INET, net.cli4),
                                        socket.inet_pton(socket.AF_INET, "192.0.2.1"))
                path(tcp_header(1, 40001), [b"a" * 10, b"b" * 10, b"c" * 10], IpIdent())
            finally:
                sender.close()
        assert dict(sender.errors) == {"enetunreach": 3}, sender.errors
