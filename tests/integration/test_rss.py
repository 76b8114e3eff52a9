"""The daemon's memory budget (bench.report.RSS_BUDGET_MB), on real daemons after traffic: the
client on the packet send path (netlink route, link and neighbour look-ups every second), the
server with the XDP backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.procstat import rss_mb
from bench.report import RSS_BUDGET_MB
from tests.integration.rig import Rig

pytestmark = pytest.mark.root


def test_daemons_stay_within_the_memory_budget(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp", client_args=["--send-path", "packet"]) as rig:
        res = rig.echo_run(300, size=500)
        assert res.received == res.sent
        daemons = {"server": rig.server, "client": rig.client}
        rss = {name: rss_mb(d.proc.pid)["rss_mb"] for name, d in daemons.items() if d is not None and d.proc}
    print(f"VmRSS after {res.sent} echoes: " + ", ".join(f"{n} {v:.1f} MB" for n, v in rss.items()))
    assert set(rss) == {"server", "client"}
    for name, value in rss.items():
        assert value <= RSS_BUDGET_MB, f"{name}: {value} MB, budget {RSS_BUDGET_MB} MB"
