"""rsockctl verify-checksum on pairs made by another tool (scapy), and its error paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from rsockd.cli.ctl import main


def scapy_segment(src: str, dst: str, payload: bytes, **tcp: object) -> bytes:
    """A TCP segment whose checksum scapy computed (header + payload, no IP header)."""
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    pkt = ip / TCP(**tcp) / Raw(payload)
    built = pkt.__class__(bytes(pkt))
    return bytes(built[TCP])


def write_pairs(d: Path, cases: list[tuple[str, str, bytes]]) -> None:
    for n, (src, dst, seg) in enumerate(cases):
        (d / f"tcp_addrs_{n}.txt").write_text(f"{src} {dst}\n")
        (d / f"tcp_data_{n}.dat").write_bytes(seg)


CASES = [
    ("192.0.2.1", "198.51.100.2", dict(sport=40000, dport=10001, flags="S", options=[("MSS", 1460)]), b""),
    ("10.0.0.1", "10.0.0.2", dict(sport=1, dport=2, flags="PA", seq=0xFFFFFFFF), b"odd"),
    ("2001:db8::1", "2001:db8::2", dict(sport=443, dport=5555, flags="A"), b"x" * 1201),
    ("fe80::1", "ff02::1", dict(sport=7, dport=9, flags="FA", options=[("Timestamp", (1, 2))]), b"\0" * 64),
]


def test_scapy_made_pairs_pass_and_corrupted_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = []
    for src, dst, tcp, payload in CASES:
        seg = scapy_segment(src, dst, payload, **tcp)
        cases.append((src, dst, seg))
        bad = bytearray(seg)
        bad[-1 if payload else 4] ^= 0x40
        cases.append((src, dst, bytes(bad)))
    # numeric, not lexical, order: 10 must come after 9
    cases += [cases[0]] * 4
    write_pairs(tmp_path, cases)
    assert main(["verify-checksum", str(tmp_path)]) == 1
    out = capsys.readouterr().out.split()
    assert out == ["PASS", "FAIL"] * len(CASES) + ["PASS"] * 4
    good = [tmp_path / f"tcp_{k}_{n}.{e}" for n in (0, 2, 4) for k, e in (("addrs", "txt"), ("data", "dat"))]
    assert main(["verify-checksum", *map(str, good)]) == 0
    assert capsys.readouterr().out.split() == ["PASS"] * 3


@pytest.mark.parametrize("addrs, data, needle", [
    ("10.0.0.1", bytes(20), "found 1 field"),
    ("10.0.0.1 fe80::1", bytes(20), "IPv4 but destination is IPv6"),
    ("10.0.0.300 10.0.0.1", bytes(20), "does not appear to be an IPv4 or IPv6 address"),
    ("10.0.0.1 10.0.0.2", bytes(19), "shorter than a TCP header"),
])
def test_ill_formed_input_exits_2_naming_the_file(tmp_path: Path, addrs: str, data: bytes, needle: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text(addrs)
    (tmp_path / "d.dat").write_bytes(data)
    assert main(["verify-checksum", str(tmp_path / "a.txt"), str(tmp_path / "d.dat")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and str(tmp_path) in err and "\n" not in err


def test_missing_files_and_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-checksum", str(tmp_path / "nope.txt"), str(tmp_path / "nope.dat")]) == 2
    assert "nope.txt: cannot read: no such file or directory" in capsys.readouterr().err
    assert main(["verify-checksum", str(tmp_path)]) == 2
    assert "no tcp_addrs_N.txt" in capsys.readouterr().err
    write_pairs(tmp_path, [("10.0.0.1", "10.0.0.2", scapy_segment("10.0.0.1", "10.0.0.2", b"a"))])
    (tmp_path / "tcp_addrs_7.txt").write_text("10.0.0.1 10.0.0.2")
    assert main(["verify-checksum", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "tcp_data_7.dat: missing" in err  # the listing is checked before any pair
    assert main(["verify-checksum", str(tmp_path / "tcp_addrs_0.txt")]) == 2
    assert "pairs or one directory" in capsys.readouterr().err


def test_console_script_exit_codes(tmp_path: Path) -> None:
    write_pairs(tmp_path, [("10.0.0.1", "10.0.0.2", scapy_segment("10.0.0.1", "10.0.0.2", b"a"))])
    exe = Path(sys.executable).with_name("rsockctl")
    r = subprocess.run([str(exe), "verify-checksum", str(tmp_path)], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "PASS\n", "")
    r = subprocess.run([str(exe), "verify-checksum"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
