#!/usr/bin/env python3
"""Paced UDP bulk transfers for tests and benchmarks (stdlib only).

    udpbulk.py sink    BIND_HOST PORT             count what arrives; print JSON when idle 2 s after data
    udpbulk.py send    HOST PORT COUNT SIZE RATE  send COUNT datagrams of SIZE bytes at RATE/s (0: flat out)
    udpbulk.py reflect BIND_HOST PORT             on "GO count size rate", send that stream back to the asker
    udpbulk.py fetch   HOST PORT COUNT SIZE RATE  ask a reflector for a stream; count it; print JSON

Every datagram starts with its 8-byte sequence number, so the receiver counts distinct ones.
Each prints one JSON line: {"datagrams", "bytes", "distinct", "seconds", "mbit_s"}.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

IDLE = 2.0
SEQ = struct.Struct("!Q")


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pace(sock: socket.socket, dst: tuple[str, int] | None, count: int, size: int, rate: float) -> float:
    """Send ``count`` datagrams of ``size`` bytes at ``rate`` per second; returns the seconds taken."""
    payload = bytearray(max(size, SEQ.size))
    send = (lambda b: sock.sendto(b, dst)) if dst else sock.send
    burst = 64
    t0 = time.perf_counter()
    for i in range(count):
        SEQ.pack_into(payload, 0, i)
        while True:
            try:
                send(payload)
                break
            except BlockingIOError:
                time.sleep(0.0002)
        if rate and i % burst == burst - 1:
            ahead = (i + 1) / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
    return time.perf_counter() - t0


def count_stream(sock: socket.socket, expect: int | None = None) -> dict[str, float]:
    buf = bytearray(65536)
    n = nbytes = 0
    seen = bytearray((expect or 0) + 1) if expect else None
    distinct = 0
    first = last = 0.0
    sock.settimeout(30.0)
    while True:
        try:
            got = sock.recv_into(buf)
        except TimeoutError:
            break
        now = time.perf_counter()
        if not n:
            first = now
            sock.settimeout(IDLE)
        last = now
        n += 1
        nbytes += got
        if seen is not None and got >= SEQ.size:
            i = SEQ.unpack_from(buf)[0]
            if i < len(seen) and not seen[i]:
                seen[i] = 1
                distinct += 1
        if expect and distinct >= expect:
            break
    secs = max(last - first, 1e-9)
    return {"datagrams": n, "bytes": nbytes, "distinct": distinct if seen is not None else n, "seconds": secs,
            "mbit_s": nbytes * 8 / secs / 1e6}


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode in ("sink", "reflect"):
        host, port = argv[1], int(argv[2])
        s = socket.socket(_family(host), socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        s.bind((host, port))
        print("ready", flush=True)
        if mode == "sink":
            print(json.dumps(count_stream(s)), flush=True)
            return 0
        while True:
            data, addr = s.recvfrom(256)
            if data.startswith(b"GO "):
                c, z, r = (float(x) for x in data.split()[1:4])
                secs = pace(s, addr, int(c), int(z), r)
                print(json.dumps({"sent": int(c), "seconds": secs}), flush=True)
    host, port, count, size, rate = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5])
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.connect((host, port))
    if mode == "send":
        secs = pace(s, None, count, size, rate)
        print(json.dumps({"sent": count, "seconds": secs}), flush=True)
        return 0
    if mode == "fetch":
        s.send(f"GO {count} {size} {rate}".encode())
        print(json.dumps(count_stream(s, expect=count)), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
