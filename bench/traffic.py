"""The benchmark's load generator and sink, each a long-lived process driven by JSON lines.

    python -m bench.traffic gen                 in the client namespace: paced blasts and ping-pong
    python -m bench.traffic sink HOST PORT      in the server namespace: counts blasts, echoes pings

Both read one JSON command per line on stdin and answer with one JSON line on stdout, so the
harness keeps them running for a whole benchmark (no process start-up inside a measurement).

Datagrams start with an 8-byte little-endian sequence number.  A blast numbers its datagrams
``epoch << 40 | i``; the sink counts the distinct numbers of the epoch it was told to expect, so
loss is measured by sequence number, and stragglers of an earlier step or the warm-up (epoch 0)
are never counted.  A ping carries ``PING | i`` and the sink sends it straight back.

Generator commands:
    {"cmd": "blast", "dst": [host, port], "size": S, "rate": R, "secs": T, "warm": W, "epoch": E, "flows": F,
     "first": K, "cap": C}
        R datagrams/s (0: flat out) for W s of warm-up (epoch 0), then T s (at most C datagrams) of epoch E
        numbered from K; prints
        {"event": "measuring"} at the switch and {"event": "done", "sent": N, "secs": T'} at the end.
    {"cmd": "ceiling", "size": S, "secs": T, "flows": F}
        flat out into a dropping socket of its own namespace: {"sent", "secs", "pps", "cpu"}.
    {"cmd": "ping", "dst": [host, port], "size": S, "count": N, "rate": R, "timeout": T}
        N ping-pongs at R/s; {"rtt_ns": [...], "lost": L}.  The RTT ends at the kernel's receive
        timestamp of the echo (SO_TIMESTAMPNS), so the pinger's own wake-up is not in it.
Sink commands:
    {"cmd": "expect", "epoch": E, "span": N, "parts": P}
        count epoch E from now on: P generators, numbers ``part * N + i`` (i < N) of the epoch
    {"cmd": "report"}   {"distinct", "received", "bytes", "stale", "duplicates", "idle_s", "echoed"}
Both: {"cmd": "quit"}.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

from bench.mmsg import MsgBatch

EPOCH_SHIFT = 40
PING = 1 << 63
SOCKBUF = 32 << 20
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
PR_SET_TIMERSLACK = 29
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
GEN_BATCH = 256
PACE_QUANTUM = 200e-6  # pacing: wake up at most every 200 µs and send what is due in one sendmmsg
SINK_BATCH = 512
SINK_SLOT = 2048  # the largest datagram the sink takes whole (the veth MTU is 1500)
BULK_NAP = 300e-6


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _force(sock: socket.socket, opt: int, fallback: int, size: int) -> None:
    """Big socket buffers regardless of net.core.[rw]mem_max (we are root), so that neither tool
    is the one that drops."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, fallback, size)


