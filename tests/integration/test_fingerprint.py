"""rsockd's TCP looks like the host's own to a passive observer (p0f), measured on the wire.

In one namespace pair, the kernel makes a real connection (``connect()``/``accept()``) and rsockd
makes its own; tcpdump on each veth records what that side sends (the XDP backend turns inbound
tunnel segments into UDP before a capture sees them), the two captures are merged into the wire
a box between them would see, and p0f reads it.  p0f's raw signature of rsockd's SYN (client side)
and SYN-ACK (server side) must be the kernel's own, and not a fuzzy match.  In the ``tuned`` runs
the client's host is set up unlike the server's (receive buffer, TTL): rsockd's SYN follows, so
the values are derived from the host, not constants.  The
same capture shows what a signature does not: rsockd's IPv4 IDs count up per segment from a
non-zero start (0 in a SYN-ACK, as the kernel's), and its window grows as data arrives.
"""

from __future__ import annotations

import itertools
import re
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from rsockd.core.packet import SYN, TcpHeader, pack_address, parse_ip, parse_options, parse_tcp
from tests.integration.rig import Rig
from tests.integration.test_packet_path import burst
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("p0f") is None, reason="p0f is not installed")]

KERNEL_PORT = 5555
TUNNEL_PORT = 10001
_BLOCK = re.compile(r"^\.-\[ (\S+)/(\d+) -> (\S+)/(\d+) \((.+?)\) \]-$")


@dataclass(frozen=True)
class Observation:
    """One p0f observation: its kind (``syn``, ``syn+ack``...), the server's port, its fields."""

    kind: str
    server_port: int
    fields: dict[str, str]


def p0f(pcap: Path) -> list[Observation]:
    """p0f's observations of a capture, parsed from its report blocks."""
    out = subprocess.run(["p0f", "-r", str(pcap)], capture_output=True, text=True, timeout=60, check=True).stdout
    found: list[Observation] = []
    kind, port, fields = "", 0, dict[str, str]()
    for line in out.splitlines():
        m = _BLOCK.match(line)
        if m:
            kind, fields, port = m.group(5), {}, int(m.group(4))  # client -> server
        elif line.startswith("| ") and "=" in line:
            key, _, value = line[2:].partition("=")
            fields[key.strip()] = value.strip()
        elif line.startswith("`----") and kind:
            found.append(Observation(kind, port, fields))
            kind = ""
    return found


class Capture:
    """tcpdump on a namespace's veth writing ``path``; capturing once ``start()`` returns."""

    def __init__(self, net: NetnsPair, side: str, path: Path) -> None:
        self.path = path
        self.proc = net.popen(side, ["tcpdump", "-i", net.dev[side], "-Z", "root", "-U", "-n", "-w", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> Capture:
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on ...": the capture is open
        assert "listening on" in line, line
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)


def kernel_connection(net: NetnsPair, family: int, server: str) -> None:
    """A real kernel connection from the client namespace to the server namespace, with data."""
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    with net.inside("s"):
        listener = socket.socket(fam, socket.SOCK_STREAM)
    with net.inside("c"):
        client = socket.socket(fam, socket.SOCK_STREAM)
    try:
        listener.bind((server, KERNEL_PORT))
        listener.listen()
        client.settimeout(5)
        client.connect((server, KERNEL_PORT))
        conn, _ = listener.accept()
        client.sendall(b"x" * 1000)
        conn.settimeout(5)
        assert conn.recv(1000)
        conn.close()
    finally:
        client.close()
        listener.close()


def _records(pcap: Path) -> tuple[bytes, list[tuple[tuple[int, int], bytes]]]:
    """A capture's file header and its records ((seconds, fraction), record bytes with its header)."""
    data = pcap.read_bytes()
    endian = "<" if struct.unpack_from("<I", data)[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    out, off = [], 24
    while off + 16 <= len(data):
        sec, frac, caplen = struct.unpack_from(endian + "III", data, off)
        out.append(((sec, frac), data[off : off + 16 + caplen]))
        off += 16 + caplen
    return data[:24], out


def merge_outbound(out: Path, captures: dict[Path, bytes]) -> Path:
    """One capture of what each side sent (capture -> its side's address), in time order: the
    wire as a box between the two would see it."""
    header, merged = b"", []
    for path, src in captures.items():
        header, records = _records(path)
        for t, rec in records:
            frame = rec[16:]
            if len(frame) > 34 and frame[12:14] in (b"\x08\x00", b"\x86\xdd"):
                ip, _l4 = parse_ip(frame[14:])
                if ip.src == src:
                    merged.append((t, rec))
    merged.sort(key=lambda r: r[0])
    out.write_bytes(header + b"".join(rec for _t, rec in merged))
    return out


def segments(pcap: Path) -> list[tuple[bytes, int, bytes, int, bytes, TcpHeader]]:
    """Every TCP segment of a capture (Ethernet): (src, sport, dst, dport, IP packet, TCP header)."""
    out: list[tuple[bytes, int, bytes, int, bytes, TcpHeader]] = []
    for _t, rec in _records(pcap)[1]:
        frame = rec[16:]
        if len(frame) < 14 or frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
            continue
        ip, l4 = parse_ip(frame[14:])
        if ip.proto != 6:
            continue
        tcp, _payload = parse_tcp(l4)
        out.append((ip.src, tcp.sport, ip.dst, tcp.dport, frame[14:], tcp))
    return out


def _side_by_side(seen: list[Observation]) -> str:
    return "\n".join(f"{o.kind:8} :{o.server_port:<6} {o.fields.get('raw_sig')}  ({o.fields.get('params')})"
                     for o in seen if "raw_sig" in o.fields)


def _outbound(pcap: Path, port: int) -> list[tuple[bytes, TcpHeader]]:
    """The IP header and TCP header of each segment sent from ``port``, of its last connection."""
    mine = [(s[4], s[5]) for s in segments(pcap) if s[1] == port]
    first = max(i for i, (_ip, tcp) in enumerate(mine) if tcp.flags & SYN)
    return [m for m in mine[first:] if m[1].dport == mine[first][1].dport]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend, send_path, tuned", [("xdp", "raw", False), ("nft", "raw", False),
                                                       ("xdp", "packet", False), ("xdp", "raw", True)])
