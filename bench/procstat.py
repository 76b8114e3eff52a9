"""CPU time and memory of processes and of the machine, from /proc (Linux).

A process's CPU is utime + stime of ``/proc/<pid>/stat`` (all its threads), plus that of its
live descendants, so a daemon that forks workers is charged for them.  This kernel has no
IRQ time accounting: softirq work (a veth delivering a packet, the XDP program, the receiving
UDP stack) is charged to whichever task is running when it happens, usually the sender.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return data.rsplit(")", 1)[1].split()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            kids.setdefault(int(f[1]), []).append(int(name))
    return kids


def tree(pid: int, kids: Mapping[int, list[int]] | None = None) -> list[int]:
    """``pid`` and all its live descendants."""
    kids = _children() if kids is None else kids
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pid: int, kids: Mapping[int, list[int]] | None = None) -> tuple[float, float]:
    """(utime, stime) of ``pid`` and its live descendants, seconds; zeros when it is gone."""
    user = system = 0
    for p in tree(pid, kids):
        f = _stat_fields(p)
        if f is not None:
            user += int(f[11])  # field 14 of proc(5), counted from 1
            system += int(f[12])  # field 15
    return user / TICK, system / TICK


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of ``pid`` in MB (10^6 bytes), summed over its descendants."""
    rss = hwm = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except FileNotFoundError:
            continue
    return {"rss_mb": round(rss * 1024 / 1e6, 1), "hwm_mb": round(hwm * 1024 / 1e6, 1)}


@dataclass(frozen=True)
class Machine:
    """Aggregate CPU time of the machine (``/proc/stat`` first line), seconds."""

    busy: float
    total: float
    softirq: float

    @classmethod
    def now(cls) -> Machine:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
        busy = user + nice + system + irq + softirq + steal
        return cls(busy / TICK, (busy + idle + iowait) / TICK, softirq / TICK)


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds of named processes and of the machine at one instant."""

    procs: Mapping[str, float]  # user + system
    system: Mapping[str, float]
    machine: Machine

    @classmethod
    def take(cls, pids: Mapping[str, Sequence[int]]) -> Snapshot:
        """``pids``: name -> the processes (and their descendants) charged under that name."""
        kids = _children()
        times = {name: [cpu_seconds(p, kids) for p in ps] for name, ps in pids.items()}
        return cls({n: sum(u + s for u, s in ts) for n, ts in times.items()},
                   {n: sum(s for _, s in ts) for n, ts in times.items()}, Machine.now())

    def system_until(self, later: Snapshot) -> dict[str, float]:
        """System (kernel) CPU seconds of each named process between the two snapshots."""
        return {n: later.system[n] - self.system[n] for n in self.system}

    def until(self, later: Snapshot, names: Iterable[str] | None = None) -> dict[str, float]:
        """CPU seconds each process used between the two snapshots, plus ``machine_busy`` (all CPUs),
        ``machine_softirq`` and ``other`` (busy time not charged to any named process: other programs,
        kernel threads such as ksoftirqd)."""
        out = {n: later.procs[n] - self.procs[n] for n in names or self.procs}
        busy = later.machine.busy - self.machine.busy
        out["machine_busy"] = busy
        out["machine_softirq"] = later.machine.softirq - self.machine.softirq
        out["other"] = max(0.0, busy - sum(later.procs[n] - self.procs[n] for n in self.procs))
        return out
