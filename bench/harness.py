"""rsockd benchmark: plain UDP and rsockd through the same veth, in the same run.

    sudo ./bench/run              full run (~10 min): 64, 512, 1200 B; xdp and nft
    sudo ./bench/run --quick      1200 B only, coarse search (~1-2 min)
    sudo ./bench/run --help       every knob

Two namespaces joined by a veth (``tests.netns.NetnsPair``).  The same generator (client
namespace) and the same sink (server namespace), both ``bench.traffic``, measure first *plain*
UDP straight across the veth to the sink's own address, then, for each backend, a real rsockd
server/client pair started by the integration rig (``tests.integration.rig``): the generator sends
to the client's listen address and the server forwards to the sink on 127.0.0.1.

For every path and payload size: the sustained rate (the highest offered rate whose loss, counted
by sequence number at the sink, is at most 1 %, found by search), round-trip latency at a light
fixed rate, CPU of each daemon per GB and per million datagrams, RSS, and time to READY; then iperf3 TCP
through WireGuard (wireguard-go) over rsockd and straight over UDP (``bench.wireguard``).  Every
comparison is a ratio to plain UDP measured in the same run.  docs/bench.md explains each number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from bench import pyspy, wireguard
from bench.procstat import Snapshot, rss_mb
from bench.report import evaluate_targets, render
from bench.tools import REPO, Tool, stop
from bench.wireguard import WG_OVERHEAD, WgError, WgPath, WgTunnel
from tests.integration.rig import LISTEN_PORT, Rig, Rsockd, nstat
from tests.netns import NetnsPair

SCHEMA = 1
SINK_PORT = 9100
LOSS_MAX = 0.01  # the sustained-rate criterion: at most 1 % lost
SHORT = 0.97  # a step whose generator sent less than this share of the offered rate proves nothing
MIN_RATE = 1000.0
PING_WARM = 10  # pings sent before the measured ones (flow set-up, caches)
NSTAT = ("UdpRcvbufErrors", "UdpSndbufErrors", "UdpInCsumErrors", "UdpNoPorts")
KEY = "rsockd-bench"
WG_PLAIN_PORT = 51820  # the server-side wireguard-go's port, WireGuard straight over UDP
WG_RSOCKD_PORT = 51821  # the server-side wireguard-go's port, WireGuard over rsockd (the server's target)
FLOOR_PORT = 9200  # the latency floor's relays (bench/relayfloor.c): each listens on it in its namespace
T = TypeVar("T")


# -- options ------------------------------------------------------------------------------------


#: What --backends takes: a steering backend with the default send path (``auto``: the packet path on
#: the bench's namespaces, which filter nothing), and with "+raw" or "+packet" the one forced.
BACKENDS = ("xdp", "nft", "xdp+raw", "nft+raw", "xdp+packet", "nft+packet")


@dataclass
class Options:
    sizes: tuple[int, ...] = (64, 512, 1200)
    backends: tuple[str, ...] = ("xdp", "nft", "xdp+raw")  # +raw: the daemons with send_path = "raw"
    step: float = 2.0  # measured seconds per search step
    warm: float = 0.5  # warm-up seconds before each step (same rate, not counted)
    resolution: float = 0.05  # the search stops when hi/lo <= 1 + resolution
    max_steps: int = 9
    pings: int = 2000
    ping_rate: float = 1000.0
    flows: int = 1  # sockets per generator process
    gen_procs: int = 2  # generator processes (one flow each by default)
    workers: int = 1
    all_cores: str = "auto"  # the "workers on all cores" run: auto (when the daemon has workers), on, off
    offload: bool = True
    gro: bool = True
    ports: str = "10001-10004"
    profile: float = 8.0  # seconds of py-spy per backend; 0: none
    profile_size: int = 1200
    ceiling: float = 2.0  # seconds per size of the generator-alone ceiling
    iperf3: bool = True
    wireguard: bool = True
    wg_seconds: float = 3.0  # seconds of iperf3 TCP through WireGuard, per path and round
    wg_rounds: int = 3  # iperf3 runs per path, the paths in turn; the median round counts
    recheck: bool = True
    wait_idle: float = 0.0
    out: Path = REPO / "bench" / "results"
    quick: bool = False
    keep_logs: bool = False
    max_other: float = 0.25  # CPUs other programs may use during a step before it is measured again
    retries: int = 3
    rsockd_rev: str | None = None  # measure rsockd as committed at this revision, not the working tree
    argv: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Results: a table on stdout, JSON in bench/results/<timestamp>.json.")
    p.add_argument("--quick", action="store_true",
                   help="1200 B only, 1 s steps, coarse search, short pings; no iperf3 UDP reference, re-check or "
                        "profile (the WireGuard stage stays: ~20 s on a quiet machine)")
    p.add_argument("--sizes", help="payload sizes, comma-separated (default 64,512,1200; quick: 1200)")
    p.add_argument("--backends", help="rsockd backends, comma-separated (default xdp,nft; none: plain UDP only)")
    p.add_argument("--step-seconds", type=float, help="measured seconds per search step (default 2; quick: 1)")
    p.add_argument("--warmup-seconds", type=float, help="warm-up before each step (default 0.5; quick: 0.3)")
    p.add_argument("--resolution", type=float, help="stop the search at hi/lo <= 1+R (default 0.05; quick: 0.25)")
    p.add_argument("--max-steps", type=int, help="search steps per size and path (default 9; quick: 5)")
    p.add_argument("--pings", type=int, help="latency samples per size and path (default 2000; quick: 300)")
    p.add_argument("--ping-rate", type=float, default=1000.0, help="ping-pongs per second (default 1000)")
    p.add_argument("--gen-procs", type=int, default=2,
                   help="generator processes (default 2: the highest clean plain-UDP rate here, docs/bench.md)")
    p.add_argument("--flows", type=int, default=1, help="sockets (flows) per generator process (default 1)")
    p.add_argument("--workers", type=int, default=1, help="passed to the server as --workers N (default 1)")
    p.add_argument("--all-cores", choices=("auto", "on", "off"), default="auto",
                   help="also measure xdp at the largest size with --workers = CPUs: auto = when the daemon's "
                        "status reports workers (default)")
    p.add_argument("--offload", choices=("on", "off"), default="on",
                   help="veth tx checksum offload (default on: see docs/bench.md)")
    p.add_argument("--gro", choices=("on", "off"), default="on",
                   help="GRO on the veth, as physical NICs and virtio-net have it (default on; veth's own "
                        "default is off: see docs/bench.md)")
    p.add_argument("--ports", default="10001-10004", help="tunnel ports (default 10001-10004)")
    p.add_argument("--profile-seconds", type=float, help="py-spy both daemons under load, per backend "
                   "(default 8; quick: 0 = off)")
    p.add_argument("--ceiling-seconds", type=float, help="generator-alone ceiling per size (default 2; quick: 1)")
    p.add_argument("--no-iperf3", action="store_true", help="skip the iperf3 reference")
    p.add_argument("--no-wireguard", action="store_true",
                   help="skip iperf3 TCP through WireGuard (wireguard-go) over rsockd and over plain UDP")
    p.add_argument("--wireguard-rounds", type=int, default=3, metavar="N",
                   help="iperf3 runs per path, rsockd and plain in turn; the median counts (default 3)")
    p.add_argument("--wireguard-seconds", type=float, default=3.0, metavar="SECS",
                   help="seconds of iperf3 TCP through WireGuard, per path and round (default 3)")
    p.add_argument("--no-recheck", action="store_true", help="skip re-measuring plain UDP at the end (drift)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECS",
                   help="first wait up to SECS for other programs' CPU use to drop below 0.15 CPU")
    p.add_argument("--max-other", type=float, default=0.25, metavar="CPUS",
                   help="measure a step again when other programs used more than this during it (default 0.25)")
    p.add_argument("--retries", type=int, help="times a disturbed step is measured again (default 3; quick: 1)")
    p.add_argument("--out", type=Path, help="directory for the JSON (default bench/results)")
    p.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs (default: only on failure)")
    p.add_argument("--rsockd", metavar="REV", dest="rsockd_rev",
                   help="run the daemons from rsockd as committed at REV (e.g. HEAD, a branch) instead of the "
                        "working tree: compare before/after a change, or measure while the tree is being edited")
    a = p.parse_args(list(argv))
    o = Options(argv=list(argv), quick=a.quick)
    if a.quick:
        o.sizes, o.step, o.warm, o.resolution, o.max_steps, o.pings = (1200,), 1.0, 0.3, 0.25, 5, 300
        o.profile, o.ceiling, o.iperf3, o.recheck, o.retries = 0.0, 1.0, False, False, 1
    if a.sizes:
        o.sizes = tuple(int(x) for x in a.sizes.split(","))
    if a.backends:
        o.backends = tuple(x.strip() for x in a.backends.split(",") if x.strip() and x.strip() != "none")
        bad = set(o.backends) - set(BACKENDS)
        if bad:
            p.error(f"--backends: unknown {', '.join(sorted(bad))} ({', '.join(BACKENDS)})")
    for name in ("step", "warm", "resolution", "max_steps", "pings", "profile", "ceiling"):
        arg = {"step": a.step_seconds, "warm": a.warmup_seconds, "profile": a.profile_seconds,
               "ceiling": a.ceiling_seconds}.get(name, getattr(a, name, None))
        if arg is not None:
            setattr(o, name, arg)
    o.ping_rate, o.flows, o.workers, o.all_cores = a.ping_rate, a.flows, a.workers, a.all_cores
    o.gen_procs = max(1, a.gen_procs)
    o.offload, o.gro, o.ports = a.offload == "on", a.gro == "on", a.ports
    o.iperf3 = o.iperf3 and not a.no_iperf3
    o.wireguard, o.wg_seconds = not a.no_wireguard, max(1.0, a.wireguard_seconds)
    o.wg_rounds = max(1, a.wireguard_rounds)
    o.recheck = o.recheck and not a.no_recheck
    o.wait_idle, o.keep_logs, o.rsockd_rev, o.max_other = a.wait_idle, a.keep_logs, a.rsockd_rev, a.max_other
    if a.retries is not None:
        o.retries = max(0, a.retries)
    o.profile_size = max(o.sizes) if 1200 not in o.sizes else 1200
    if a.out:
        o.out = a.out
    if min(o.sizes) < 8:
        p.error("--sizes: each datagram carries an 8-byte sequence number: 8 bytes at least")
    return o


# -- one step and the search ----------------------------------------------------------------------


@dataclass
class Step:
    """One measured interval at one offered rate."""

    offered: float  # datagrams/s asked of the generator; 0 = flat out
    sent: int
    secs: float
    delivered: int  # distinct sequence numbers of this step at the sink
    cpu: dict[str, float]  # CPU seconds during the step (+ drain) per process, and the machine's
    drops: dict[str, int]  # kernel drop counters during the step, per namespace
    wall: float  # seconds between the two CPU snapshots (the step and its drain)
    system: dict[str, float] = field(default_factory=dict)  # of ``cpu``, the kernel's share per process
    retries: int = 0  # times the step was measured again because other programs disturbed it

    @property
    def other_cpus(self) -> float:
        """CPUs used by programs other than ours during the step."""
        return self.cpu.get("other", 0.0) / self.wall if self.wall else 0.0

    @property
    def sent_pps(self) -> float:
        return self.sent / self.secs if self.secs else 0.0

    @property
    def delivered_pps(self) -> float:
        return self.delivered / self.secs if self.secs else 0.0

    @property
    def loss(self) -> float:
        return 1 - self.delivered / self.sent if self.sent else 1.0

    @property
    def short(self) -> bool:
        """The generator could not send what was offered."""
        return bool(self.offered) and self.sent_pps < SHORT * self.offered

    @property
    def passed(self) -> bool:
        return self.sent > 0 and self.loss <= LOSS_MAX and not self.short

    def as_json(self) -> dict[str, Any]:
        return {"offered_pps": round(self.offered) if self.offered else "flat out",
                "sent_pps": round(self.sent_pps), "delivered_pps": round(self.delivered_pps),
                "loss": round(self.loss, 5), "passed": self.passed, "generator_short": self.short,
                "sent": self.sent, "secs": round(self.secs, 3), "other_cpus": round(self.other_cpus, 3),
                "retries": self.retries,
                "cpu_cores": {k: round(v / self.wall, 3) for k, v in self.cpu.items()} if self.wall else {},
                "kernel_drops": self.drops}


class Interrupted(Exception):
    """SIGTERM (or SIGHUP): unwind through every ``finally`` like Ctrl-C does."""


class Bench:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="rsockd-bench-"))
        self.net = NetnsPair(offload=opts.offload, gro=opts.gro)
        self.gens: list[Tool] = []
        self.sink: Tool | None = None
        self.pair: BenchRig | None = None
        self.epoch = 0
        self.failed = False
        self.code: dict[str, Any] = {}
        self._cwd = os.getcwd()
        self._pythonpath = os.environ.get("PYTHONPATH")
        self.log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)

    # -- set-up and tear-down -----------------------------------------------------------------

    def __enter__(self) -> Bench:
        try:
            # The daemons run with this cwd: never the repository, whose rsockd/ would shadow an
            # exported revision in `python -m rsockd.steer.bcc_loader`.
            os.chdir(self.tmp)
            if self.o.rsockd_rev:
                self.code = export_rsockd(self.o.rsockd_rev, self.tmp / "src")
                os.environ["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(self.tmp / "src"), os.environ.get("PYTHONPATH")) if p)
            self.net.setup()
            self.sink = Tool(self.net, "s", ["sink", "0.0.0.0", str(SINK_PORT)], self.tmp / "sink.log")
            for k in range(self.o.gen_procs):
                self.gens.append(Tool(self.net, "c", ["gen"], self.tmp / f"gen{k}.log"))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.failed = exc_type is not None
        self.close()

    def close(self) -> None:
        try:
            self._close_pair()
        finally:
            for t in [*self.gens, self.sink]:
                if t is not None:
                    t.close()
            self.net.close()
            os.chdir(self._cwd)
            if self._pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = self._pythonpath
            if self.failed or self.o.keep_logs:
                self.log(f"logs kept in {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def tools(self) -> tuple[list[Tool], Tool]:
        assert self.gens and self.sink is not None
        return self.gens, self.sink

    # -- measuring ----------------------------------------------------------------------------

    def pids(self) -> dict[str, list[int]]:
        gens, sink = self.tools
        out = {"generator": [g.pid for g in gens], "sink": [sink.pid]}
        if self.pair is not None:
            out.update({k: [v] for k, v in self.pair.pids().items()})
        return out

    def kernel_drops(self) -> dict[str, int]:
        out = {}
        for side in ("c", "s"):
            for k, v in nstat(self.net, side, *NSTAT).items():
                out[f"{side}:{k}"] = v
        out["softnet_dropped"] = _softnet_dropped()
        return out

    def step(self, dst: tuple[str, int], size: int, rate: float, secs: float | None = None,
             at_start: Callable[[], None] | None = None) -> Step:
        """One measured step; measured again (up to ``retries`` times, after the machine calms down)
        when other programs used more than ``max_other`` CPU during it: this machine is shared."""
        for attempt in range(self.o.retries + 1):
            s = self._step(dst, size, rate, secs, at_start)
            s.retries = attempt
            if s.other_cpus <= self.o.max_other or attempt == self.o.retries or at_start is not None:
                return s
            self.log(f"    (other programs used {s.other_cpus:.2f} CPU during that step: measuring it again)")
            self.wait_idle(60)
        raise AssertionError("unreachable")

    def _step(self, dst: tuple[str, int], size: int, rate: float, secs: float | None,
              at_start: Callable[[], None] | None) -> Step:
        """Warm up, then send ``secs`` at ``rate`` (0: flat out) and count what the sink got."""
        gens, sink = self.tools
        secs = self.o.step if secs is None else secs
        self.epoch += 1
        each = rate / len(gens)
        span = int(each * secs) + 1 if rate else int(3e6 * secs)  # flat out: a cap no generator reaches
        sink.call({"cmd": "expect", "epoch": self.epoch, "span": span, "parts": len(gens)})
        pids = self.pids()
        for k, g in enumerate(gens):
            g.send({"cmd": "blast", "dst": list(dst), "size": size, "rate": each, "secs": secs, "warm": self.o.warm,
                    "epoch": self.epoch, "flows": self.o.flows, "first": k * span, "cap": span})
        for g in gens:
            g.read(self.o.warm + 30)  # "measuring"
        before, t0 = Snapshot.take(pids), time.monotonic()
        drops0 = self.kernel_drops()
        if at_start is not None:
            at_start()
        dones = [g.read(secs + 60) for g in gens]
        # Drain: what is still queued in the daemons or socket buffers belongs to this step.
        end = time.monotonic() + 3.0
        while True:
            rep = sink.call({"cmd": "report"})
            if rep["idle_s"] >= 0.15 or time.monotonic() > end:
                break
            time.sleep(0.05)
        after, wall = Snapshot.take(pids), time.monotonic() - t0
        drops1 = self.kernel_drops()
        cpu, system = before.until(after), before.system_until(after)
        drops = {k: drops1[k] - drops0[k] for k in drops0 if drops1[k] != drops0[k]}
        took = max(float(d["secs"]) for d in dones)
        return Step(rate, sum(int(d["sent"]) for d in dones), took, int(rep["distinct"]), cpu, drops, wall, system)

    def search(self, label: str, dst: tuple[str, int], size: int, hint: float | None = None) -> dict[str, Any]:
        """The highest offered rate with loss <= 1 %.

        A flat-out probe gives a failing upper bound.  The first guess is ``hint`` (the same path's
        result at the previous size) or 95 % of what the probe delivered (a poor guess for rsockd:
        overloaded, it delivers far less than it sustains, the generator and the kernel's drops
        taking its CPU).  From the guess the search steps down
        (x0.7) until a step passes, or up (x1.25 from a hint, x1.5 otherwise) until one fails, then
        bisects (geometric mean) until hi/lo <= 1 + resolution.  If the flat-out probe itself
        passes, the path took everything the generator could send (generator-limited).
        """
        o = self.o
        steps: list[Step] = []

        def run(rate: float) -> Step:
            s = self.step(dst, size, rate)
            steps.append(s)
            self.log(f"  {label:>6} {size:>5} B  offered {_rate(rate):>10}  sent {s.sent_pps:>9.0f}/s  "
                     f"delivered {s.delivered_pps:>9.0f}/s  loss {s.loss:7.2%}  {'ok' if s.passed else 'fail'}"
                     + (f"  (other programs {s.other_cpus:.2f} CPU)" if s.other_cpus > o.max_other else ""))
            return s

        probe = run(0)
        best: Step | None = probe if probe.passed else None
        if best is None:
            hi, lo, hi_is_probe = probe.sent_pps, 0.0, True
            guess = hint if hint else probe.delivered_pps * 0.95
            up = 1.25 if hint else 1.5
            rate = min(max(MIN_RATE, guess), hi / up)
            while len(steps) < o.max_steps and not lo:  # down until one passes
                s = run(rate)
                if s.passed:
                    lo, best = rate, s
                    break
                hi, hi_is_probe = rate, False
                if rate <= MIN_RATE:
                    break
                # What a step delivered says where the limit is, unless other programs took the CPU.
                near = s.delivered_pps * 0.95 if s.other_cpus <= o.max_other else rate
                rate = max(MIN_RATE, min(rate * 0.7, near))
            while lo and hi_is_probe and len(steps) < o.max_steps and hi / lo > up:  # up while it passes
                rate = lo * up
                s = run(rate)
                if not s.passed:
                    hi = rate
                    break
                lo, best = rate, s
            while best is not None and len(steps) < o.max_steps and hi / lo > 1 + o.resolution:
                mid = math.sqrt(lo * hi)
                s = run(mid)
                if s.passed:
                    lo = mid
                    if s.sent_pps > best.sent_pps:
                        best = s
                else:
                    hi = mid
        result: dict[str, Any] = {"steps": [s.as_json() for s in steps]}
        if best is None:
            result.update(pps=0.0, mbit_s=0.0, delivered_pps=0.0, loss=None, generator_limited=False, cpu=None)
            return result
        result.update(
            pps=round(best.sent_pps), mbit_s=round(best.sent_pps * size * 8 / 1e6, 1),
            delivered_pps=round(best.delivered_pps), loss=round(best.loss, 5),
            generator_limited=best is probe,
            cpu=self.cpu_figures(best, size),
        )
        return result

    def cpu_figures(self, s: Step, size: int) -> dict[str, Any]:
        """CPU of each process in the best step, per carried datagram and per GB of payload."""
        n = max(s.delivered, 1)
        gb = n * size / 1e9
        out: dict[str, Any] = {}
        for name, secs in s.cpu.items():
            entry: dict[str, Any] = {"cores": round(secs / s.wall, 3)}
            if name in s.system:
                entry["kernel_share"] = round(s.system[name] / secs, 3) if secs else None
            if name in ("client", "server"):
                entry.update(s_per_gb=round(secs / gb, 2), s_per_mdgram=round(secs / (n / 1e6), 3),
                             us_per_dgram=round(secs / n * 1e6, 2))
            out[name] = entry
        if "client" in s.cpu and "server" in s.cpu:
            out["daemons_us_per_dgram"] = round((s.cpu["client"] + s.cpu["server"]) / n * 1e6, 2)
        return out

    def latency(self, dst: tuple[str, int], size: int, relays: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Ping-pong at a light fixed rate; again (like a step) when other programs disturbed it.
        ``relays``: the processes a ping crosses (name -> pid) when they are not the daemons."""
        gens, _ = self.tools
        o = self.o
        count = o.pings + PING_WARM
        extra = {name: [pid] for name, pid in (relays or {}).items()}
        r, other, attempt, used = self.calm("the pings", lambda: gens[0].call(
            {"cmd": "ping", "dst": list(dst), "size": size, "count": count, "rate": o.ping_rate, "timeout": 0.2},
            timeout=count / o.ping_rate + count * 0.2 + 30), extra)
        rtts = sorted(r["rtt_ns"][PING_WARM:])
        out: dict[str, Any] = {"count": len(rtts), "lost": int(r["lost"]), "rate": o.ping_rate,
                               "other_cpus": round(other, 3), "retries": attempt}
        # What one pass costs each relay: a round trip wakes each of them twice (one way, then back).
        passes = 2 * count
        names = list(extra) if relays else [n for n in ("client", "server") if n in used[0]]
        if names:
            out["cpu_us_per_pass"] = {n: {"total": round(used[0][n] / passes * 1e6, 1),
                                          "user": round((used[0][n] - used[1][n]) / passes * 1e6, 1)} for n in names}
        if rtts:
            out.update({f"p{p}_us": round(_pct(rtts, p / 100) / 1e3, 1) for p in (50, 90, 99)})
            out["p99_9_us"] = round(_pct(rtts, 0.999) / 1e3, 1)  # the stalls: one ping in a thousand
            out.update(min_us=round(rtts[0] / 1e3, 1), mean_us=round(sum(rtts) / len(rtts) / 1e3, 1))
        return out

    def ceiling(self) -> dict[str, Any]:
        """The generator processes alone and together, flat out into dropping sockets of their namespace."""
        gens, _ = self.tools
        out: dict[str, Any] = {}
        for size in self.o.sizes:

            def run(size: int = size) -> list[dict[str, Any]]:
                for g in gens:
                    g.send({"cmd": "ceiling", "size": size, "secs": self.o.ceiling, "flows": self.o.flows})
                return [g.read(self.o.ceiling + 30) for g in gens]

            rs, other, attempt, _ = self.calm("the generator alone", run)
            pps, cpu = sum(r["pps"] for r in rs), sum(r["cpu"] for r in rs)
            out[str(size)] = {"pps": round(pps), "mbit_s": round(pps * size * 8 / 1e6, 1), "cpu_cores": round(cpu, 3),
                              "per_process_pps": [round(r["pps"]) for r in rs], "other_cpus": round(other, 3),
                              "retries": attempt}
            self.log(f"  generator alone ({len(gens)} processes) {size:>5} B: {pps:.0f}/s, {cpu:.2f} CPU")
        return out

    def iperf3(self) -> dict[str, Any]:
        """iperf3 -u flat out across the veth (plain only: its TCP control cannot use the tunnel)."""
        if shutil.which("iperf3") is None:
            return {"skipped": "iperf3 not installed"}
        out: dict[str, Any] = {}
        for size in self.o.sizes:
            self.wait_idle(60)  # iperf3 is not ours to account for: start it on a calm machine at least
            srv = self.net.popen("s", ["iperf3", "-s", "-1", "-p", "5201", "-B", self.net.srv4],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                time.sleep(0.3)
                r = self.net.run("c", ["iperf3", "-c", self.net.srv4, "-p", "5201", "-u", "-b", "0", "-l", str(size),
                                       "-t", str(max(1, round(self.o.ceiling))), "-J"], check=False, timeout=60)
                data = json.loads(r.stdout) if r.stdout.strip() else {}
                summ = data.get("end", {}).get("sum", {})
                secs = float(summ.get("seconds") or 0)
                if not secs:
                    out[str(size)] = {"error": data.get("error", r.stderr.strip()[-200:])}
                    continue
                pk, lost = int(summ.get("packets", 0)), int(summ.get("lost_packets", 0))
                cpu = data.get("end", {}).get("cpu_utilization_percent", {})
                out[str(size)] = {"sent_pps": round(pk / secs), "loss": round(lost / pk, 4) if pk else None,
                                  "sender_cpu_cores": round(float(cpu.get("host_total", 0)) / 100, 3)}
                self.log(f"  iperf3 -u flat out {size:>5} B: {pk / secs:.0f}/s, loss {lost / max(pk, 1):.2%}")
            finally:
                if srv.poll() is None:
                    srv.terminate()
                srv.wait(5)
        return out

    def calm(self, what: str, run: Callable[[], T], extra: Mapping[str, list[int]] | None = None
             ) -> tuple[T, float, int, tuple[dict[str, float], dict[str, float]]]:
        """``run()``, again (up to ``retries`` times, once the machine is calm) when other programs used
        more than ``max_other`` CPU meanwhile.  Returns (result, their CPUs, attempts made - 1, and the
        CPU seconds, all and system, each of our processes and of ``extra`` used in the accepted run)."""
        o = self.o
        for attempt in range(o.retries + 1):
            pids = {**self.pids(), **(extra or {})}
            before, t0 = Snapshot.take(pids), time.monotonic()
            result = run()
            after = Snapshot.take(pids)
            used = before.until(after)
            other = used["other"] / max(time.monotonic() - t0, 1e-3)
            if other <= o.max_other or attempt == o.retries:
                return result, other, attempt, (used, before.system_until(after))
            self.log(f"    (other programs used {other:.2f} CPU during {what}: measuring again)")
            self.wait_idle(60)
        raise AssertionError("unreachable")

    def background(self, secs: float = 1.0) -> float:
        """CPUs busy with programs other than ours over ``secs`` (before we start the load)."""
        pids = self.pids()
        a = Snapshot.take(pids)
        time.sleep(secs)
        return a.until(Snapshot.take(pids))["other"] / secs

    # -- the phases ---------------------------------------------------------------------------

    def plain(self, sizes: Sequence[int]) -> dict[str, Any]:
        # No hints: plain UDP's limit is partly per byte, so one size says little about the next.
        return self.sizes("plain", (self.net.srv4, SINK_PORT), sizes, hints=False)

    def floor(self, size: int) -> dict[str, Any]:
        """The latency floor of any tunnel that sleeps between datagrams: pings through two C relays
        that do nothing but relay (bench/relayfloor.c), one in each namespace where rsockd's client
        and server run, so a round trip takes the same four wake-ups, reads and sends as through
        rsockd.  What they add to plain UDP is the machine's cost of those passes, before any work."""
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return {"skipped": "no C compiler (cc) to build bench/relayfloor.c"}
        exe = self.tmp / "relayfloor"
        built = subprocess.run([cc, "-O2", "-o", str(exe), str(REPO / "bench" / "relayfloor.c")],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return {"skipped": f"bench/relayfloor.c did not build: {built.stderr.strip()[-300:]}"}
        self.log(f"latency floor (two C relays that only relay), {size} B:")
        procs: list[subprocess.Popen[str]] = []
        try:
            for side, to in (("s", ("127.0.0.1", SINK_PORT)), ("c", (self.net.srv4, FLOOR_PORT))):
                listen = "0.0.0.0" if side == "s" else "127.0.0.1"
                p = self.net.popen(side, [str(exe), listen, str(FLOOR_PORT), to[0], str(to[1])],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                procs.append(p)
                assert p.stdout is not None
                line = _readline(p.stdout, 10.0)
                if line.strip() != "ready":
                    stop(p)
                    err = p.stderr.read() if p.stderr is not None else ""
                    return {"skipped": f"relayfloor ({side}) did not start: {line.strip() or err.strip()[-300:]}"}
            lat = self.latency(("127.0.0.1", FLOOR_PORT), size,
                               relays={"client": procs[1].pid, "server": procs[0].pid})
        finally:
            for p in procs:
                stop(p)
                for f in (p.stdout, p.stderr):
                    if f is not None:
                        f.close()
        self.log(f"  p50 {lat.get('p50_us')} µs, p99 {lat.get('p99_us')} µs")
        return {"size": size, "relay": "bench/relayfloor.c (epoll_wait, recvfrom, send; no batching, no work)",
                "latency": lat}

    def sizes(self, label: str, dst: tuple[str, int], sizes: Sequence[int], hints: bool = True) -> dict[str, Any]:
        """Search and ping at each size, each search starting from the previous size's result."""
        out: dict[str, Any] = {}
        hint: float | None = None
        for size in sizes:
            res = self.search(label, dst, size, hint)
            res["latency"] = self.latency(dst, size)
            out[str(size)] = res
            hint = (res["pps"] or None) if hints else None
        return out

    def backend(self, backend: str, sizes: Sequence[int], workers: int, label: str) -> dict[str, Any]:
        """``backend``: a steering backend, with "+raw" or "+packet" for a forced send path."""
        dst = ("127.0.0.1", LISTEN_PORT)
        backend, _, send_path = backend.partition("+")
        self.pair = BenchRig(self.net, self.tmp / label, backend=backend, ports=self.o.ports, workers=workers,
                             send_path=send_path or "auto")
        try:
            ready = self.pair.start()
            st = self.pair.status()
            out: dict[str, Any] = {
                "backend": backend, "send_path": send_path or "auto", "send_paths_used": self.pair.send_paths(),
                "ready": ready,
                # what the daemons run: a source edited during the run leaves a stale build, which they
                # would run interpreted (rsockd/__init__.py) while the run's header says compiled
                "build": {k: v.get("build") for k, v in st.items()},
                "workers": {"requested": workers, "reported": {k: v.get("workers") for k, v in st.items()}},
                "steering": {k: v.get("backend", {}) for k, v in st.items()},
                "sizes": {},
            }
            self.log(f"  {label}: server READY in {ready['server_s']:.2f} s, client READY in {ready['client_s']:.2f} s"
                     f" (all connections up {ready['client_up_s']:.2f} s)")
            out["sizes"] = self.sizes(label, dst, sizes)
            out["rss"] = {k: rss_mb(pid) for k, pid in self.pair.pids().items()}
            if self.o.profile and self.o.profile_size in sizes:
                out["profile"] = self.profile(dst, self.o.profile_size,
                                              out["sizes"][str(self.o.profile_size)]["pps"])
            st = self.pair.status()
            out["counters"] = {k: {"drops": v.get("drops", {}), "tx_errors": v.get("tx_errors", {}),
                                   "steering": v.get("steering", {}), "traffic": v.get("traffic", {})}
                               for k, v in st.items()}
        finally:
            self._close_pair()
        return out

    def profile(self, dst: tuple[str, int], size: int, sustained: float) -> dict[str, Any]:
        """py-spy both daemons while the generator offers 75 % of the sustained rate (py-spy
        takes CPU from the same two CPUs: nearer the limit, the profiled step overloads)."""
        if not pyspy.available():
            return {"skipped": f"py-spy not installed ({pyspy.PY_SPY}): .venv/bin/pip install py-spy"}
        assert self.pair is not None
        secs = self.o.profile
        rate = max(MIN_RATE, 0.75 * sustained)
        spies: dict[str, tuple[subprocess.Popen[str], Path]] = {}

        def begin() -> None:
            for name, pid in self.pair.pids().items() if self.pair else ():
                path = self.tmp / f"profile-{name}.txt"
                spies[name] = (pyspy.start(pid, secs, path), path)

        self.wait_idle(60)
        s = self.step(dst, size, rate, secs=secs + 1.5, at_start=begin)
        out: dict[str, Any] = {"size": size, "offered_pps": round(rate), "loss": round(s.loss, 5),
                               "seconds": secs, "sampler": f"py-spy {pyspy.RATE}/s, --native"}
        for name, (proc, path) in spies.items():
            try:
                _, err = proc.communicate(timeout=secs + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if path.exists():
                out[name] = pyspy.summarise(path.read_text(), secs)
            else:
                out[name] = {"error": (err or "").strip()[-300:]}
        return out

    def run(self) -> dict[str, Any]:
        o = self.o
        t0 = time.time()
        data: dict[str, Any] = {"schema": SCHEMA, "started_unix": round(t0, 3),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
                                "machine": machine_info(o), "code": self.code or code_info(),
                                "options": _options_json(o)}
        if o.wait_idle:
            self.wait_idle(o.wait_idle)
        self.log(f"namespaces {self.net.ns['c']} (generator, client) and {self.net.ns['s']} (sink, server), "
                 f"veth {self.net.dev['c']} <-> {self.net.dev['s']}; logs in {self.tmp}")
        bg = self.background()
        data["machine"]["background_cpus"] = round(bg, 3)
        if bg > 0.15:
            self.log(f"warning: other programs use {bg:.2f} CPU before the start: results will be noisy")
        self.log("generator ceiling:")
        data["generator"] = {"kind": "bench.traffic (Python, sendmmsg via ctypes, paced)", "ceiling": self.ceiling()}
        if o.iperf3:
            data["generator"]["iperf3_plain"] = self.iperf3()
        self.log("plain UDP across the veth:")
        data["plain"] = self.plain(o.sizes)
        data["floor"] = self.floor(max(o.sizes))
        data["rsockd"] = {}
        for backend in o.backends:
            label = backend if o.workers == 1 else f"{backend}-w{o.workers}"
            self.log(f"rsockd, {label}:")
            data["rsockd"][label] = self.backend(backend, o.sizes, o.workers, label)
        data["all_cores"] = self.all_cores(data)
        if o.wireguard:
            self.log("WireGuard (wireguard-go), iperf3 TCP:")
            data["wireguard"] = self.wireguard()
        else:
            data["wireguard"] = {"skipped": "--no-wireguard"}
        if o.recheck:
            size = max(o.sizes)
            self.log("plain UDP again (drift):")
            again = self.search("plain", (self.net.srv4, SINK_PORT), size)
            first = data["plain"][str(size)]["pps"]
            data["plain_recheck"] = {"size": size, "pps": again["pps"], "first_pps": first,
                                     "drift": round(again["pps"] / first - 1, 4) if first else None}
        data["seconds"] = round(time.time() - t0, 1)
        data["ratios"] = ratios(data)
        data["targets"] = evaluate_targets(data)
        return data

    def all_cores(self, data: dict[str, Any]) -> dict[str, Any]:
        """xdp at the largest size with a worker per CPU, and plain with the same flows, when the daemon
        has workers (its status JSON reports ``workers``) or ``--all-cores on``."""
        o = self.o
        n = os.cpu_count() or 1
        if o.all_cores == "off" or "xdp" not in o.backends:
            return {"skipped": "not asked for"}
        first: dict[str, Any] = data["rsockd"].get("xdp") or next(iter(data["rsockd"].values()), {})
        reported: dict[str, Any] = first.get("workers", {}).get("reported", {})
        has_workers = bool(reported) and all(isinstance(v, int) for v in reported.values())
        if o.all_cores == "auto" and not has_workers:
            return {"skipped": "n/a — workers not implemented (the daemon's status reports no \"workers\")"}
        size = max(o.sizes)
        flows0 = o.flows
        o.flows = max(o.flows, -(-2 * n // o.gen_procs))  # 2 flows per worker, or one worker carries them all
        total = o.flows * o.gen_procs
        try:
            self.log(f"all cores: {n} workers, {total} flows:")
            plain = self.search("plain", (self.net.srv4, SINK_PORT), size)
            rs = self.backend("xdp", (size,), n, f"xdp-w{n}")
        finally:
            o.flows = flows0
        return {"workers": n, "flows": total, "size": size, "plain": plain, "xdp": rs}

    def wireguard(self) -> dict[str, Any]:
        """iperf3 TCP through WireGuard (wireguard-go), over rsockd, then straight over UDP, at one MTU: the
        largest datagram the rsockd pair reports it carries (``max_datagram``) minus WireGuard's 32 bytes.

        Over rsockd, the client-side WireGuard's endpoint is the rsockd client's listen address and the
        rsockd server's target is the server-side WireGuard's port.  A path that fails is reported as an
        error in the result; the rest of the run stands."""
        o = self.o
        why = wireguard.available()
        if why:
            return {"skipped": why}
        if not o.backends:
            return {"skipped": "no rsockd backend in this run (--backends none)"}
        spec = "xdp" if "xdp" in o.backends else o.backends[0]
        backend, _, send_path = spec.partition("+")
        tmp = self.tmp / "wireguard"
        t0 = time.monotonic()
        out: dict[str, Any] = {"tool": f"{wireguard.version()}; iperf3 TCP, 1 stream", "backend": spec,
                               "workers": o.workers, "seconds": o.wg_seconds, "overhead_b": WG_OVERHEAD}
        out["rounds"] = o.wg_rounds
        over = WgPath("rsockd", "192.168.242", WG_RSOCKD_PORT, ("127.0.0.1", LISTEN_PORT))
        plain = WgPath("plain", "192.168.241", WG_PLAIN_PORT, (self.net.srv4, WG_PLAIN_PORT))
        tunnels: dict[str, WgTunnel] = {}
        self.pair = BenchRig(self.net, tmp / "rsockd", backend=backend, ports=o.ports, workers=o.workers,
                             send_path=send_path or "auto", target=WG_RSOCKD_PORT)
        with contextlib.ExitStack() as up:
            up.callback(self._close_pair)  # last: after the tunnels (the stack unwinds in reverse)
            try:
                out["ready"] = self.pair.start()
                reported = [v.get("max_datagram") for v in self.pair.status().values()]
                limits = [v for v in reported if isinstance(v, int) and v > WG_OVERHEAD]
                if len(limits) != len(reported):
                    raise WgError(f"the daemons' status reports no usable max_datagram ({reported})")
                out["max_datagram"] = min(limits)
                out["mtu"] = min(limits) - WG_OVERHEAD
                self.log(f"  rsockd {spec} carries datagrams up to {out['max_datagram']} B: WireGuard MTU {out['mtu']}")
                tunnels["rsockd"] = up.enter_context(WgTunnel(self.net, over, out["mtu"], tmp / over.name))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                out["rsockd"] = {"error": str(e)}
                self.log(f"  over rsockd: {e}")
            if "mtu" not in out:
                out["plain"] = {"error": "not measured: no MTU (rsockd's max_datagram) to compare at"}
            else:
                try:
                    tunnels["plain"] = up.enter_context(WgTunnel(self.net, plain, out["mtu"], tmp / plain.name))
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    out["plain"] = {"error": str(e)}
                    self.log(f"  plain UDP: {e}")
            # Rounds in turn, rsockd then plain: each pair close in time, so that the machine's
            # drift (docs/bench.md, "Noise") moves both alike; each path's median round is its figure.
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in tunnels}
            for _ in range(o.wg_rounds):
                for name, t in list(tunnels.items()):
                    try:
                        rounds[name].append(self.wg_round(t, tmp))
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        out[name] = {"error": str(e)}
                        self.log(f"  over {name}: {e}")
                        del tunnels[name]
            for name, res in rounds.items():
                if name in tunnels and res:
                    out[name] = _median_round(res)
            if "mbit_s" in out.get("rsockd", {}):
                st = self.pair.status()
                out["rsockd"]["oversized_drops"] = sum(int(v.get("drops", {}).get("oversized", 0))
                                                       for v in st.values())
        out["stage_s"] = round(time.monotonic() - t0, 1)
        return out

    def _close_pair(self) -> None:
        if self.pair is not None:
            self.pair.close()
            self.pair = None

    def wg_round(self, t: WgTunnel, tmp: Path) -> dict[str, Any]:
        """One bounded iperf3 TCP run through ``t``.  Like a step, the run is made again (up to
        ``retries`` times, once the machine is calm) when other programs used more than
        ``max_other`` CPU during it: iperf3 and wireguard-go need both CPUs."""
        o, path = self.o, t.path
        calm = 20.0 if o.retries else 0.0  # --retries 0 (the smoke test): take the machine as it is
        self.wait_idle(calm)
        pids = {**t.pids(), **self.pids()}  # the rsockd daemons too (idle during plain's rounds)
        for attempt in range(o.retries + 1):
            res = wireguard.iperf3_tcp(self.net, path.server_addr, o.wg_seconds, pids, tmp / path.name / "iperf3.json")
            res["retries"] = attempt
            other = float(res["cpu_cores"].get("other", 0.0))
            if other <= o.max_other or attempt == o.retries:
                break
            self.log(f"    (other programs used {other:.2f} CPU during WireGuard over {path.name}: measuring again)")
            self.wait_idle(calm)
        res["interfaces"] = t.ifname
        self.log(f"  WireGuard over {path.name:>6}: {res['mbit_s']:8.1f} Mbit/s, {res['retransmits']} retransmits"
                 f" (other programs {res['cpu_cores'].get('other', 0):.2f} CPU)")
        return res

    def wait_idle(self, limit: float) -> None:
        """Until other programs use less than 0.15 CPU over 2 s, or ``limit`` seconds."""
        start = time.monotonic()
        said = -math.inf
        while time.monotonic() - start < limit:
            bg = self.background(2.0)
            if bg < 0.15:
                return
            if time.monotonic() - said > 30:
                said = time.monotonic()
                self.log(f"    waiting for the machine to calm down: other programs use {bg:.2f} CPU")


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median rate (the lower middle of an even count), with every round's rate."""
    ordered = sorted(rounds, key=lambda r: float(r["mbit_s"]))
    return {**ordered[(len(ordered) - 1) // 2], "rounds_mbit_s": [r["mbit_s"] for r in rounds]}


def _readline(f: Any, timeout: float) -> str:
    """A line from a child's pipe, or "" when none comes within ``timeout`` seconds."""
    ready, _, _ = select.select([f], [], [], timeout)
    return f.readline() if ready else ""


def _softnet_dropped() -> int:
    total = 0
    with open("/proc/net/softnet_stat") as f:
        for line in f:
            total += int(line.split()[1], 16)
    return total


def _pct(sorted_vals: Sequence[int], q: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return float(sorted_vals[k])


def _rate(rate: float) -> str:
    return "flat out" if not rate else f"{rate:.0f}/s"


def _options_json(o: Options) -> dict[str, Any]:
    return {"sizes": list(o.sizes), "backends": list(o.backends), "step_s": o.step, "warmup_s": o.warm,
            "resolution": o.resolution, "max_steps": o.max_steps, "pings": o.pings, "ping_rate": o.ping_rate,
            "flows": o.flows, "gen_procs": o.gen_procs, "workers": o.workers, "all_cores": o.all_cores,
            "offload": o.offload, "gro": o.gro, "ports": o.ports, "max_other": o.max_other, "retries": o.retries,
            "profile_s": o.profile, "quick": o.quick, "loss_max": LOSS_MAX, "wireguard": o.wireguard,
            "wireguard_s": o.wg_seconds, "wireguard_rounds": o.wg_rounds,
            "argv": o.argv}


def machine_info(o: Options) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gb": round(mem / 1e6, 1),
            "kernel": platform.release(), "python": platform.python_version(), "hostname": platform.node(),
            "veth_offload": o.offload, "veth_gro": o.gro}


def _git(*args: str, strip: bool = True) -> str:
    r = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *args], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        return ""
    return r.stdout.strip() if strip else r.stdout


def code_info() -> dict[str, Any]:
    """Which rsockd was measured: the working tree, its commit, and the files of rsockd/ and bpf/
    changed since that commit."""
    from rsockd.service.status import build_info  # the daemons' environment is this one: RSOCKD_PURE, the build

    # unstripped: a porcelain line starts with its two status columns, the first maybe a space
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", "rsockd", "bpf", strip=False).splitlines()]
    return {"source": "working tree", "commit": _git("rev-parse", "--short=12", "HEAD") or None, "dirty": dirty,
            **build_info()}


def export_rsockd(rev: str, dest: Path) -> dict[str, Any]:
    """rsockd/ and bpf/ as committed at ``rev``, laid out as an importable package under ``dest``
    (``bpf/`` becomes ``rsockd/bpf``, as the installed package has it).  Reads git, changes nothing."""
    sha = _git("rev-parse", "--verify", "--short=12", f"{rev}^{{commit}}")
    if not sha:
        raise SystemExit(f"bench/run: --rsockd {rev}: no such revision")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "rsockd", "bpf"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "bpf").rename(dest / "rsockd" / "bpf")
    return {"source": f"git archive {rev}", "commit": sha, "dirty": [], "core": "interpreted", "reader": "python"}


def ratios(data: dict[str, Any]) -> dict[str, Any]:
    """rsockd / plain sustained rate per backend and size, and nft / xdp."""
    out: dict[str, Any] = {}
    plain = data["plain"]
    for label, res in data["rsockd"].items():
        out[label] = {size: _ratio(r["pps"], plain.get(size, {}).get("pps")) for size, r in res["sizes"].items()}
    if "xdp" in data["rsockd"] and "nft" in data["rsockd"]:
        x, n = data["rsockd"]["xdp"]["sizes"], data["rsockd"]["nft"]["sizes"]
        out["nft_vs_xdp"] = {size: _ratio(n[size]["pps"], x[size]["pps"]) for size in n if size in x}
    ac = data.get("all_cores", {})
    if "xdp" in ac:
        size = str(ac["size"])
        out["all_cores"] = {size: _ratio(ac["xdp"]["sizes"][size]["pps"], ac["plain"]["pps"])}
        # workers = N against one: each against its own plain UDP (the same flows), then one over the other.
        out["workers_vs_one"] = {size: _ratio(out["all_cores"][size], _get_ratio(out, "xdp", size))}
    wg = data.get("wireguard", {})
    out["wireguard"] = _ratio(_mbit(wg, "rsockd"), _mbit(wg, "plain"))
    return out


def _get_ratio(r: dict[str, Any], label: str, size: str) -> float | None:
    v = r.get(label, {}).get(size)
    return float(v) if v is not None else None


def _mbit(wg: dict[str, Any], path: str) -> float | None:
    v = wg.get(path, {}).get("mbit_s") if isinstance(wg.get(path), dict) else None
    return float(v) if v is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


# -- the daemon pair ------------------------------------------------------------------------------


class BenchRig(Rig):
    """The integration rig's server + client pair, in the benchmark's own namespaces.

    The namespaces are shared by plain UDP and every backend (the same veth), so this rig neither
    creates nor deletes them, and the target is the benchmark's sink instead of the rig's echo.
    The server is started and READY before the client starts, so each time to READY is its own.
    """

    def __init__(self, net: NetnsPair, tmp: Path, *, backend: str, ports: str, workers: int,
                 send_path: str = "auto", target: int = SINK_PORT) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        # Workers are a server setting: a client is one process, its connections spread over the workers.
        path = ["--send-path", send_path] if send_path != "auto" else []
        super().__init__(tmp, backend=backend, ports=ports, offload=net.offload,
                         server_args=["-t", f"127.0.0.1:{target}", "--key", KEY, "--workers", str(workers), *path],
                         client_args=["--key", KEY, *path])
        self.net = net

    def start(self) -> dict[str, float]:
        """Start both daemons; seconds from each start to READY (and to all connections up)."""
        try:
            t0 = time.monotonic()
            self.server = Rsockd(self.net, "s", ["--role", "server", "--dev", self.net.dev["s"], *self.common(),
                                                 *self.server_args], self.tmp, "server").start()
            server = self.server
            _alive(server, "READY=1", server.wait_ready)
            server_s = _ready_at(server) - t0
            t1 = time.monotonic()
            client = self.add_client()
            n = self.conns_per_client()
            _alive(client, "READY=1", client.wait_ready)
            _alive(client, "all connections up", lambda t: client.wait_status(rf" {n}/{n} connections up", t))
            up = client.notify.times[-1] - t1
            return {"server_s": round(server_s, 3), "client_s": round(_ready_at(client) - t1, 3),
                    "client_up_s": round(up, 3)}
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, int]:
        out = {}
        for name, d in (("client", self.clients[0] if self.clients else None), ("server", self.server)):
            if d is not None and d.proc is not None:
                out[name] = d.proc.pid
        return out

    def status(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, d in (("client", self.client), ("server", self.server)):
            assert d is not None
            st = d.status()
            if d.proc is not None and st.get("pid") != d.proc.pid:
                raise RuntimeError(f"{name}: status pid {st.get('pid')} is not the process we started "
                                   f"({d.proc.pid})")
            out[name] = st
        return out

    def send_paths(self) -> dict[str, list[str]]:
        """How each daemon's connections send (``rsockctl ports``: "packet", "raw")."""
        out = {}
        for name, d in (("client", self.client), ("server", self.server)):
            assert d is not None
            out[name] = sorted({c["send_path"] for c in d.status("ports")["connections"]})
        return out

    def close(self) -> None:
        """Stop the daemons (not the namespaces: they are the benchmark's)."""
        errors = self.stop_daemons()
        self.clients, self.server = [], None
        if errors and not sys.exc_info()[0]:
            raise RuntimeError("\n".join(errors))


def _alive(d: Rsockd, what: str, wait: Callable[[float], object], timeout: float = 60.0) -> None:
    """``wait`` in short slices, so that a daemon that died is reported at once, not after a timeout."""
    end = time.monotonic() + timeout
    while True:
        try:
            wait(min(0.5, max(0.01, end - time.monotonic())))
            return
        except TimeoutError:
            if d.proc is not None and d.proc.poll() is not None:
                raise RuntimeError(f"{d.name} exited ({d.proc.returncode}) before {what}:\n{d.log()[-3000:]}") from None
            if time.monotonic() >= end:
                raise


def _ready_at(d: Rsockd) -> float:
    """When the first READY=1 of ``d`` arrived (monotonic)."""
    i = next(i for i, m in enumerate(d.notify.messages) if m.get("READY") == "1")
    return d.notify.times[i]


# -- entry ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, through every ``finally`` (namespaces deleted, daemons
    stopped, XDP detached by the daemons themselves)."""

    def raise_(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, raise_) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C raises KeyboardInterrupt even when we were started with SIGINT ignored (a background job).
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def write_json(data: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(data['started_unix']))}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench/run: must run as root (network namespaces, XDP, raw sockets): sudo ./bench/run",
              file=sys.stderr)
        return 4
    try:
        with _signals(), Bench(opts) as bench:
            data = bench.run()
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"bench/run: interrupted ({e or 'SIGINT'}); namespaces and daemons cleaned up", file=sys.stderr)
        return 130
    path = write_json(data, opts.out)
    print(render(data))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
