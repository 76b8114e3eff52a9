"""rsockd's macOS profile (``TcpProfile.darwin()``) as p0f sees it on the wire.

A Darwin client connection's SYN and a Darwin server connection's SYN-ACK answering it, each sent
through a raw socket from its own namespace across the veth; tcpdump on the client's veth records
both and p0f reads the capture.  The SYN must be a Mac OS X of p0f's database, not a fuzzy match.
p0f 3.09b's Mac OS X SYN-ACK signatures carry window scale 0 (servers before XNU scaled the window
of an accepted connection: ``tcp_set_max_rwinscale()``), so a SYN-ACK of today's XNU matches none;
its raw signature must be the one derived from XNU's rules.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from rsockd.core.faketcp import Connection
from rsockd.core.framing import Keyring
from rsockd.core.packet import ipv4_header, ipv6_header, pack_address, parse_tcp
from rsockd.core.tcpprofile import TcpProfile
from tests.integration.test_fingerprint import p0f
from tests.netns import NetnsPair
from tests.unit.tunnelpair import checksummed

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("p0f") is None, reason="p0f is not installed")]

CLIENT_PORT, SERVER_PORT = 50123, 10001


def _send(net: NetnsPair, side: str, family: int, src: bytes, dst: bytes, conn: Connection) -> list[bytes]:
    """Each segment ``conn`` has to send, in an IP packet as the raw send path builds it; the
    segments sent."""
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    with net.inside(side):
        sock = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)  # the header is ours
    sent = []
    with sock:
        for seg in conn.segments_to_send():
            seg = checksummed(seg, src, dst)
            if family == 6:
                hdr = bytearray(ipv6_header(src, dst, len(seg)))
                hdr[1] |= conn.ip.label >> 16
                hdr[2:4] = (conn.ip.label & 0xFFFF).to_bytes(2, "big")
            else:
                hdr = bytearray(ipv4_header(src, dst, len(seg), ident=conn.ip.take()))
            sock.sendto(bytes(hdr) + seg, (socket.inet_ntop(fam, dst), 0))
            sent.append(seg)
    return sent


@pytest.mark.parametrize("family", [4, 6])
def test_darwin_syn_is_mac_os_x_to_p0f(tmp_path: Path, family: int) -> None:
    mss = 1460 if family == 4 else 1440  # the route's: MTU 1500 less the headers
    keys = Keyring.from_secret("darwin-fp")
    rng = random.Random()
    with NetnsPair() as net:
        cli, srv = (net.cli6, net.srv6) if family == 6 else (net.cli4, net.srv4)
        c_addr, s_addr = pack_address(cli), pack_address(srv)
        client = Connection(role="client", local=(c_addr, CLIENT_PORT), remote=(s_addr, SERVER_PORT),
                            keyring=keys, mss=mss, profile=TcpProfile.darwin(), rng=rng)
        server = Connection(role="server", local=(s_addr, SERVER_PORT), remote=(c_addr, CLIENT_PORT),
                            keyring=keys, mss=mss, profile=TcpProfile.darwin(), rng=rng)
        pcap = tmp_path / "darwin.pcap"
        # The two handshake segments, then tcpdump exits by itself: all it saw is in the file.
        cap = net.popen("c", ["tcpdump", "-i", net.dev["c"], "-Z", "root", "-U", "-n", "-c", "2", "-w", str(pcap),
                              f"tcp port {CLIENT_PORT} and tcp[tcpflags] & tcp-syn != 0" if family == 4 else
                              f"tcp port {CLIENT_PORT} and ip6[53] & 2 != 0"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert cap.stderr is not None
            line = cap.stderr.readline()
            assert "listening on" in line, line
            client.connect(0.0)
            (syn_seg,) = _send(net, "c", family, c_addr, s_addr, client)
            # The server connection answers that SYN, as the acceptor would have it.
            server.accept_syn(parse_tcp(syn_seg)[0], 0.0)
            _send(net, "s", family, s_addr, c_addr, server)
            assert cap.wait(10) == 0
        finally:
            if cap.poll() is None:
                cap.kill()
                cap.wait(5)
    seen = p0f(pcap)
    table = "\n".join(f"{o.kind}: {o.fields}" for o in seen)
    print(f"\nIPv{family}\n{table}")  # pytest -s
    syn = next(o.fields for o in seen if o.kind == "syn")
    synack = next(o.fields for o in seen if o.kind == "syn+ack")
    # IPv4: DF with a non-zero ID; IPv6: a flow label (XNU's net.inet6.ip6.auto_flowlabel).
    quirks = "flow" if family == 6 else "df,id+"
    expected = f"{family}:64+0:0:{mss}:65535,4:mss,nop,ws,nop,nop,ts,sok,eol+1:{quirks}:0"
    assert syn["raw_sig"] == expected, table
    if family == 4:
        # p0f 3.09b's Mac OS X signatures are IPv4 ones (df,id+): an IPv6 SYN, a Mac's own too,
        # matches none of them.
        assert syn["os"] == "MacOS X 10.9 or newer (sometimes iPhone or iPad)", table
        assert "fuzzy" not in syn["params"] and "generic" not in syn["params"], table
    # The SYN-ACK: XNU's layout and window, the scale XNU computes, a socket's ID (p0f: "???").
    assert synack["raw_sig"] == expected, table