def test_syn_and_synack_fingerprints_are_the_kernels(tmp_path: Path, backend: str, send_path: str, tuned: bool,
                                                      family: int) -> None:
    path = ["--send-path", send_path]
    with Rig(tmp_path, backend=backend, family=family, ports=str(TUNNEL_PORT), server_args=path,
             client_args=path) as rig:
        # Each side's capture shows its own segments as they leave (the XDP backend turns the
        # tunnel's inbound segments into UDP before a capture sees them).
        caps = {side: Capture(rig.net, side, tmp_path / f"{side}.pcap").start() for side in ("c", "s")}
        try:
            if tuned:
                # The client's host tuned unlike the server's: a smaller receive buffer (another
                # window and scale) and another default TTL, which the client started next copies.
                rig.net.run("c", ["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 65536 4194304",
                                  "net.ipv4.ip_default_ttl=128", f"net.ipv6.conf.{rig.net.dev['c']}.hop_limit=128"])
            kernel_connection(rig.net, family, rig.server_addr)
            # rsockd anew: its SYN and the server's SYN-ACK in the captures.
            old = rig.clients.pop(0)
            assert old.stop() == 0, old.log()[-2000:]
            old.close()
            client = rig.add_client(name="client-again")
            rig.wait_up(client)
            res = rig.echo_run(200, size=1000)
            assert res.received >= 190, res
            if send_path == "packet":
                # Bursts leave in batches the kernel cuts into segments (GSO): their IDs too.
                assert burst(rig, 300, [client.status()["max_datagram"]]) >= 270
                assert client.status()["traffic"]["tunnel_tx_batches"] > 0
        finally:
            for cap in caps.values():
                cap.stop()
    cli, srv = (rig.net.cli6, rig.net.srv6) if family == 6 else (rig.net.cli4, rig.net.srv4)
    wire = merge_outbound(tmp_path / "wire.pcap",
                          {caps["c"].path: pack_address(cli), caps["s"].path: pack_address(srv)})
    seen = p0f(wire)
    table = _side_by_side(seen)
    # The signatures side by side (pytest -s).
    print(f"\n{backend} {send_path} IPv{family}{' (client host tuned)' if tuned else ''}\n{table}")
    for kind in ("syn", "syn+ack"):
        kernel = [o.fields for o in seen if o.kind == kind and o.server_port == KERNEL_PORT]
        ours = [o.fields for o in seen if o.kind == kind and o.server_port == TUNNEL_PORT]
        assert kernel and ours, f"p0f saw no {kind} of the kernel or of rsockd:\n{table}"
        for fields in ours:
            assert fields["raw_sig"] == kernel[0]["raw_sig"], f"{kind}: not the kernel's signature:\n{table}"
            assert fields.get("params") == kernel[0].get("params"), f"{kind}: p0f judges it otherwise:\n{table}"
            # p0f's database matches a Linux SYN with TTL 128 only fuzzily: the kernel's too.
            if not (tuned and kind == "syn"):
                assert "fuzzy" not in fields.get("params", ""), f"{kind}: a fuzzy match:\n{table}"
    if tuned:
        syn = next(o.fields["raw_sig"] for o in seen if o.kind == "syn" and o.server_port == TUNNEL_PORT)
        assert syn.startswith(f"{family}:128+0:") and ":mss*22,7:" in syn, syn  # the client host's settings

    # What a signature does not show, in each side's segments of its connection.
    client_port = [s[1] for s in segments(wire) if s[3] == TUNNEL_PORT and s[5].flags & SYN][-1]
    for side, port in (("c", client_port), ("s", TUNNEL_PORT)):
        conn = _outbound(wire, port)
        assert len(conn) > 50, (side, len(conn))
        # The window grows as data arrives, as a Linux receiver's does.
        windows = [tcp.window for _ip, tcp in conn if not tcp.flags & SYN]
        assert windows[-1] > windows[0], f"{side}: the window does not grow: {windows}"
        stamps = [parse_options(tcp.options).timestamps for _ip, tcp in conn]
        assert all(t is not None for t in stamps), side
        if family == 4:
            # IDs from a counter of the connection's own, from a random start; the SYN-ACK's is
            # 0, as the kernel's (a request socket's DF packet).
            ids = [struct.unpack_from("!H", ip, 4)[0] for ip, _tcp in conn]
            if side == "s":
                assert ids[0] == 0, ids[:5]
                ids = ids[1:]
            assert ids[0] != 0 and all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(ids)), (side, ids[:40])
