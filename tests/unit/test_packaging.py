"""Packaging checks that need no build: the systemd units, debian/control and friends, the example
config and the checksum samples.  The real thing (build, lintian, install under a booted systemd)
is packaging/vm/test.sh."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "packaging"
DEB = PKG / "debian"
UNITS = {"rsockd.service": DEB / "rsockd.service", "rsockd@.service": DEB / "rsockd@.service"}
CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"}


def pyproject() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def project_version() -> str:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return str(project["version"])


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order: systemd units repeat keys, so no dict."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit(name: str) -> dict[str, str]:
    """The last value of each Section.Key (what systemd uses for single-valued settings)."""
    return {f"{s}.{k}": v for s, k, v in parse_unit(UNITS[name])}


# --------------------------------------------------------------------------------------------
# systemd units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for name, path in UNITS.items():
        shutil.copy(path, tmp_path / name)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True, text=True, timeout=60,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    # The one thing a build host cannot offer: the installed executable.
    if not Path("/usr/bin/rsockd").exists():
        lines = [x for x in lines if "Command /usr/bin/rsockd is not executable" not in x]
    assert lines == []


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_service_settings(name: str) -> None:
    u = unit(name)
    expect = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.ExecReload": "/bin/kill -HUP $MAINPID",
        "Service.WatchdogSec": "30s",
        "Service.TimeoutStartSec": "120",
        "Service.Restart": "on-failure",
        "Service.RuntimeDirectoryMode": "0750",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.PrivateTmp": "yes",
        "Service.NoNewPrivileges": "yes",
        "Unit.After": "network-online.target",
        "Unit.Wants": "network-online.target",
        "Install.WantedBy": "multi-user.target",
    }
    assert {k: u.get(k) for k in expect} == expect
    assert {"@system-service", "bpf", "perf_event_open"} <= set(u["Service.SystemCallFilter"].split())
    assert set(u["Service.CapabilityBoundingSet"].split()) == CAPS
    assert "/sys/fs/bpf" in u["Service.ReadWritePaths"].lstrip("-").split()
    # ProtectKernelModules hides /lib/modules (bcc's kernel headers); ProtectKernelTunables makes
    # /sys/fs/bpf read-only whatever ReadWritePaths says (seen in packaging/vm).
    assert "Service.ProtectKernelModules" not in u
    assert "Service.ProtectKernelTunables" not in u


def test_unit_exec_start_and_runtime_directory_per_instance() -> None:
    plain, template = unit("rsockd.service"), unit("rsockd@.service")
    assert plain["Service.ExecStart"] == "/usr/bin/rsockd --config /etc/rsockd/rsockd.toml"
    assert template["Service.ExecStart"] == "/usr/bin/rsockd --config /etc/rsockd/%i.toml --instance %i"
    # Not plain "rsockd": units sharing a RuntimeDirectory delete it for each other on stop.
    assert plain["Service.RuntimeDirectory"] == "rsockd/rsockd"
    assert template["Service.RuntimeDirectory"] == "rsockd/%i"


def test_units_differ_only_where_they_must() -> None:
    differ = {"Unit.Description", "Service.ExecStart", "Service.RuntimeDirectory"}
    plain, template = parse_unit(UNITS["rsockd.service"]), parse_unit(UNITS["rsockd@.service"])
    same = [(s, k, v) for s, k, v in plain if f"{s}.{k}" not in differ]
    assert same == [(s, k, v) for s, k, v in template if f"{s}.{k}" not in differ]


@pytest.mark.parametrize("name", list(UNITS))
def test_every_capability_is_justified(name: str) -> None:
    text = UNITS[name].read_text()
    for cap in CAPS:
        assert re.search(rf"^# {cap}\s+\S", text, re.M), f"{name}: no comment saying why {cap}"


# --------------------------------------------------------------------------------------------
# debian/


def control_fields(paragraph: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in paragraph.splitlines():
        if line.startswith((" ", "\t")):
            fields[key] += "\n" + line.strip()
        elif line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def relations(value: str) -> list[str]:
    return [r.strip() for r in value.replace("\n", " ").split(",") if r.strip()]


def test_control() -> None:
    source, binary = (control_fields(p) for p in (DEB / "control").read_text().split("\n\n") if p.strip())
    assert source["Source"] == binary["Package"] == "rsockd"
    assert binary["Architecture"] == "any"  # the C extension (dataplane/_datapath.c)
    assert relations(source["Build-Depends"]) == [
        "debhelper-compat (= 13)", "dh-python", "pybuild-plugin-pyproject", "python3-all-dev", "python3-setuptools",
    ]
    assert relations(binary["Depends"]) == [
        "${python3:Depends}", "${shlibs:Depends}", "${misc:Depends}", "python3-bpfcc", "python3-nftables",
        "python3-pyroute2", "python3-sdnotify", "nftables", "iproute2",
    ]
    assert relations(binary["Recommends"])[0].startswith("linux-headers-amd64 |")


def test_rules_install_units_disabled_and_stopped() -> None:
    rules = (DEB / "rules").read_text()
    assert re.search(r"^\tdh \$@ --with python3 --buildsystem=pybuild$", rules, re.M)
    assert re.search(r"^\tdh_installsystemd .*--no-enable --no-start", rules, re.M)
    # The example config is the conffile /etc/rsockd/rsockd.toml.
    assert "packaging/rsockd.toml.example debian/rsockd/etc/rsockd/rsockd.toml" in rules


def test_changelog_version_is_pyproject_version() -> None:
    first = (DEB / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"rsockd ({project_version()}) ")


def test_source_format_and_copyright() -> None:
    assert (DEB / "source" / "format").read_text().strip() == "3.0 (native)"
    copyright_ = (DEB / "copyright").read_text()
    assert copyright_.startswith("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
    assert "License: MIT" in copyright_


def test_maintainer_scripts_keep_debhelper_token() -> None:
    for script in ("rsockd.postinst", "rsockd.prerm"):
        text = (DEB / script).read_text()
        assert text.startswith("#!/bin/sh\nset -e\n") and "#DEBHELPER#" in text


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in PKG.rglob("*.sh")))
def test_shell_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True, timeout=30)


# --------------------------------------------------------------------------------------------
# The example config


def example_keys() -> list[str]:
    text = (PKG / "rsockd.toml.example").read_text()
    return re.findall(r"^#?([a-z_]+) = ", text, re.M)


def test_example_config_is_all_comments_and_shows_every_key() -> None:
    path = PKG / "rsockd.toml.example"
    assert tomllib.loads(path.read_text()) == {}, "the shipped example must set nothing"
    from rsockd.service.config import KEYS

    assert set(example_keys()) == set(KEYS)


@pytest.mark.parametrize("role", ["server", "client"])
def test_example_config_role_block_loads(role: str, tmp_path: Path) -> None:
    """Uncommenting one role's block gives a configuration rsockd accepts."""
    config = pytest.importorskip("rsockd.service.config")
    out, on = [], False
    for line in (PKG / "rsockd.toml.example").read_text().splitlines():
        if line.startswith("# ---"):
            on = line.lower().startswith(f"# --- {role}:")
        out.append(line[1:] if on and re.match(r"#\w+ = ", line) else line)
    path = tmp_path / f"{role}.toml"
    path.write_text("\n".join(out) + "\n")
    cfg = config.load(["-f", str(path)])
    assert cfg.role == role


