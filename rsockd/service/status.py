"""The one status schema: what ``rsockctl status`` and ``rsockctl ports`` show (docs/control.md,
docs/control.schema.json).  The daemon builds it from its relay, a worker builds the same for its
own relay and the daemon adds them up; ``rsockctl`` only renders it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..core.endpoint import ClientEndpoint, ServerEndpoint
from ..core.faketcp import Connection
from ..dataplane.relay import ClientRelay, Relay, ServerRelay, peer_text

#: Status fields that add up over workers (numbers, and dicts of numbers).
SUMMED = ("sessions", "flows", "half_open", "connections", "traffic", "drops", "tx_errors")


def connection_row(relay: Relay[Any], conn: Connection, now: float) -> dict[str, Any]:
    """One row of ``rsockctl ports``."""
    return {
        "transport": conn.transport,
        "index": conn.conn_index,
        "state": conn.state.name.lower(),
        "port": conn.local[1] if relay.role == "server" else conn.remote[1],
        "local_port": conn.local[1],
        "peer": peer_text(conn.remote),
        "seq": conn.snd_nxt,
        "ack": conn.rcv_nxt,
        "rx_packets": conn.rx_packets,
        "rx_bytes": conn.rx_bytes,
        "tx_packets": conn.tx_packets,
        "tx_bytes": conn.tx_bytes,
        "last_rx_ago": round(now - conn.last_rx, 3) if conn.last_rx else None,
        "reconnects": conn.reconnects,
        "close_reason": conn.close_reason,
        "send_path": relay.send_path_of(conn),
    }


def connection_rows(relay: Relay[Any]) -> list[dict[str, Any]]:
    now = time.monotonic()  # the relay's clock
    return [connection_row(relay, c, now) for c in relay.connections()]


def _role_status(relay: Relay[Any]) -> dict[str, Any]:
    if isinstance(relay, ServerRelay):
        ep: ServerEndpoint = relay.endpoint
        sessions = ep.sessions.sessions
        return {
            "sessions": len(sessions),
            "flows": sum(len(s.flows) for s in sessions.values()),
            "half_open": len(ep.acceptor.pending),
            "target": f"{relay.target[0]}:{relay.target[1]}",
            "peers": sorted({peer_text(c.remote).rsplit(":", 1)[0] for c in ep.acceptor.connections.values()}),
        }
    assert isinstance(relay, ClientRelay)
    cep: ClientEndpoint = relay.endpoint
    listen = relay.cfg.listen
    return {
        "flows": len(cep.flows.by_id),
        "server": relay.server_ip,
        "listen": f"{listen[0]}:{listen[1]}" if listen else None,
        "local_ports": relay.local_ports,
        "peers": [relay.server_ip],
    }


def build_info() -> dict[str, Any]:
    """What this process runs: the core compiled (mypyc) or interpreted, the tunnel sockets'
    reader compiled (C) or Python's loops, and how many record tags it computes at once
    (docs/design.md, "The compiled core", "Tags four at a time")."""
    from .. import compiled
    from ..dataplane.relay import _compiled_io

    io = _compiled_io()
    return {"core": "compiled" if compiled() else "interpreted",
            "reader": "compiled" if io is not None else "python",
            "tags_at_once": int(getattr(io, "TAGS_AT_ONCE", 1))}


def relay_status(relay: Relay[Any]) -> dict[str, Any]:
    """The part of ``rsockctl status`` a relay answers (a worker sends this to the daemon)."""
    ep = relay.endpoint
    detail = _role_status(relay)
    conns = connection_rows(relay)
    states: dict[str, int] = {}
    for c in conns:
        states[c["state"]] = states.get(c["state"], 0) + 1
    detail["connections"] = {"total": len(conns), "by_state": states}
    batches, batched = relay.tx_batches
    rx_batches, rx_batched = relay.rx_batches
    detail["traffic"] = {
        "from_app_packets": ep.app_rx, "from_app_bytes": ep.app_rx_bytes,
        "to_app_packets": ep.app_tx, "to_app_bytes": ep.app_tx_bytes,
        "tunnel_rx_packets": sum(c["rx_packets"] for c in conns),
        "tunnel_rx_bytes": sum(c["rx_bytes"] for c in conns),
        "tunnel_tx_packets": sum(c["tx_packets"] for c in conns),
        "tunnel_tx_bytes": sum(c["tx_bytes"] for c in conns),
        "tunnel_tx_batches": batches, "tunnel_tx_batched": batched,
        "tunnel_rx_batches": rx_batches, "tunnel_rx_batched": rx_batched,
        "wakeups_loop": relay.wakeups_loop, "wakeups_own": relay.wakeups_own,
    }
    detail["drops"] = dict(ep.drops)
    detail["tx_errors"] = dict(relay.tx_errors)
    return detail


def _add(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other``'s numbers into ``into``, recursing into dicts (made anew, never shared)."""
    for k, v in other.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


def merge_status(mine: dict[str, Any], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """The daemon's relay status with its workers' added in (``mine`` is left as it was)."""
    summed: dict[str, Any] = {}
    for st in (mine, *theirs):
        _add(summed, {k: st[k] for k in SUMMED if k in mine and k in st})
    out = {**mine, **summed}
    if "peers" in out:
        out["peers"] = sorted({p for st in [mine, *theirs] for p in st.get("peers", [])})
    return out


def worker_row(index: int, pid: int, ports: Sequence[int], st: dict[str, Any]) -> dict[str, Any]:
    """One row of ``by_worker``."""
    return {"index": index, "pid": pid, "ports": list(ports),
            "connections": st["connections"]["by_state"].get("established", 0),
            "sessions": st["sessions"], "flows": st["flows"], "half_open": st["half_open"]}

