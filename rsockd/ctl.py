"""``rsockctl``: talk to a running rsockd, and offline tools.

    rsockctl verify-checksum ADDRS DATA [ADDRS DATA ...]
    rsockctl verify-checksum DIR

``verify-checksum`` checks TCP checksums: ADDRS holds "source destination" (IPv4 or IPv6), DATA a
raw TCP segment (header + payload).  With DIR, every ``tcp_addrs_N.txt`` / ``tcp_data_N.dat`` pair
in it, in numeric order of N.  Prints PASS or FAIL per pair, one per line, in order.  Exit 0 when
all pass, 1 when any fails, 2 on unreadable or ill-formed input (one line on stderr naming the
file; pairs before it have been printed).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import InputError, RsockdError
from .packet import TCP_MIN_HEADER, pseudo_sum, transport_checksum_ok

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rsockctl", description="Inspect a running rsockd; offline tools.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
