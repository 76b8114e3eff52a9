"""The benchmark's verdicts (the performance issue's targets) and its printed table, from the result JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MET, NOT_MET, NA = "met", "not met", "n/a"
#: The daemon's memory budget, MB (VmRSS).  pyroute2 0.7, which answers the daemon's route, link
#: and neighbour questions, loads all of its modules on import (about 11 MB).
RSS_BUDGET_MB = 45.0


def _get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _verdict(value: float | None, ok: Callable[[float], bool]) -> str:
    return NA if value is None else (MET if ok(value) else NOT_MET)


def _over_plain(data: dict[str, Any], size: str, res: Any, pct: str) -> float | None:
    """``res``'s RTT percentile minus plain UDP's at ``size``, µs (None when either is missing)."""
    a, b = _get(res, "latency", f"{pct}_us"), _get(data, "plain", size, "latency", f"{pct}_us")
    return None if a is None or b is None else round(a - b, 1)


def _added_rtt(data: dict[str, Any], label: str, pct: str) -> dict[str, float]:
    """rsockd's RTT percentile minus plain UDP's, µs, per size."""
    sizes = _get(data, "rsockd", label, "sizes") or {}
    added = {size: _over_plain(data, size, res, pct) for size, res in sizes.items()}
    return {size: v for size, v in added.items() if v is not None}


def floor_added(data: dict[str, Any], pct: str) -> float | None:
    """What the two do-nothing C relays (``data["floor"]``, bench/relayfloor.c) add to plain UDP's RTT
    percentile at their size, µs: the cost of four sleeping passes on this machine."""
    fl = data.get("floor") or {}
    return _over_plain(data, str(fl.get("size")), fl, pct)


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda v: v >= limit


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda v: v <= limit


def _worst(values: dict[str, float | None]) -> float | None:
    known = [v for v in values.values() if v is not None]
    return max(known) if known else None


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the performance issue: what was measured (a ratio to plain UDP in the same run, or
    µs, MB, s) and whether it is met.  The verdict is xdp's with one server worker; ``detail`` gives the
    other backends' figures."""
    r = data.get("ratios", {})
    rs = data.get("rsockd", {})
    out: list[dict[str, Any]] = []

    def add(key: str, what: str, goal: str, value: float | None, ok: Callable[[float], bool], unit: str,
            note: str = "", detail: dict[str, Any] | None = None) -> None:
        if value is None and not note:
            note = "not measured in this run"
        out.append({"key": key, "target": what, "goal": goal, "measured": value, "unit": unit,
                    "status": _verdict(value, ok), "note": note, "detail": detail or {}})

    def per_backend(*path: str) -> dict[str, Any]:
        return {label: _get(res, *path) for label, res in rs.items()}

    for size, limit in (("1200", 0.32), ("64", 0.5)):
        add(f"rate_{size}_xdp", f"sustained rate, {size} B, xdp, one server worker", f">= {limit:g}x plain UDP",
            _get(r, "xdp", size), _at_least(limit), "ratio",
            detail={label: _get(r, label, size) for label in rs})
    add("cpu_1200_xdp", "CPU per datagram, both daemons, 1200 B, xdp", "<= 10 µs",
        _get(rs, "xdp", "sizes", "1200", "cpu", "daemons_us_per_dgram"), _at_most(10), "µs",
        detail=per_backend("sizes", "1200", "cpu", "daemons_us_per_dgram"))
    for pct, limit in (("p50", 60.0), ("p99", 150.0)):
        added = _added_rtt(data, "xdp", pct)
        floor = floor_added(data, pct)
        add(f"rtt_{pct}_added", f"added RTT {pct} over plain UDP, idle tunnel, one request in flight, xdp "
            "(worst size)", f"<= {limit:.0f} µs", max(added.values()) if added else None,
            _at_most(limit), "µs",
            note="" if floor is None else f"two C relays that only relay add {floor:+.1f} µs here",
            detail={label: _added_rtt(data, label, pct) for label in rs} | {"floor": floor})
    wg = data.get("wireguard") or {}
    wg_note = wg.get("skipped") or "; ".join(f"{p}: {wg[p]['error']}" for p in ("rsockd", "plain")
                                             if isinstance(wg.get(p), dict) and "error" in wg[p])
    add("wireguard", f"WireGuard (iperf3 TCP) over rsockd {wg.get('backend', 'xdp')} vs over plain UDP",
        ">= 0.85x", _get(r, "wireguard"), _at_least(0.85), "ratio", note=wg_note,
        detail={p: _get(wg, p, "mbit_s") for p in ("rsockd", "plain")} | {"mtu": wg.get("mtu")})
    rss = {f"{label} {name}": _get(res, "rss", name, "rss_mb") for label, res in rs.items()
           for name in ("client", "server")}
    add("rss", "daemon RSS (the largest, every backend)", f"<= {RSS_BUDGET_MB:.0f} MB", _worst(rss),
        _at_most(RSS_BUDGET_MB), "MB",
        detail=rss)
    ready = {f"{label} {name}": _get(res, "ready", f"{name}_s") for label, res in rs.items()
             for name in ("client", "server")}
    add("ready", "time to READY, the bcc compile included (the slowest daemon, every backend)", "<= 10 s",
        _worst(ready), _at_most(10), "s", detail=ready)
    return out


