"""bpf/rsockd.h and its Python mirror (rsockd/steer/bpfsys.py) agree: gcc compiles the header
and prints every size, offset and constant; the test compares them with the ctypes side.

The same check covers the kernel uapi structs bpfsys declares by hand (bpf_prog_info,
bpf_map_info), against the system's <linux/bpf.h>.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rsockd.steer import STEER_COUNTERS, bpfsys

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def run_c(tmp_path: Path, includes: list[str], body: list[str]) -> dict[str, int]:
    """Compile and run a C program whose body prints ``name value`` lines; return them."""
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n"
        + "".join(f"#include {inc}\n" for inc in includes)
        + "int main(void) {\n"
        + "".join(f"    {line}\n" for line in body)
        + "    return 0;\n}\n"
    )
    exe = tmp_path / "layout"
    cc = subprocess.run(["gcc", "-Wall", "-Werror", f"-I{BPF_DIR}", "-o", str(exe), str(src)],
                        capture_output=True, text=True, check=False)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def pr(name: str, expr: str) -> str:
    return f'printf("%s %lld\\n", "{name}", (long long)({expr}));'


def struct_lines(c_name: str, py: type[ctypes.Structure]) -> list[str]:
    lines = [pr(f"sizeof.{c_name}", f"sizeof(struct {c_name})")]
    for field, *_ in py._fields_:
        lines.append(pr(f"offsetof.{c_name}.{field}", f"offsetof(struct {c_name}, {field})"))
        lines.append(pr(f"sizeof.{c_name}.{field}", f"sizeof(((struct {c_name} *)0)->{field})"))
    return lines


def struct_expect(c_name: str, py: type[ctypes.Structure]) -> dict[str, int]:
    out = {f"sizeof.{c_name}": ctypes.sizeof(py)}
    for field, *_ in py._fields_:
        desc = getattr(py, field)
        out[f"offsetof.{c_name}.{field}"] = desc.offset
        out[f"sizeof.{c_name}.{field}"] = desc.size
    return out


def test_rsockd_h_matches_python(tmp_path: Path) -> None:
    body = struct_lines("rsockd_config", bpfsys.RsockdConfig) + struct_lines("rsockd_addr6", bpfsys.RsockdAddr6)
    body += struct_lines("rsockd_syntag", bpfsys.RsockdSyntag) + struct_lines("rsockd_conn", bpfsys.RsockdConn)
    body += struct_lines("rsockd_seen_key", bpfsys.RsockdSeenKey)
    body += [
        pr("PORT_SERVER", "RSOCKD_PORT_SERVER"),
        pr("PORT_LOCAL", "RSOCKD_PORT_LOCAL"),
        pr("PORT_PEER", "RSOCKD_PORT_PEER"),
        pr("PORTS_MAX", "RSOCKD_PORTS_MAX"),
        pr("PEERS_MAX", "RSOCKD_PEERS_MAX"),
        pr("CONNS_MAX", "RSOCKD_CONNS_MAX"),
        pr("STAT_COUNT", "RSOCKD_STAT_COUNT"),
    ]
    # Every counter name must exist in the enum, at its STEER_COUNTERS position.
    body += [pr(f"stat.{name}", f"RSOCKD_STAT_{name.upper()}") for name in STEER_COUNTERS]
    got = run_c(tmp_path, ['"rsockd.h"'], body)

    want = struct_expect("rsockd_config", bpfsys.RsockdConfig) | struct_expect("rsockd_addr6", bpfsys.RsockdAddr6)
    want |= struct_expect("rsockd_syntag", bpfsys.RsockdSyntag) | struct_expect("rsockd_conn", bpfsys.RsockdConn)
    want |= struct_expect("rsockd_seen_key", bpfsys.RsockdSeenKey)
    want |= {
        "PORT_SERVER": bpfsys.PORT_SERVER,
        "PORT_LOCAL": bpfsys.PORT_LOCAL,
        "PORT_PEER": bpfsys.PORT_PEER,
        "PORTS_MAX": bpfsys.PORTS_MAX,
        "PEERS_MAX": bpfsys.PEERS_MAX,
        "CONNS_MAX": bpfsys.CONNS_MAX,
        "STAT_COUNT": bpfsys.STAT_COUNT,
    }
    want |= {f"stat.{name}": bpfsys.STAT_INDEX[name] for name in STEER_COUNTERS}
    assert got == want
    assert list(bpfsys.STAT_INDEX) == list(STEER_COUNTERS)
    assert sorted(bpfsys.STAT_INDEX.values()) == list(range(len(STEER_COUNTERS)))


def test_rsockd_h_map_sizes_match_python(tmp_path: Path) -> None:
    """PinnedMaps.check's expectations are the header's key/value types."""
    got = run_c(tmp_path, ["<linux/types.h>", '"rsockd.h"'], [
        pr("config", "sizeof(struct rsockd_config)"),
        pr("peers6", "sizeof(struct rsockd_addr6)"),
        pr("syntag", "sizeof(struct rsockd_syntag)"),
        pr("conns", "sizeof(struct rsockd_conn)"),
        pr("seen", "sizeof(struct rsockd_seen_key)"),
        pr("u32", "sizeof(__u32)"),
        pr("u64", "sizeof(__u64)"),
    ])
    assert got == {"config": 32, "peers6": 16, "syntag": 24, "conns": 36, "seen": 8, "u32": 4, "u64": 8}


def test_conn_key_is_the_struct_as_the_wire_has_it() -> None:
    """A conns key: the mapped addresses, then the ports in network order (rsockd.h)."""
    key = bpfsys.conn_key("192.0.2.1", "198.51.100.2", 10001, 40000)
    c = bpfsys.RsockdConn.from_buffer_copy(key)
    assert bytes(c.saddr) == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
    assert bytes(c.daddr)[12:] == bytes([198, 51, 100, 2])
    assert key[32:] == (10001).to_bytes(2, "big") + (40000).to_bytes(2, "big")
    assert bpfsys.conn_key("2001:db8::1", "2001:db8::2", 1, 2)[:16] == bytes.fromhex("20010db8") + bytes(11) + b"\x01"


def test_counter_indices_only_grow_at_the_end() -> None:
    """A stats index keeps its meaning across versions: new counters are appended."""
    assert STEER_COUNTERS[:9] == ("steered_v4", "steered_v6", "passed_malformed", "passed_fragment",
                                  "passed_ip_options", "guard_dropped", "syn_limited", "passed_transit",
                                  "passed_probe")


def test_instance_tag_stays_where_older_versions_put_it(tmp_path: Path) -> None:
    """The owner of a program is read from its config map at a fixed offset, whatever the
    config's size (cleanup_stale must recognise a program an older rsockd attached)."""
    got = run_c(tmp_path, ['"rsockd.h"'], [
        pr("tag_offset", "offsetof(struct rsockd_config, instance_tag)"),
        pr("syn_rate_offset", "offsetof(struct rsockd_config, syn_rate)"),
    ])
    assert got == {"tag_offset": 8, "syn_rate_offset": 16}
    assert bpfsys.CONFIG_TAG_END == 16


