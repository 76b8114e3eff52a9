"""rsockd/dataplane/packetsend.py against the real kernel: frames sent into a veth arrive on its peer as
correct TCP segments, the kernel having computed every checksum and split every batch."""

from __future__ import annotations

import os
import random
import select
import socket
import struct

import pytest

import rsockd
from rsockd.core.packet import (
    ACK,
    PSH,
    TcpHeader,
    internet_checksum,
    pack_address,
    parse_ip,
    parse_tcp,
    tcp_checksum_ok,
)
from rsockd.core.tcpprofile import IpIdent
from rsockd.dataplane.packetsend import PacketSender, resolve, resolve_all
from rsockd.netlink import Host
from tests.netns import NetnsPair

pytestmark = pytest.mark.root

ETH_P_ALL = 0x0003
MARK = 0x72736B64
TS_OPTS = bytes((1, 1, 8, 10)) + struct.pack("!II", 1234, 5678)


def capture(net: NetnsPair, side: str) -> socket.socket:
    with net.inside(side):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((net.dev[side], 0))
    return s


def frames(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` TCP frames (Ethernet header stripped) from ``sock``; others (ND, ARP) skipped."""
    out: list[bytes] = []
    while len(out) < count:
        ready, _, _ = select.select([sock], [], [], 5)
        assert ready, f"only {len(out)} of {count} segments arrived"
        data, addr = sock.recvfrom(65536)
        if addr[2] == socket.PACKET_OUTGOING:  # the receiving kernel's answers (RSTs)
            continue
        etype = struct.unpack_from("!H", data, 12)[0]
        ip = data[14:]
        if (etype == 0x0800 and ip[9] == 6) or (etype == 0x86DD and ip[6] == 6):
            out.append(ip)
    return out


def check(ip_packet: bytes) -> tuple[TcpHeader, bytes]:
    ip, l4 = parse_ip(ip_packet)
    if ip.version == 4:
        assert internet_checksum(ip_packet[:20]) == 0, "IPv4 header checksum"
    assert tcp_checksum_ok(ip.src, ip.dst, l4), "TCP checksum"
    hdr, payload = parse_tcp(l4)
    return hdr, bytes(payload)


@pytest.mark.parametrize("family", [4, 6])
def test_single_segments_and_batches_arrive_as_correct_segments(family: int) -> None:
    with NetnsPair() as net:  # tx checksum offload off: the sending kernel computes checksums
        # and no segmentation offload either: the kernel splits batches before the veth (as it
        # does when the peer has an XDP program, or for a NIC without TSO)
        net.run("c", ["ethtool", "-K", net.dev["c"], "tso", "off"])
        src, dst = (net.cli4, net.srv4) if family == 4 else (net.cli6, net.srv6)
        psrc, pdst = pack_address(src), pack_address(dst)
        with net.inside("c"), Host() as host:
            route = resolve(host, pdst, MARK)
            assert route is not None and route.ifname == net.dev["c"]
            sender = PacketSender(MARK)
            send = sender.path(route, psrc, pdst)
        ip = IpIdent()
        rng = random.Random(1)
        rng.randrange = lambda *a: 0xFFFD  # type: ignore[method-assign]
        ip.start(rng)  # near the top: the kernel's numbering of a batch wraps as ours does
        ip.new_label(random.Random(2))
        cap = capture(net, "s")
        try:
            # one segment (its checksum field is garbage: the kernel's counts)
            one = TcpHeader(40000, 10001, 1000, 77, ACK | PSH, 65535, TS_OPTS, checksum=0xBEEF).pack()
            send(one, [b"single!"], ip)
            # a batch: five full payloads and a shorter last one
            payloads = [os.urandom(1000) for _ in range(5)] + [os.urandom(321)]
            header = TcpHeader(40000, 10001, 2000, 88, ACK | PSH, 65535, TS_OPTS, checksum=0xBEEF).pack()
            send(header, payloads, ip)
            packets = frames(cap, 1 + len(payloads))
            got = [check(p) for p in packets]
        finally:
            cap.close()
            sender.close()
        assert not sender.errors
        h, p = got[0]
        assert (h.seq, h.ack, h.flags, p) == (1000, 77, ACK | PSH, b"single!")
        seq = 2000
        for i, ((h, p), want) in enumerate(zip(got[1:], payloads, strict=True)):
            assert p == want, i
            assert (h.sport, h.dport, h.seq, h.ack, h.options) == (40000, 10001, seq, 88, TS_OPTS), i
            assert h.flags == (ACK | PSH if i == len(payloads) - 1 else ACK), i  # PSH on the last only
            seq += len(want)
        # The IP header as the kernel's own TCP writes it: the route's TTL; IPv4 IDs one per
        # segment (the batch's numbered on by the kernel from its header's), IPv6 the flow label.
        assert route.ttl == 64
        if family == 4:
            assert [pkt[8] for pkt in packets] == [64] * len(packets)
            assert [struct.unpack_from("!H", pkt, 4)[0] for pkt in packets] == [0xFFFD, 0xFFFE, 0xFFFF, 0, 1, 2, 3]
            assert all(pkt[6] & 0x40 for pkt in packets)  # DF
        else:
            assert [pkt[7] for pkt in packets] == [64] * len(packets)
            assert {int.from_bytes(pkt[1:4], "big") & 0xFFFFF for pkt in packets} == {ip.label} != {0}


@pytest.mark.skipif(rsockd.PURE, reason="RSOCKD_PURE: the package runs its source")
@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("family", [4, 6])
def test_the_compiled_writer_sends_the_frames_the_packet_path_sends(family: int, role: str) -> None:
    """Two identical tunnels (tests/unit/test_datapath.py ``WriterRig``) send the same datagrams:
    one end's writer sends its records itself (``fill``'s ``wire``: _datapath.c ``wire_send``),
    the other end's transmits leave through packetsend.py.  The same frames arrive, byte for byte
    but the timestamps (each tunnel's clock is its own) and so the checksums, which are right."""
    pytest.importorskip("rsockd.dataplane._datapath", reason="the compiled data path is not built")
    from tests.unit.test_datapath import WriterRig

    with NetnsPair() as net:
        net.run("c", ["ethtool", "-K", net.dev["c"], "tso", "off"])  # segments on the veth, as above
        src, dst = (net.cli4, net.srv4) if family == 4 else (net.cli6, net.srv6)
        psrc, pdst = pack_address(src), pack_address(dst)
        with net.inside("c"), Host() as host:
            route = resolve(host, pdst, MARK)
            assert route is not None
            sender = PacketSender(MARK)
            send = sender.path(route, psrc, pdst)
            fd, eth, ttl = sender.wire(route, pdst)
        rig = WriterRig(role)
        cap = capture(net, "s")
        cap.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: every frame of the run, held
        try:
            rig.send([(i, b"first") for i in range(len(rig.sources) - (1 if role == "client" else 0))])
            for end in rig.ends:  # the flows are known now; what opened them is not compared
                end.transmits(rig.pairs[0].now)
            rig.handed_back = 0
            fast, slow = rig.ends
            (conn,) = fast.connections()
            before = conn.tx_packets
            rig.wire_of = lambda conn, now: (fd, eth, ttl, psrc, pdst, *conn.wire_state(now))
            rng = random.Random(5)
            n = len(rig.sources) - (1 if role == "client" else 0)
            rig.send([(rng.randrange(n), rng.randbytes(rng.choice((1200, 64, 7, 500, 1300)))) for _ in range(150)])
            assert rig.handed_back == 0 and rig.writer.take_errors() == []
            assert fast.transmits(rig.pairs[0].now) == []  # all of it went out from the writer
            mine = frames(cap, conn.tx_packets - before)
            for t in slow.transmits(rig.pairs[0].now):
                send(t.header, t.payloads, t.ip)
            theirs = frames(cap, len(mine))
        finally:
            cap.close()
            rig.close()
            sender.close()
        assert not sender.errors and rig.writer.tx_batches > 0

        def masked(pkt: bytes) -> bytes:
            check(pkt)  # the checksums are right
            tcp = (pkt[0] & 15) * 4 if family == 4 else 40
            return pkt[:tcp + 16] + bytes(2) + pkt[tcp + 18:tcp + 24] + bytes(8) + pkt[tcp + 32:]

        assert [masked(p) for p in mine] == [masked(p) for p in theirs]
        assert len(mine) > 20
        (twin,) = slow.connections()
        assert (conn.tx_packets, conn.tx_bytes, conn.snd_nxt, conn.ip.peek()) == \
               (twin.tx_packets, twin.tx_bytes, twin.snd_nxt, twin.ip.peek())


def test_no_route_or_no_neighbour_resolves_to_none() -> None:
    with NetnsPair() as net, net.inside("c"):
        other = net.cli4.rsplit(".", 1)[0] + ".99"  # on-link but never resolved
        dsts = [pack_address(a) for a in ("192.0.2.1", "127.0.0.1", other, net.srv4)]
        # no route at all, loopback (not Ethernet), no neighbour; the server's is resolved
        routes = resolve_all(dsts, MARK)
        assert list(routes) == dsts
        assert routes[dsts[0]] is routes[dsts[1]] is routes[dsts[2]] is None
        assert routes[dsts[3]] is not None and routes[dsts[3]].ifname == net.dev["c"]


def test_sockets_of_links_no_longer_used_are_closed() -> None:
    with NetnsPair() as net:
        with net.inside("c"):
            route = resolve_all([pack_address(net.srv4)], MARK)[pack_address(net.srv4)]
            assert route is not None
            sender = PacketSender(MARK)
            send = sender.path(route, pack_address(net.cli4), pack_address(net.srv4))
        try:
            assert sender.links == {route.ifindex}
            sender.keep_only({route.ifindex})  # still routed through it: kept, and it still sends
            send(TcpHeader(40000, 10001, 1, 2, ACK, 65535).pack(), [b"kept"], None)
            assert not sender.errors and sender.links == {route.ifindex}
            sender.keep_only(set())  # the link is gone from every route: its socket is closed
            assert sender.links == frozenset()
            send(TcpHeader(40000, 10001, 1, 2, ACK, 65535).pack(), [b"late"], None)  # a stale sender fails, counted
            assert sender.errors == {"ebadf": 1}
        finally:
            sender.close()
