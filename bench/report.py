"""The benchmark's verdicts (issue 7's targets) and its printed table, from the result JSON."""

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


def _added_rtt(data: dict[str, Any], label: str, pct: str) -> dict[str, float]:
    """rsockd's RTT percentile minus plain UDP's, µs, per size."""
    out = {}
    for size, res in (_get(data, "rsockd", label, "sizes") or {}).items():
        a, b = _get(res, "latency", f"{pct}_us"), _get(data, "plain", size, "latency", f"{pct}_us")
        if a is not None and b is not None:
            out[size] = round(a - b, 1)
    return out


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 7: what was measured (a ratio, or µs) and whether it is met."""
    r = data.get("ratios", {})
    out: list[dict[str, Any]] = []

    def add(key: str, what: str, goal: str, value: float | None, ok: Callable[[float], bool], unit: str,
            note: str = "", detail: dict[str, Any] | None = None) -> None:
        if value is None and not note:
            note = "not measured in this run"
        out.append({"key": key, "target": what, "goal": goal, "measured": value, "unit": unit,
                    "status": _verdict(value, ok), "note": note, "detail": detail or {}})

    add("rate_1200_xdp", "sustained rate, 1200 B, xdp, one worker", ">= 40 % of plain UDP",
        _get(r, "xdp", "1200"), lambda v: v >= 0.40, "ratio")
    if "xdp+packet" in data.get("rsockd", {}):
        add("rate_1200_xdp_packet", "sustained rate, 1200 B, xdp + packet send path, one worker",
            ">= 40 % of plain UDP", _get(r, "xdp+packet", "1200"), lambda v: v >= 0.40, "ratio")
    ac = data.get("all_cores", {})
    size = str(ac.get("size") or max(data.get("options", {}).get("sizes") or [1200]))
    note = ac.get("skipped", "")
    reported = _get(ac, "xdp", "workers", "reported") or {}
    if "xdp" in ac and not all(isinstance(v, int) for v in reported.values()):
        note = "forced with --all-cores on, but the daemons report no workers: this is one worker"
    add("rate_xdp_all_cores", f"sustained rate, {size} B, xdp, workers on all cores",
        ">= 60 % of plain UDP (same flows)", _get(r, "all_cores", size), lambda v: v >= 0.60, "ratio",
        note=note)
    add("rate_64_xdp", "sustained rate, 64 B, xdp", ">= 30 % of plain UDP", _get(r, "xdp", "64"),
        lambda v: v >= 0.30, "ratio")
    add("cpu_1200_xdp", "CPU per datagram, both daemons, 1200 B, xdp", "<= 15 µs",
        _get(data, "rsockd", "xdp", "sizes", "1200", "cpu", "daemons_us_per_dgram"), lambda v: v <= 15, "µs")
    if "xdp+packet" in data.get("rsockd", {}):
        add("rate_64_xdp_packet", "sustained rate, 64 B, xdp + packet send path", ">= 30 % of plain UDP",
            _get(r, "xdp+packet", "64"), lambda v: v >= 0.30, "ratio")
        add("cpu_1200_xdp_packet", "CPU per datagram, both daemons, 1200 B, xdp + packet send path", "<= 15 µs",
            _get(data, "rsockd", "xdp+packet", "sizes", "1200", "cpu", "daemons_us_per_dgram"), lambda v: v <= 15,
            "µs")
    for pct, limit in (("p50", 50.0), ("p99", 150.0)):
        added = _added_rtt(data, "xdp", pct)

        def within(v: float, lim: float = limit) -> bool:
            return v <= lim

        add(f"rtt_{pct}_added", f"added RTT {pct} over plain UDP, xdp (worst size)", f"<= {limit:.0f} µs",
            max(added.values()) if added else None, within, "µs",
            detail={"xdp": added, "nft": _added_rtt(data, "nft", pct)})
    nvx = _get(r, "nft_vs_xdp") or {}
    add("nft_vs_xdp", "nft backend vs xdp backend, sustained rate (worst size)", ">= 70 % of xdp",
        min(nvx.values()) if nvx and None not in nvx.values() else None, lambda v: v >= 0.70, "ratio", detail=nvx)
    rss = [v for label in data.get("rsockd", {}) for who in ("server", "client")
           if isinstance(v := _get(data, "rsockd", label, "rss", who, "rss_mb"), (int, float))]
    add("rss_daemons", "RSS of each daemon, every backend (largest)", f"<= {RSS_BUDGET_MB:.0f} MB",
        max(rss) if rss else None, lambda v: v <= RSS_BUDGET_MB, "MB")
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


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    o = data["options"]
    out = [f"rsockd benchmark, {data['started']}{' (quick)' if o.get('quick') else ''}, {data.get('seconds', 0):.0f} s",
           f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, kernel {m['kernel']}, "
           f"Python {m['python']}; veth tx offload {'on' if m['veth_offload'] else 'off'}; "
           f"other programs at start: {m.get('background_cpus', 0):.2f} CPU",
           f"rsockd {_get(data, 'code', 'commit') or '?'}"
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
    for label, res in data.get("rsockd", {}).items():
        rd, rss = res.get("ready", {}), res.get("rss", {})
        out.append(f"{label}: READY server {_f(rd.get('server_s'), '.2f')} s, client {_f(rd.get('client_s'), '.2f')} s "
                   f"(connections up {_f(rd.get('client_up_s'), '.2f')} s); RSS server "
                   f"{_f(_get(rss, 'server', 'rss_mb'))} MB, client {_f(_get(rss, 'client', 'rss_mb'))} MB")
    rc = data.get("plain_recheck")
    if rc:
        out.append(f"plain UDP re-measured at the end ({rc['size']} B): {_k(rc['pps'])}/s vs {_k(rc['first_pps'])}/s "
                   f"at the start ({_f((rc['drift'] or 0) * 100, '+.0f')} % drift)")
    out += ["", "targets (issue 7):"]
    for t in data.get("targets", []):
        v = t["measured"]
        shown = "-" if v is None else (f"{v:.0%}" if t["unit"] == "ratio" else f"{v:.1f} {t['unit']}")
        note = f" ({t['note']})" if t["note"] else ""
        out.append(f"  [{t['status']:>7}] {t['target']}: {t['goal']}; measured {shown}{note}")
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