# -- the table ------------------------------------------------------------------------------------


def _k(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _row(size: str, path: str, res: dict[str, Any], plain: dict[str, Any] | None) -> list[str]:
    lat = res.get("latency", {})
    cpu = res.get("cpu") or {}
    ratio = res["pps"] / plain["pps"] if plain and plain.get("pps") else None
    plat = (plain or {}).get("latency", {})
    added = [lat.get(f"{p}_us", 0) - plat.get(f"{p}_us", 0) if plain and f"{p}_us" in lat and f"{p}_us" in plat
             else None for p in ("p50", "p99")]
    flag = "*" if res.get("generator_limited") else ""
    return [
        size, path, _k(res["pps"]) + flag, _f(res.get("mbit_s"), ".0f"), _f(ratio, ".2f") if plain else "",
        "/".join(_f(lat.get(f"{p}_us"), ".0f") for p in ("p50", "p90", "p99")),
        "/".join(_f(a, "+.0f") for a in added) if plain else "",
        _f(cpu.get("daemons_us_per_dgram"), ".1f") if "daemons_us_per_dgram" in cpu else "",
        "/".join(_f(_get(cpu, n, "s_per_gb"), ".1f") for n in ("client", "server")) if "client" in cpu else "",
        "/".join(_f(_get(cpu, n, "s_per_mdgram"), ".1f") for n in ("client", "server")) if "client" in cpu else "",
        "/".join(_f(_get(cpu, n, "cores"), ".2f") for n in ("client", "server")) if "client" in cpu else "",
        _f(_get(cpu, "generator", "cores"), ".2f"), _f(_get(cpu, "sink", "cores"), ".2f"),
        _f((cpu.get("machine_busy") or {}).get("cores"), ".2f"),
    ]


HEADER = ["size", "path", "rate/s", "Mbit/s", "xplain", "RTT p50/90/99 us", "+RTT p50/99", "us/dgram",
          "s/GB c/s", "s/Mdgram c/s", "CPU c/s", "gen", "sink", "busy"]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = zip(r, widths, strict=True)
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _measured(t: dict[str, Any]) -> str:
    v = t["measured"]
    if v is None:
        return "-"
    # three decimals: a ratio of 0.317 against a goal of 0.32 must not read as the goal itself
    return f"{v:.3f}x" if t["unit"] == "ratio" else f"{v:.1f} {t['unit']}"


def _wireguard_lines(data: dict[str, Any]) -> list[str]:
    wg = data.get("wireguard")
    if not wg:
        return []
    if "skipped" in wg:
        return [f"WireGuard: skipped ({wg['skipped']})"]

    def path(name: str) -> str:
        p = wg.get(name) or {}
        if "mbit_s" not in p:
            return f"{name} error: {p.get('error', '?')}"
        cpu = p.get("cpu_cores", {})
        rounds = p.get("rounds_mbit_s") or []
        each = f" (median of {'/'.join(f'{m:.0f}' for m in rounds)})" if len(rounds) > 1 else ""
        return (f"{name} {p['mbit_s']:.0f} Mbit/s{each} ({p.get('retransmits')} retransmits; wireguard-go c/s "
                f"{_f(cpu.get('wireguard_client'), '.2f')}/{_f(cpu.get('wireguard_server'), '.2f')} CPU, "
                f"busy {_f(cpu.get('machine_busy'), '.2f')}, other programs {_f(cpu.get('other'), '.2f')})")

    ratio = _get(data, "ratios", "wireguard")
    return [f"WireGuard ({wg.get('tool', 'wireguard-go')}, MTU {wg.get('mtu', '?')} = rsockd's max_datagram "
            f"{wg.get('max_datagram', '?')} - {wg.get('overhead_b', 32)}; "
            f"{wg.get('rounds', 1)} x {wg.get('seconds')} s per path, in turn; rsockd {wg.get('backend')}):",
            f"  {path('plain')}", f"  {path('rsockd')}: {_f(ratio, '.2f')}x plain"]


def _build_note(data: dict[str, Any], res: dict[str, Any]) -> str:
    """What a backend's daemons ran, when it is not what the run's header says (a stale build)."""
    want = {"core": _get(data, "code", "core"), "reader": _get(data, "code", "reader")}
    ran = {b.get("core") and f"core {b.get('core')}, reader {b.get('reader')}"
           for b in (res.get("build") or {}).values() if b and {k: b.get(k) for k in want} != want}
    return f"; WARNING: the daemons ran {' / '.join(sorted(ran))}" if ran else ""


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    o = data["options"]
    out = [f"rsockd benchmark, {data['started']}{' (quick)' if o.get('quick') else ''}, {data.get('seconds', 0):.0f} s",
           f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, kernel {m['kernel']}, "
           f"Python {m['python']}; veth tx offload {'on' if m['veth_offload'] else 'off'}, "
           f"GRO {'on' if m.get('veth_gro') else 'off'}; "
           f"other programs at start: {m.get('background_cpus', 0):.2f} CPU",
           f"rsockd {_get(data, 'code', 'commit') or '?'}, core {_get(data, 'code', 'core') or '?'}, "
           f"reader {_get(data, 'code', 'reader') or '?'}, tags {_get(data, 'code', 'tags_at_once') or '1'} at a time"
           f"{' + uncommitted changes to ' + ', '.join(data['code']['dirty']) if _get(data, 'code', 'dirty') else ''}",
           f"load: {o.get('gen_procs', 1)} generator process(es) x {o['flows']} flow(s), {o['workers']} worker(s); "
           f"steps {o['step_s']} s after {o['warmup_s']} s "
           f"warm-up; sustained = highest offered rate with loss <= {o['loss_max']:.0%}"]
    gen = data.get("generator", {})
    ceil = " | ".join(f"{s} B {_k(v['pps'])}/s ({v['cpu_cores']:.2f} CPU)" for s, v in gen.get("ceiling", {}).items())
    out.append(f"generator ({gen.get('kind', '?')}) alone: {ceil}")
    ip = gen.get("iperf3_plain") or {}
    if ip and "skipped" not in ip:
        out.append("iperf3 -u flat out, plain: " + " | ".join(
            f"{s} B {_k(v.get('sent_pps'))}/s loss {_f((v.get('loss') or 0) * 100, '.1f')} %" if "sent_pps" in v
            else f"{s} B error" for s, v in ip.items()))
    rows = [HEADER]
    plain = data.get("plain", {})
    for size in [str(s) for s in o["sizes"]]:
        if size in plain:
            rows.append(_row(size, "plain", plain[size], None))
        for label, res in data.get("rsockd", {}).items():
            if size in res.get("sizes", {}):
                rows.append(_row(size, label, res["sizes"][size], plain.get(size)))
    ac = data.get("all_cores", {})
    if "xdp" in ac:
        size = str(ac["size"])
        rows.append(_row(size, f"plain/{ac['flows']}fl", ac["plain"], None))
        rows.append(_row(size, f"xdp-w{ac['workers']}", ac["xdp"]["sizes"][size], ac["plain"]))
    out += ["", _table(rows), "",
            "rate/s: sustained datagrams/s (* = plain took all the generator could send: generator-limited); "
            "xplain: rsockd/plain;",
            "+RTT: added over plain; us/dgram: CPU of both daemons per datagram; s/GB, s/Mdgram, CPU: "
            "client/server daemon; gen, sink, busy: CPUs used by the generator, the sink, the whole machine"]
    size = str(o["sizes"][-1])
    tails = {label: _get(res, "sizes", size, "latency", "p99_9_us")
             for label, res in [("plain", {"sizes": plain}), *data.get("rsockd", {}).items()]}
    if any(v is not None for v in tails.values()):
        out.append(f"RTT p99.9 at {size} B (the stalls, one ping in a thousand), us: "
                   + ", ".join(f"{label} {_f(v, '.0f')}" for label, v in tails.items()))
    fl = data.get("floor") or {}
    if "skipped" in fl:
        out.append(f"latency floor: skipped ({fl['skipped']})")
    elif fl:
        lat = fl.get("latency", {})
        out.append(f"latency floor, {fl.get('size')} B: two C relays that only relay (bench/relayfloor.c), one per "
                   f"namespace: RTT p50/90/99 {_f(lat.get('p50_us'), '.0f')}/{_f(lat.get('p90_us'), '.0f')}/"
                   f"{_f(lat.get('p99_us'), '.0f')} us, {_f(floor_added(data, 'p50'), '+.0f')}/"
                   f"{_f(floor_added(data, 'p99'), '+.0f')} over plain: what four sleeping "
                   "passes cost here, before any work")
    passes = {label: _get(res, "sizes", size, "latency", "cpu_us_per_pass")
              for label, res in [("floor", {"sizes": {size: fl}}), *data.get("rsockd", {}).items()]}
    if any(passes.values()):
        out.append(f"CPU per pass during the pings at {size} B (each daemon or relay wakes twice a round trip), "
                   "us, client/server (user time in brackets): " + ", ".join(
                       f"{label} {_f(_get(p, 'client', 'total'), '.0f')}/{_f(_get(p, 'server', 'total'), '.0f')} "
                       f"({_f(_get(p, 'client', 'user'), '.0f')}/{_f(_get(p, 'server', 'user'), '.0f')})"
                       for label, p in passes.items() if p))
    for label, res in data.get("rsockd", {}).items():
        rd, rss = res.get("ready", {}), res.get("rss", {})
        out.append(f"{label}: READY server {_f(rd.get('server_s'), '.2f')} s, client {_f(rd.get('client_s'), '.2f')} s "
                   f"(connections up {_f(rd.get('client_up_s'), '.2f')} s); RSS server "
                   f"{_f(_get(rss, 'server', 'rss_mb'))} MB, client {_f(_get(rss, 'client', 'rss_mb'))} MB"
                   + _build_note(data, res))
    rc = data.get("plain_recheck")
    if rc:
        out.append(f"plain UDP re-measured at the end ({rc['size']} B): {_k(rc['pps'])}/s vs {_k(rc['first_pps'])}/s "
                   f"at the start ({_f((rc['drift'] or 0) * 100, '+.0f')} % drift)")
    out += _wireguard_lines(data)
    wvo = _get(data, "ratios", "workers_vs_one") or {}
    ac = data.get("all_cores", {})
    for size, v in wvo.items():
        out.append(f"workers = {ac.get('workers')} against one ({size} B, xdp, each against plain UDP with its own "
                   f"flows): {_f(_get(data, 'ratios', 'all_cores', size), '.2f')}x vs "
                   f"{_f(_get(data, 'ratios', 'xdp', size), '.2f')}x plain = {_f(v, '.2f')}x one worker's")
    out += ["", "targets (each a ratio to plain UDP in this run, or an absolute cost):"]
    for t in data.get("targets", []):
        note = f" ({t['note']})" if t["note"] else ""
        out.append(f"  [{t['status']:>7}] {t['target']}: {t['goal']}; measured {_measured(t)}{note}")
    for label in ("xdp", "nft"):
        prof = _get(data, "rsockd", label, "profile")
        if not prof or "skipped" in prof:
            continue
        out += ["", f"profile, {label}, {prof['size']} B at {_k(prof['offered_pps'])}/s (py-spy, self time):"]
        for name in ("client", "server"):
            p = prof.get(name) or {}
            top = ", ".join(f"{e['function']} {e['share']:.0%}" for e in (p.get("self") or [])[:6])
            out.append(f"  {name}: {top or p.get('error', '-')}")
    return "\n".join(out)