def _timerslack() -> None:
    """1 µs timer slack instead of 50 µs: pacing sleeps are short."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# -- generator ----------------------------------------------------------------------------------


class Generator:
    def __init__(self) -> None:
        self._socks: dict[tuple[str, int, int], list[socket.socket]] = {}
        self._batches: dict[int, MsgBatch] = {}

    def sockets(self, host: str, port: int, flows: int) -> list[socket.socket]:
        """``flows`` connected sockets (one source port each: one flow each through the tunnel)."""
        key = (host, port, flows)
        socks = self._socks.get(key)
        if socks is None:
            socks = []
            for _ in range(flows):
                s = socket.socket(_family(host), socket.SOCK_DGRAM)
                _force(s, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKBUF)
                _force(s, SO_RCVBUFFORCE, socket.SO_RCVBUF, 1 << 20)
                s.connect((host, port))
                socks.append(s)
            self._socks[key] = socks
        return socks

    def batch(self, size: int) -> MsgBatch:
        b = self._batches.get(size)
        if b is None:
            b = self._batches[size] = MsgBatch(GEN_BATCH, size)
        return b

    def blast(self, socks: list[socket.socket], size: int, rate: float, secs: float, first: int,
              cap: int = 1 << 62) -> tuple[int, float]:
        """Send at ``rate``/s (0: as fast as possible) for ``secs``, at most ``cap`` datagrams;
        numbers start at ``first``.

        Pacing: send what is due, in one ``sendmmsg``; when fewer than ``min_batch`` are due, sleep
        until they are.  ``min_batch`` is 200 µs of traffic (at most 64 datagrams): bursts that short
        are invisible to 4 MB socket buffers, and the generator does not spend a wake-up per
        datagram at low rates.  Returns (sent, seconds).
        """
        b = self.batch(size)
        count = min(cap, int(rate * secs) if rate else cap)
        min_batch = max(1, min(64, int(rate * PACE_QUANTUM))) if rate else GEN_BATCH
        nsock = len(socks)
        sent = k = 0
        clock = time.perf_counter
        t0 = clock()
        end = t0 + secs
        while sent < count:
            now = clock()
            if rate:
                due = min(count, int((now - t0) * rate) + 1) - sent
                if due < min_batch and sent + due < count:
                    wake = (sent + min_batch) / rate - (now - t0)
                    if wake > 0:
                        time.sleep(wake)
                    continue
                n = min(due, GEN_BATCH)
            else:
                if now >= end:
                    break
                n = GEN_BATCH
            b.set_seqs(first + sent, n)
            try:
                sent += b.send(socks[k % nsock], n)
            except (BlockingIOError, ConnectionRefusedError):
                pass  # a full queue, or ICMP from a previous step: the datagrams count as lost
            k += 1
        return sent, clock() - t0

    def ceiling(self, size: int, secs: float, flows: int) -> dict[str, Any]:
        """Flat out into a socket on 127.0.0.1 whose filter drops everything: the generator alone
        (its own sends and the kernel's delivery, no receiving program)."""
        from rsockd.steer import cbpf

        drop = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        drop.bind(("127.0.0.1", 0))
        host, port = drop.getsockname()
        try:
            cbpf.attach_filter(drop, cbpf.drop_all())
            socks = self.sockets(host, port, flows)
            cpu0 = time.process_time()
            sent, took = self.blast(socks, size, 0, secs, 0)
            cpu = time.process_time() - cpu0
        finally:
            drop.close()
            for s in self._socks.pop((host, port, flows), []):
                s.close()
        return {"sent": sent, "secs": took, "pps": sent / took, "cpu": cpu / took}

    def ping(self, host: str, port: int, size: int, count: int, rate: float, timeout: float) -> dict[str, Any]:
        s = socket.socket(_family(host), socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.connect((host, port))
        s.settimeout(timeout)
        msg = bytearray(max(size, 8))
        rtts: list[int] = []
        lost = 0
        t0 = time.perf_counter()
        anc = socket.CMSG_SPACE(16)
        try:
            for i in range(count):
                ahead = t0 + i / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
                struct.pack_into("<Q", msg, 0, PING | i)
                sent_at = time.time_ns()
                s.send(msg)
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        data, cmsgs, _flags, _addr = s.recvmsg(65536, anc)
                    except (TimeoutError, ConnectionRefusedError):
                        lost += 1
                        break
                    if data[:8] == msg[:8]:
                        stamp = next((d for lvl, typ, d in cmsgs
                                      if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS), None)
                        if stamp is not None and len(stamp) >= 16:
                            sec, nsec = struct.unpack("@qq", stamp[:16])
                            rtts.append(sec * 1_000_000_000 + nsec - sent_at)
                        else:
                            rtts.append(time.time_ns() - sent_at)
                        break
                    left = deadline - time.monotonic()  # a late echo of an earlier ping: skip it
                    if left <= 0:
                        lost += 1
                        break
                    s.settimeout(left)
                s.settimeout(timeout)
        finally:
            s.close()
        return {"rtt_ns": rtts, "lost": lost}

    def serve(self) -> None:
        _timerslack()
        _out({"event": "ready", "pid": os.getpid()})
        for line in sys.stdin:
            cmd = json.loads(line)
            what = cmd["cmd"]
            if what == "quit":
                return
            if what == "ceiling":
                _out(self.ceiling(int(cmd["size"]), float(cmd["secs"]), int(cmd.get("flows", 1))))
                continue
            host, port = cmd["dst"][0], int(cmd["dst"][1])
            if what == "blast":
                socks = self.sockets(host, port, int(cmd.get("flows", 1)))
                size, rate = int(cmd["size"]), float(cmd["rate"])
                if cmd.get("warm", 0) > 0:
                    self.blast(socks, size, rate, float(cmd["warm"]), 0)
                _out({"event": "measuring"})
                first = (int(cmd["epoch"]) << EPOCH_SHIFT) + int(cmd.get("first", 0))
                sent, secs = self.blast(socks, size, rate, float(cmd["secs"]), first, int(cmd.get("cap", 1 << 62)))
                _out({"event": "done", "sent": sent, "secs": secs})
            elif what == "ping":
                _out(self.ping(host, port, int(cmd["size"]), int(cmd["count"]), float(cmd["rate"]),
                               float(cmd.get("timeout", 0.5))))
            else:
                _out({"error": f"unknown command {what!r}"})


# -- sink ---------------------------------------------------------------------------------------


class Sink:
    """Counts the distinct sequence numbers of one epoch; echoes pings.

    An epoch has ``parts`` disjoint ranges of ``span`` numbers, one per generator process:
    ``epoch << 40 | part * span + i``.  Each range arrives in order (one flow, FIFO paths), but the
    ranges interleave.  Fast path: sort the batch (C), cut it per range (bisect); a piece that is
    exactly ``range(a, a + n)`` with ``a`` above every number seen in its range cannot hold a
    duplicate and is counted with one slice.  Anything else (a gap, reordering, a duplicate, a
    ping, another epoch) goes one by one through a bitmap of the epoch.
    """

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        _force(self.sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCKBUF)
        _force(self.sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, 1 << 20)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.batch = MsgBatch(SINK_BATCH, SINK_SLOT, names=True)
        self.expect(0, 0, 1)
        self.echoed = 0

    def expect(self, epoch: int, span: int, parts: int) -> None:
        self.base = epoch << EPOCH_SHIFT
        self.span = span
        self.limit = self.base + span * parts
        self.seen = bytearray(span * parts)
        self.edges = [self.base + p * span for p in range(1, parts)]
        self.tops = [self.base + p * span - 1 for p in range(parts)]  # numbers counted in part p are <= tops[p]
        self.distinct = self.received = self.nbytes = self.stale = self.duplicates = 0
        self.last_rx = time.monotonic()

    def _batch(self, n: int) -> None:
        b = self.batch
        seqs = b.seqs(n).tolist()
        self.received += n
        self.nbytes += sum(b.lengths(n))
        self.last_rx = time.monotonic()
        ordered = sorted(seqs)
        if ordered[0] >= self.base and ordered[-1] < self.limit:
            cuts = [0, *(bisect.bisect_left(ordered, e) for e in self.edges), n]
            tops, seen, base = self.tops, self.seen, self.base
            pieces = []
            for p in range(len(tops)):
                lo, hi = cuts[p], cuts[p + 1]
                if lo == hi:
                    continue
                first, last = ordered[lo], ordered[hi - 1]
                if first <= tops[p] or last - first != hi - lo - 1 or ordered[lo:hi] != list(range(first, last + 1)):
                    break
                pieces.append((p, first, last))
            else:
                for p, first, last in pieces:
                    seen[first - base : last - base + 1] = b"\x01" * (last - first + 1)
                    tops[p] = last
                self.distinct += n
                return
        self._slow(seqs, n)

    def _slow(self, seqs: list[int], n: int) -> None:
        b = self.batch
        base, limit, seen, span = self.base, self.limit, self.seen, self.span
        for i, q in enumerate(seqs):
            if q & PING:
                self.received -= 1
                self.nbytes -= b.lengths(n)[i]
                try:
                    self.sock.sendto(b.payload(i), b.sender(i))
                    self.echoed += 1
                except OSError:
                    pass
            elif base <= q < limit:
                j = q - base
                if seen[j]:
                    self.duplicates += 1
                else:
                    seen[j] = 1
                    self.distinct += 1
                    p = j // span
                    if q > self.tops[p]:
                        self.tops[p] = q
            else:
                self.stale += 1

    def report(self) -> dict[str, Any]:
        return {"distinct": self.distinct, "received": self.received, "bytes": self.nbytes, "stale": self.stale,
                "duplicates": self.duplicates, "idle_s": time.monotonic() - self.last_rx, "echoed": self.echoed}

    def serve(self) -> None:
        _timerslack()
        _out({"event": "ready", "pid": os.getpid()})
        stdin = sys.stdin.fileno()
        poll = select.poll()
        poll.register(self.sock.fileno(), select.POLLIN)
        poll.register(stdin, select.POLLIN)
        pending = b""
        while True:
            for fd, _ev in poll.poll(100):
                if fd == stdin:
                    chunk = os.read(stdin, 65536)
                    if not chunk:
                        return
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        cmd = json.loads(line)
                        if cmd["cmd"] == "quit":
                            return
                        if cmd["cmd"] == "expect":
                            self.expect(int(cmd["epoch"]), int(cmd["span"]), int(cmd.get("parts", 1)))
                            _out({"ok": True})
                        elif cmd["cmd"] == "report":
                            _out(self.report())
                        else:
                            _out({"error": f"unknown command {cmd['cmd']!r}"})
                    continue
                # Drain the socket, but look at the control pipe at least every 64 batches.
                echoed = self.echoed
                got = 0
                for _ in range(64):
                    n = self.batch.recv(self.sock)
                    if not n:
                        break
                    got += n
                    self._batch(n)
                if got and self.echoed == echoed:
                    # Bulk: let a few hundred µs of datagrams gather in the (32 MB) buffer rather than
                    # wake for every few: the sink's CPU is taken from the path it measures.  Never
                    # while echoing pings: that would be latency.
                    time.sleep(BULK_NAP)


def main(argv: list[str]) -> int:
    if argv[:1] == ["gen"]:
        Generator().serve()
        return 0
    if argv[:1] == ["sink"] and len(argv) == 3:
        Sink(argv[1], int(argv[2])).serve()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
