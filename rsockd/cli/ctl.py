"""``rsockctl``: talk to a running rsockd, and offline tools.

    rsockctl [--instance NAME] [--runtime-dir DIR] [--json] status
    rsockctl [--instance NAME] [--runtime-dir DIR] [--json] ports
    rsockctl verify-checksum ADDRS DATA [ADDRS DATA ...]
    rsockctl verify-checksum DIR

``status`` and ``ports`` ask the daemon over its control socket and print aligned text in the
spirit of ``wg show`` (colour only on a terminal, never with ``NO_COLOR``), or the daemon's
versioned JSON with ``--json``.  Exit codes: 0 ok, 1 error, 3 not running, 4 permission denied.

``verify-checksum`` checks TCP checksums: ADDRS holds "source destination" (IPv4 or IPv6), DATA a
raw TCP segment (header + payload).  With DIR, every ``tcp_addrs_N.txt`` / ``tcp_data_N.dat`` pair
in it, in numeric order of N.  Prints PASS or FAIL per pair, one per line, in order.  Exit 0 when
all pass, 1 when any fails, 2 on unreadable or ill-formed input (one line on stderr naming the
file; pairs before it have been printed).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.packet import TCP_MIN_HEADER, pseudo_sum, transport_checksum_ok
from ..errors import InputError, RsockdError
from ..service.config import DEFAULT_RUNTIME_DIR, format_ports
from ..service.control import request

EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4

_ADDRS = re.compile(r"^tcp_addrs_(\d+)\.txt$")
_DATA = re.compile(r"^tcp_data_(\d+)\.dat$")


def read_addrs(path: Path) -> tuple[bytes, bytes]:
    """Parse an ADDRS file into two packed addresses of one family."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {_why(e)}") from None
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise InputError(f"{path}: expected \"source destination\", found {len(parts)} field(s)")
    try:
        src, dst = (ipaddress.ip_address(p) for p in parts)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    if src.version != dst.version:
        raise InputError(f"{path}: source is IPv{src.version} but destination is IPv{dst.version}")
    return src.packed, dst.packed


def read_segment(path: Path, v4: bool) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {_why(e)}") from None
    if len(data) < TCP_MIN_HEADER:
        raise InputError(f"{path}: {len(data)} bytes is shorter than a TCP header (20)")
    if v4 and len(data) > 0xFFFF:
        raise InputError(f"{path}: {len(data)} bytes is longer than an IPv4 packet can carry")
    return data


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    if isinstance(e, UnicodeDecodeError):
        return "not ASCII text"
    return str(e)


def pairs_in(directory: Path) -> list[tuple[Path, Path]]:
    """The ``tcp_addrs_N.txt``/``tcp_data_N.dat`` pairs of a directory, by numeric N."""
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise InputError(f"{directory}: cannot list: {_why(e)}") from None
    addrs = {int(m[1]): n for n in names if (m := _ADDRS.match(n))}
    datas = {int(m[1]): n for n in names if (m := _DATA.match(n))}
    if not addrs and not datas:
        raise InputError(f"{directory}: no tcp_addrs_N.txt / tcp_data_N.dat pairs")
    out = []
    for n in sorted(addrs.keys() | datas.keys()):
        if n not in datas:
            raise InputError(f"{directory / f'tcp_data_{n}.dat'}: missing (its tcp_addrs_{n}.txt exists)")
        if n not in addrs:
            raise InputError(f"{directory / f'tcp_addrs_{n}.txt'}: missing (its tcp_data_{n}.dat exists)")
        out.append((directory / addrs[n], directory / datas[n]))
    return out


def verify_pairs(pairs: Sequence[tuple[Path, Path]]) -> Iterator[bool]:
    """Yield whether each pair's checksum is right; raises ``InputError`` at an ill-formed one."""
    for addrs, data in pairs:
        src, dst = read_addrs(addrs)
        seg = read_segment(data, len(src) == 4)
        yield transport_checksum_ok(pseudo_sum(src, dst), seg)


