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
        "--ceiling-seconds", "0.3", "--gen-procs", "1", "--retries", "0", "--wireguard-seconds", "1",
        "--wireguard-rounds", "2"]


def _at(data: Any, path: str) -> Any:
    for key in path.split("."):
        assert isinstance(data, dict) and key in data, f"{path}: no {key!r} in {data!r:.300}"
        data = data[key]
    return data


def _cmdlines() -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            out.append(p.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return out


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
    # The latency floor: two do-nothing C relays (bench/relayfloor.c) between the same namespaces.
    floor = _at(data, "floor")
    assert "skipped" not in floor, floor
    assert floor["size"] == 1200 and floor["latency"]["count"] > 0, floor
    assert floor["latency"]["p50_us"] > 0
    assert not [c for c in _cmdlines() if "relayfloor" in c]
    for backend in ("xdp", "nft", "xdp+raw"):
        b = _at(data, f"rsockd.{backend}")
        check_path(_at(b, "sizes.1200"), daemons=True)
        for path in ("ready.server_s", "ready.client_s", "ready.client_up_s", "rss.client.rss_mb",
                     "rss.server.rss_mb", "workers.requested"):
            assert _at(b, path) is not None, path
        assert _at(b, "ready.server_s") > 0
        # The default (auto) sends packet frames in the bench's namespaces, which filter nothing.
        want = ["raw"] if backend.endswith("+raw") else ["packet"]
        assert _at(b, "send_paths_used") == {"client": want, "server": want}, backend

    for backend in ("xdp", "nft", "xdp+raw"):
        ratio = _at(data, f"ratios.{backend}.1200")
        assert ratio is not None and 0 < ratio <= 1.5, (backend, ratio)
    # Two rsockd figures: both noisy, so only its sign is a fact.
    assert _at(data, "ratios.nft_vs_xdp.1200") > 0

    # WireGuard (wireguard-go) through iperf3 TCP, over rsockd and straight over UDP, at one MTU.
    wg = _at(data, "wireguard")
    assert wg["backend"] == "xdp" and wg["mtu"] == wg["max_datagram"] - 32, wg
    for path in ("plain", "rsockd"):
        res = _at(wg, path)
        assert "error" not in res, (path, res)
        assert res["mbit_s"] > 0 and res["bytes"] > 0, (path, res)
        for key in ("retransmits", "seconds", "cpu_cores.wireguard_client", "cpu_cores.wireguard_server",
                    "cpu_cores.machine_busy", "interfaces.c", "interfaces.s"):
            _at(res, key)
    assert _at(wg, "rsockd.cpu_cores.client") >= 0 and _at(wg, "rsockd.oversized_drops") == 0
    for path in ("rsockd", "plain"):  # two rounds each, in turn; the figure is the lower middle one
        rounds = _at(wg, f"{path}.rounds_mbit_s")
        assert len(rounds) == 2 and _at(wg, f"{path}.mbit_s") == min(rounds), rounds
    assert set(_at(wg, "plain.interfaces").values()).isdisjoint(_at(wg, "rsockd.interfaces").values())
    assert 0 < _at(data, "ratios.wireguard") <= 1.5
    ifnames = [*_at(wg, "plain.interfaces").values(), *_at(wg, "rsockd.interfaces").values()]
    for ifname in ifnames:
        assert not Path(f"/var/run/wireguard/{ifname}.sock").exists(), ifname
    assert not [c for c in _cmdlines() if "wireguard-go" in c and any(i in c for i in ifnames)]

    targets = {t["key"]: t for t in data["targets"]}
    assert set(targets) == {"rate_1200_xdp", "rate_64_xdp", "cpu_1200_xdp", "rtt_p50_added", "rtt_p99_added",
                            "wireguard", "rss", "ready"}
    for t in targets.values():
        assert t["status"] in ("met", "not met", "n/a"), t
    assert targets["rate_64_xdp"]["status"] == "n/a"  # 64 B is not in a quick run
    for key in ("rate_1200_xdp", "cpu_1200_xdp", "rtt_p50_added", "wireguard", "rss", "ready"):
        assert targets[key]["measured"] is not None, targets[key]
    assert targets["rtt_p50_added"]["detail"]["floor"] is not None
    assert "latency floor, 1200 B" in r.stdout
    assert "rsockd benchmark" in r.stdout and "targets (" in r.stdout and "WireGuard (" in r.stdout
