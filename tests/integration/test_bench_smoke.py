"""The benchmark harness (bench/run, docs/bench.md) runs end to end in its quickest mode.

Only the shape of the result is checked: every field is there and every rsockd/plain ratio is in
(0, 1.5].  Absolute speeds are never asserted: on this kind of machine they are noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TINY = ["--quick", "--step-seconds", "0.4", "--warmup-seconds", "0.1", "--max-steps", "4", "--pings", "50",
        "--ceiling-seconds", "0.3", "--gen-procs", "1", "--retries", "0"]


def _at(data: Any, path: str) -> Any:
    for key in path.split("."):
        assert isinstance(data, dict) and key in data, f"{path}: no {key!r} in {data!r:.300}"
        data = data[key]
    return data


def test_quick_run_writes_every_field(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.harness", *TINY, "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())

    for path in ("schema", "started", "seconds", "machine.cpus", "machine.kernel", "machine.background_cpus",
                 "code.commit", "options.sizes", "generator.ceiling.1200.pps", "generator.ceiling.1200.cpu_cores"):
        _at(data, path)
    assert _at(data, "options.sizes") == [1200]

    def check_path(res: dict[str, Any], daemons: bool) -> None:
        for key in ("pps", "mbit_s", "delivered_pps", "loss", "generator_limited", "steps", "cpu", "latency"):
            _at(res, key)
        assert res["pps"] > 0 and res["steps"], res
        for key in ("p50_us", "p90_us", "p99_us", "count", "lost"):
            _at(res["latency"], key)
        for key in ("generator.cores", "sink.cores", "machine_busy.cores"):
            _at(res["cpu"], key)
        if daemons:
            for name in ("client", "server"):
                for key in ("cores", "s_per_gb", "s_per_mdgram", "us_per_dgram"):
                    _at(res["cpu"], f"{name}.{key}")
            _at(res["cpu"], "daemons_us_per_dgram")

    check_path(_at(data, "plain.1200"), daemons=False)
    for backend in ("xdp", "nft", "xdp+packet"):
        b = _at(data, f"rsockd.{backend}")
        check_path(_at(b, "sizes.1200"), daemons=True)
        for path in ("ready.server_s", "ready.client_s", "ready.client_up_s", "rss.client.rss_mb",
                     "rss.server.rss_mb", "workers.requested"):
            assert _at(b, path) is not None, path
        assert _at(b, "ready.server_s") > 0

    for backend in ("xdp", "nft", "xdp+packet"):
        ratio = _at(data, f"ratios.{backend}.1200")
        assert ratio is not None and 0 < ratio <= 1.5, (backend, ratio)
    # Two rsockd figures: both noisy, so only its sign is a fact.
    assert _at(data, "ratios.nft_vs_xdp.1200") > 0

    targets = {t["key"]: t for t in data["targets"]}
    assert set(targets) == {"rate_1200_xdp", "rate_xdp_all_cores", "rate_64_xdp", "cpu_1200_xdp", "rtt_p50_added",
                            "rtt_p99_added", "nft_vs_xdp", "rate_1200_xdp_packet", "rate_64_xdp_packet",
                            "cpu_1200_xdp_packet", "rss_daemons"}
    for t in targets.values():
        assert t["status"] in ("met", "not met", "n/a"), t
    assert targets["rate_64_xdp"]["status"] == "n/a"  # 64 B is not in a quick run
    assert "rsockd benchmark" in r.stdout and "targets (issue 7):" in r.stdout
