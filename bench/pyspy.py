"""Sampling profiles of the daemons under load (py-spy), reduced to their top functions.

``py-spy record --format raw`` writes collapsed stacks, one ``frame;frame;…;leaf count`` a line
(idle samples, a thread blocked in epoll, are left out by py-spy).  ``--native`` unwinds the C
frames too: the compiled core (mypyc's ``CPyDef_module___Class___method``), the compiled data path
(``_datapath.c``) and libc, where the system calls show (``sendmmsg``, ``recvmmsg``); without it
every sample of a compiled daemon is one interpreted frame (asyncio's ``Handle._run``).  It
pauses the daemon for each sample, so the profiled step is offered less than the sustained
rate (harness.py ``profile``).  ``summarise`` ranks functions
by *self* samples (the leaf frame: time spent in that function's own bytecode and the C calls it
makes, syscalls included) and by *inclusive* samples (anywhere on the stack, counted once per
stack).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PY_SPY = Path(sys.executable).with_name("py-spy")
RATE = 250  # samples/s
# Frames under every sample: the event loop's, the daemon's entry, libc's start and unnamed addresses.
SCAFFOLD = ("events.py:", "base_events.py:", "runners.py:", "daemon.py:main", "entry.py:main", "rsockd:",
            "libc.so.6:0x")
_MYPYC = re.compile(r"^CPy(?:Def|Py)_(?P<name>\w+)$")


def available() -> bool:
    return PY_SPY.exists()


def start(pid: int, secs: float, out: Path) -> subprocess.Popen[str]:
    """Sample ``pid`` (and its children) for ``secs`` seconds, C frames included (``--native``)."""
    return subprocess.Popen([str(PY_SPY), "record", "--pid", str(pid), "--duration", str(max(1, round(secs))),
                             "--rate", str(RATE), "--native", "--function", "--subprocesses",
                             "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    """``relay.py:_on_app`` from ``_on_app (rsockd/relay.py:733)``; a compiled core's function
    (``CPyDef_relay___Relay____on_data (_native__mypyc….so)``, or its ``CPyPy_`` wrapper) as
    ``relay.py:Relay._on_data``; a C function as ``_datapath.c:writer_flush``, ``libc.so.6:sendmmsg``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    func = m["func"]
    mypyc = _MYPYC.match(func)
    if mypyc:
        module, *rest = mypyc["name"].split("___")
        return f"{module}.py:{'.'.join(rest) or module}"
    return f"{Path(m['file']).name.split('.cpython-')[0]}:{func}"  # an extension without its ABI tag


def summarise(raw: str, secs: float, top: int = 15) -> dict[str, Any]:
    """Top functions by self and inclusive share of the samples in a raw py-spy file."""
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        selfc[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "samples": k, "share": round(k / total, 4)} for f, k in c.most_common(top)]

    # The event loop's frames are under every stack: leave them out of the inclusive ranking.
    for f in [f for f, k in incl.items() if k >= 0.97 * total or f.startswith(SCAFFOLD)]:
        del incl[f]
    return {
        "samples": total,
        "busy_share": round(total / (RATE * secs), 3) if secs else None,  # of wall time: ~the CPU share
        "self": rows(selfc) if total else [],
        "inclusive": rows(incl) if total else [],
    }
