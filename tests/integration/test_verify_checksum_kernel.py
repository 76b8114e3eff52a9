"""rsockctl verify-checksum on segments the Linux kernel made, captured with tcpdump."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scapy.error import Scapy_Exception
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from tests.netns import NetnsPair

pytestmark = pytest.mark.root

EXCHANGE = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
if sys.argv[2] == "server":
    s = socket.socket(fam); s.bind((sys.argv[1], 7000)); s.listen(); print("ready", flush=True)
    for _ in range(2):  # read to the client's FIN: closing with unread data would reset the client
        c, _a = s.accept(); data = b""
        while chunk := c.recv(65536): data += chunk
        c.sendall(data * 2); c.close()
else:
    for n in (1, 3001):
        c = socket.create_connection((sys.argv[1], 7000)); c.sendall(b"k" * n); c.shutdown(1)
        while c.recv(65536): pass
        c.close()
"""

PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 7000), timeout=5)
except ConnectionRefusedError:
    pass
"""


def _read(pcap: Path) -> list[Any]:
    try:
        return list(rdpcap(str(pcap)))
    except (FileNotFoundError, EOFError, Scapy_Exception):  # not written yet, or cut mid-record
        return []


def wait_line(proc: subprocess.Popen[str], stream: str, needle: str, timeout: float = 10) -> None:
    pipe = getattr(proc, stream)
    assert select.select([pipe], [], [], timeout)[0], f"no {needle!r} within {timeout}s"
    line = pipe.readline()
    assert needle in line, line


def test_kernel_segments_pass_and_corrupted_ones_fail(tmp_path: Path) -> None:
    pcap = tmp_path / "cap.pcap"
    with NetnsPair() as net:
        argv = ["tcpdump", "--immediate-mode", "-U", "-n", "-i", net.dev["s"], "-w", str(pcap), "tcp port 7000"]
        dump = net.popen("s", argv, stderr=subprocess.PIPE)
        try:
            wait_line(dump, "stderr", "listening on")
            for srv in (net.srv4, net.srv6):
                server = net.popen("s", [sys.executable, "-c", EXCHANGE, srv, "server"], stdout=subprocess.PIPE)
                wait_line(server, "stdout", "ready")
                net.run("c", [sys.executable, "-c", EXCHANGE, srv, "client"], timeout=20)
                assert server.wait(timeout=10) == 0
            # A last SYN to the closed port draws a RST: once tcpdump has written that, it has
            # written everything before it (stopping it earlier loses what it has not read yet).
            net.run("c", [sys.executable, "-c", PROBE, net.srv4], timeout=20)
            end = time.monotonic() + 10
            while not any(TCP in p and p[TCP].flags.R for p in _read(pcap)):
                assert time.monotonic() < end, "tcpdump never wrote the final RST"
                time.sleep(0.05)
        finally:
            dump.send_signal(signal.SIGINT)
            dump.wait(timeout=10)
    segments = []
    for pkt in rdpcap(str(pcap)):
        ip = pkt[IP] if IP in pkt else pkt[IPv6]
        segments.append((ip.src, ip.dst, bytes(pkt[TCP])))
    assert len(segments) >= 20 and any(":" in s for s, _d, _t in segments)
    assert any(len(t) > 1000 for _s, _d, t in segments)
    d = tmp_path / "pairs"
    d.mkdir()
    expected = []
    for n, (src, dst, seg) in enumerate(segments):
        if n % 3 == 2:  # every third one corrupted: one bit of the header or the payload
            b = bytearray(seg)
            b[len(b) // 2] ^= 0x08
            seg = bytes(b)
        (d / f"tcp_addrs_{n}.txt").write_text(f"{src} {dst}\n")
        (d / f"tcp_data_{n}.dat").write_bytes(seg)
        expected.append("FAIL" if n % 3 == 2 else "PASS")
    exe = Path(sys.executable).with_name("rsockctl")
    r = subprocess.run([str(exe), "verify-checksum", str(d)], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == expected
    assert r.returncode == 1 and r.stderr == ""