def cmd_verify_checksum(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    if len(paths) == 1 and paths[0].is_dir():
        pairs = pairs_in(paths[0])
    elif len(paths) % 2:
        raise InputError("verify-checksum: give ADDRS DATA pairs or one directory")
    else:
        pairs = list(zip(paths[0::2], paths[1::2], strict=True))
    ok = True
    for good in verify_pairs(pairs):
        print("PASS" if good else "FAIL", flush=True)
        ok &= good
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# status / ports


class NotRunning(RsockdError):
    exit_code = EXIT_NOT_RUNNING


class NoPermission(RsockdError):
    exit_code = EXIT_PERMISSION


def ask(path: str, command: str) -> dict[str, Any]:
    """The daemon's ``data`` for ``command``; typed errors for the LSB exit codes."""
    try:
        resp = request(path, command)
    except FileNotFoundError:
        raise NotRunning(f"rsockd is not running (no control socket at {path})") from None
    except ConnectionRefusedError:
        raise NotRunning(f"rsockd is not running ({path} refuses connections: a stale socket)") from None
    except PermissionError:
        raise NoPermission(f"permission denied on {path}: run with sudo or join the socket's group") from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise NoPermission(f"permission denied on {path}: run with sudo or join the socket's group") from None
        raise RsockdError(f"{path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RsockdError(f"{path}: the daemon answered something that is not JSON") from None
    if not isinstance(resp, dict):
        raise RsockdError(f"{path}: the daemon's answer is not a JSON object")
    if not resp.get("ok"):
        reason = " ".join(str(resp.get("error")).split())  # one line, whatever the answer held
        raise RsockdError(f"the daemon refused {command!r}: {reason}")
    data = resp.get("data")
    if not isinstance(data, dict):
        raise RsockdError(f"{path}: the daemon's answer has no data object")
    return data


class Style:
    """ANSI colour on a terminal unless NO_COLOR is set (https://no-color.org)."""

    def __init__(self, stream: Any = None) -> None:
        stream = stream or sys.stdout
        self.on = bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text

    def head(self, t: str) -> str:
        return self._c("1;32", t)

    def key(self, t: str) -> str:
        return self._c("1", t)

    def good(self, t: str) -> str:
        return self._c("32", t)

    def bad(self, t: str) -> str:
        return self._c("31", t)

    def dim(self, t: str) -> str:
        return self._c("2", t)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def human_count(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(int(n))


def ago(seconds: float | None) -> str:
    """Relative time as wg show prints it, shortened: "3 s ago", "2 min ago"."""
    if seconds is None:
        return "never"
    s = int(seconds)
    if s < 1:
        return "now"
    parts = []
    for div, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if s >= div:
            parts.append(f"{s // div} {unit}")
            s %= div
        if len(parts) == 2:
            break
    return " ".join(parts) + " ago"


def duration(seconds: float) -> str:
    return ago(seconds).removesuffix(" ago") if seconds >= 1 else "0 s"


def render_status(st: dict[str, Any], style: Style) -> str:
    """The human form of a status payload (docs/control.md)."""
    rows: list[tuple[str, str]] = []
    backend = st.get("backend") or {}
    ifaces = ", ".join(f"{i['interface']} ({i['mode']})" for i in backend.get("interfaces", []))
    rows.append(("role", str(st["role"])))
    name = backend.get("name") or "none (udp transport only)"
    rows.append(("backend", name + (f" on {ifaces}" if ifaces else "")))
    rows.append(("ports", f"{format_ports(st['ports'])} ({'+'.join(st['transports'])})"))
    if st["role"] == "server":
        rows.append(("target", str(st.get("target"))))
        rows.append(("peers", ", ".join(st.get("peers", [])) or "none"))
    else:
        rows.append(("server", str(st.get("server"))))
        rows.append(("listen", str(st.get("listen"))))
    conns = st.get("connections", {})
    by_state = conns.get("by_state", {})
    est = by_state.get("established", 0)
    others = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()) if s != "established")
    text = f"{est}/{conns.get('total', 0)} established" + (f", {others}" if others else "")
    rows.append(("connections", style.good(text) if est == conns.get("total") and est else style.bad(text)))
    if st["role"] == "server":
        rows.append(("sessions", f"{st.get('sessions', 0)}, {st.get('half_open', 0)} half-open"))
    rows.append(("flows", str(st.get("flows", 0))))
    if st.get("by_worker"):
        parts = [f"{w['index']} (pid {w['pid']}, ports {format_ports(w['ports'])}: "
                 + (style.bad(w["error"]) if "error" in w else f"{w['connections']} up, {w['flows']} flows") + ")"
                 for w in st["by_worker"]]
        rows.append(("workers", f"{len(parts)}: " + "; ".join(parts)))
    t = st.get("traffic", {})
    if t:
        rows.append(("from app", f"{human_count(t['from_app_packets'])} packets, {human_bytes(t['from_app_bytes'])}"))
        rows.append(("to app", f"{human_count(t['to_app_packets'])} packets, {human_bytes(t['to_app_bytes'])}"))
        rows.append(("tunnel rx", f"{human_count(t['tunnel_rx_packets'])} packets, "
                                  f"{human_bytes(t['tunnel_rx_bytes'])}"
                     + (f" ({human_count(t['tunnel_rx_batched'])} of them in {human_count(t['tunnel_rx_batches'])}"
                        " coalesced reads)" if t.get("tunnel_rx_batches") else "")))
        rows.append(("tunnel tx", f"{human_count(t['tunnel_tx_packets'])} packets, "
                                  f"{human_bytes(t['tunnel_tx_bytes'])}"
                     + (f" ({human_count(t['tunnel_tx_batched'])} of them in {human_count(t['tunnel_tx_batches'])}"
                        " batched sends)" if t.get("tunnel_tx_batches") else "")))
    drops = {k: v for k, v in st.get("drops", {}).items() if v}
    rows.append(("drops", ", ".join(f"{k} {human_count(v)}" for k, v in sorted(drops.items())) or "none"))
    steer = st.get("steering", {})
    rows.append(("kernel RST/ACK suppressed", str(steer.get("guard_dropped", 0))))
    if st["role"] == "server" and "syn_limited" in steer:
        rows.append(("SYNs over the limit", f"{human_count(steer['syn_limited'])} (dropped in XDP)"))
    if "passed_probe" in steer:
        rows.append(("probes to the kernel", f"{human_count(steer['passed_probe'])} segments on tunnel ports of no "
                                             "rsockd connection, handed to the kernel (port sharing)"))
    if steer.get("passed_malformed") or steer.get("passed_fragment") or steer.get("passed_ip_options"):
        rows.append(("left to the kernel", f"{steer.get('passed_malformed', 0)} malformed, "
                                           f"{steer.get('passed_fragment', 0)} fragments, "
                                           f"{steer.get('passed_ip_options', 0)} with IP options"))
    if steer.get("passed_transit"):
        rows.append(("routed through", f"{human_count(steer['passed_transit'])} segments on tunnel ports "
                                       "to other hosts, left to the kernel"))
    tx_err = st.get("tx_errors", {})
    if tx_err:
        rows.append(("send errors", ", ".join(f"{k} {v}" for k, v in sorted(tx_err.items()))))
    if st.get("max_datagram"):
        rows.append(("inner MTU", f"{st['max_datagram']} (path MTU {st.get('mtu')}; datagrams above it are dropped)"))
    width = max(len(k) for k, _ in rows)
    about = f"(pid {st['pid']}, up {duration(st['uptime'])}, rsockd {st['version']})"
    head = f"{style.head('instance')}: {style.key(st['instance'])} {style.dim(about)}"
    return "\n".join([head, *(f"  {style.key(k.rjust(width))}: {v}" for k, v in rows)]) + "\n"


PORT_COLUMNS = [("port", "port"), ("transport", "transport"), ("state", "state"), ("peer", "peer"),
                ("local", "local_port"), ("seq", "seq"), ("ack", "ack"), ("rx pkts", "rx_packets"),
                ("rx bytes", "rx_bytes"), ("tx pkts", "tx_packets"), ("tx bytes", "tx_bytes"),
                ("last rx", "last_rx_ago"), ("reconnects", "reconnects")]


def render_ports(data: dict[str, Any], style: Style) -> str:
    rows = []
    for c in sorted(data["connections"], key=lambda c: (c["port"], c["transport"], c["peer"])):
        row = []
        for _title, key in PORT_COLUMNS:
            v = c.get(key)
            if key in ("rx_bytes", "tx_bytes"):
                row.append(human_bytes(v))
            elif key in ("rx_packets", "tx_packets"):
                row.append(human_count(v))
            elif key == "last_rx_ago":
                row.append(ago(v))
            else:
                row.append(str(v))
        rows.append((row, c["state"]))
    if not rows:
        return "no connections\n"
    titles = [t for t, _ in PORT_COLUMNS]
    widths = [max(len(t), *(len(r[i]) for r, _ in rows)) for i, t in enumerate(titles)]
    out = ["  ".join(style.key(t.ljust(w)) for t, w in zip(titles, widths, strict=True)).rstrip()]
    state_col = titles.index("state")
    for row, state in rows:
        cells = [v.ljust(w) for v, w in zip(row, widths, strict=True)]
        cells[state_col] = (style.good if state == "established" else style.bad)(cells[state_col])
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def socket_path(args: argparse.Namespace) -> str:
    return os.path.join(args.runtime_dir, args.instance, "control.sock")


def cmd_status(args: argparse.Namespace) -> int:
    data = ask(socket_path(args), "status")
    if args.json:
        print(json.dumps({"version": 1, "status": data}, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render_status(data, Style()))
    return 0


def cmd_ports(args: argparse.Namespace) -> int:
    data = ask(socket_path(args), "ports")
    if args.json:
        print(json.dumps({"version": 1, "ports": data}, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render_ports(data, Style()))
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rsockctl", description="Inspect a running rsockd; offline tools.")
    p.add_argument("--instance", default=os.environ.get("RSOCKD_INSTANCE", "rsockd"),
                   help="which daemon (default: rsockd, or $RSOCKD_INSTANCE)")
    p.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR,
                   help=f"where control sockets live (default {DEFAULT_RUNTIME_DIR})")
    p.add_argument("--json", action="store_true", help="print the daemon's versioned JSON")
    p.add_argument("--version", action="version", version=f"rsockctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, func, text in (("status", cmd_status, "the daemon's state and counters"),
                             ("ports", cmd_ports, "one row per connection")):
        sp = sub.add_parser(name, help=text)
        # The same options after the command (`rsockctl status --json`); SUPPRESS keeps the
        # value given before it when they are not repeated.
        sp.add_argument("--instance", default=argparse.SUPPRESS)
        sp.add_argument("--runtime-dir", default=argparse.SUPPRESS)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        sp.set_defaults(func=func)
    v = sub.add_parser("verify-checksum", help="check TCP checksums of ADDRS/DATA pairs")
    v.add_argument("paths", nargs="+", metavar="ADDRS DATA | DIR")
    v.set_defaults(func=cmd_verify_checksum)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except RsockdError as e:
        print(f"rsockctl: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