def test_config_bytes_round_trip() -> None:
    cfg = bpfsys.RsockdConfig(mark=0x72736B64, instance_tag=0x0102030405060708, syn_rate=2000, syn_burst=200,
                              syn_cpus=2)
    raw = bytes(cfg)
    back = bpfsys.RsockdConfig.from_buffer_copy(raw)
    assert (back.mark, back.instance_tag, back.syn_rate, back.syn_burst, back.syn_cpus, back.reserved) == (
        0x72736B64, 0x0102030405060708, 2000, 200, 2, 0)
    assert int.from_bytes(raw[8:16], sys.byteorder) == 0x0102030405060708


@pytest.mark.skipif(not Path("/usr/include/linux/bpf.h").exists(), reason="no <linux/bpf.h> (linux-libc-dev)")
def test_uapi_info_structs_match_bpfsys(tmp_path: Path) -> None:
    body = struct_lines("bpf_prog_info", bpfsys.BpfProgInfoC) + struct_lines("bpf_map_info", bpfsys.BpfMapInfoC)
    got = run_c(tmp_path, ["<linux/bpf.h>"], body)
    want = struct_expect("bpf_prog_info", bpfsys.BpfProgInfoC) | struct_expect("bpf_map_info", bpfsys.BpfMapInfoC)
    # bpfsys declares only the head of each struct: compare the fields, not the whole size
    want = {k: v for k, v in want.items() if k.count(".") == 2}
    got = {k: v for k, v in got.items() if k in want}
    assert got == want
