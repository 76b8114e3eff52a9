"""The daemon side of XdpSteering, driven over stdin/stdout by tests/integration/test_xdp_steer.py.

Run under ``ip netns exec`` so it lives where a daemon would: in the namespace's network *and*
private mount namespace (bpffs is mounted there and vanishes with it).  One JSON command per
line in, one JSON reply per line out::

    {"op": "attach", "plan": {...}}    -> {"ok": true, "describe": [...], "report": {...}, "rss_mb": ..}
    {"op": "update", "plan": {...}} | {"op": "counters"} | {"op": "config"} | {"op": "conns"} | {"op": "detach"}
    {"op": "cleanup_stale", "instance": "x"} | {"op": "pins", "instance": "x"}
    errors -> {"ok": false, "type": "SteerError", "error": "..."}
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from rsockd.steer import SteerPlan, bpfsys
from rsockd.steer.xdp import XdpSteering, cleanup_stale


def make_plan(raw: dict[str, Any]) -> SteerPlan:
    return SteerPlan(
        instance=raw["instance"],
        role=raw["role"],
        interfaces=tuple(raw["interfaces"]),
        tunnel_ports=frozenset(raw.get("tunnel_ports", ())),
        local_ports=frozenset(raw.get("local_ports", ())),
        peers=frozenset(raw.get("peers", ())),
        mark=raw.get("mark", 0x72736B64),
        xdp_mode=raw.get("xdp_mode", "auto"),
        syn_rate=raw.get("syn_rate", 0),
        syn_burst=raw.get("syn_burst", 0),
        syn_key=bytes.fromhex(raw.get("syn_key", "")),
        conns=frozenset(tuple(c) for c in raw.get("conns", ())),
    )


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    steering: XdpSteering | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            result: Any = None
            if op == "attach":
                steering = XdpSteering(make_plan(cmd["plan"]), timeout=cmd.get("timeout", 60))
                steering.attach()
                result = {"describe": steering.describe(), "report": steering.load_report, "rss_mb": rss_mb(),
                          "bcc_imported": "bcc" in sys.modules}
            elif op == "update":
                assert steering is not None
                steering.update(make_plan(cmd["plan"]))
            elif op == "counters":
                assert steering is not None
                result = steering.counters()
            elif op == "config":
                assert steering is not None
                with bpfsys.PinnedMaps.open(steering.pin_dir) as maps:
                    cfg = maps.read_config()
                result = {name: getattr(cfg, name) for name, *_ in cfg._fields_}
            elif op == "syntag":
                assert steering is not None
                with bpfsys.PinnedMaps.open(steering.pin_dir) as maps:
                    st = maps.read_syntag()
                result = {name: getattr(st, name) for name, *_ in st._fields_}
            elif op == "conns":
                assert steering is not None
                with bpfsys.PinnedMaps.open(steering.pin_dir) as maps:
                    result = sorted(k.hex() for k in maps.read_conns())
            elif op == "detach":
                assert steering is not None
                steering.detach()
            elif op == "cleanup_stale":
                result = cleanup_stale(cmd["instance"])
            elif op == "pins":
                result = os.path.exists(bpfsys.pin_dir(cmd["instance"]))
            else:
                raise ValueError(f"unknown op {op}")
            reply = {"ok": True, "result": result}
        except Exception as e:
            reply = {"ok": False, "type": type(e).__name__, "error": str(e)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