# --------------------------------------------------------------------------------------------
# The checksum samples (packaging/vm/checks.sh and the Homebrew test run rsockctl on them)


def samples() -> list[tuple[str, bytes, str]]:
    lines = (PKG / "checksum-samples.txt").read_text().splitlines()
    rows = [line.split() for line in lines if line and not line.startswith("#")]
    return [(addrs, bytes.fromhex(data), expected) for addrs, data, expected in rows]


def test_checksum_samples_expectations_are_right() -> None:
    from rsockd.core.packet import tcp_checksum_ok

    rows = samples()
    assert {e for _, _, e in rows} == {"PASS", "FAIL"}
    for addrs, data, expected in rows:
        src, dst = addrs.split(",")
        assert tcp_checksum_ok(src, dst, data) == (expected == "PASS"), addrs


def test_checksum_samples_through_rsockctl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctl = pytest.importorskip("rsockd.cli.ctl")
    rows = samples()
    for n, (addrs, data, _) in enumerate(rows, 1):
        (tmp_path / f"tcp_addrs_{n}.txt").write_text(addrs.replace(",", " ") + "\n")
        (tmp_path / f"tcp_data_{n}.dat").write_bytes(data)
    assert ctl.main(["verify-checksum", str(tmp_path)]) == 1
    assert capsys.readouterr().out.split() == [e for _, _, e in rows]
