"""rsockd.service.config: rsock's flags, the TOML file, and one-line errors (exit code 2).  Pure."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsockd import __version__
from rsockd.errors import ConfigError
from rsockd.service import config as cfg
from rsockd.service.config import (
    KEYS,
    Config,
    Invocation,
    example_toml,
    format_ports,
    load,
    load_invocation,
    parse_address,
    parse_hostport,
    parse_ports,
)

CLI = "command line"
SERVER = ["--role=server", "--taddr=127.0.0.1:8388"]
CLIENT = ["--role=client", "-t", "192.0.2.7"]


@pytest.fixture(autouse=True, scope="module")
def _no_system_config() -> Iterator[None]:
    """Never read the machine's /etc/rsockd/rsockd.toml (module scope: Hypothesis allows it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfg, "DEFAULT_CONFIG_PATH", "/nonexistent/rsockd/rsockd.toml")
        yield


def _load(argv: Sequence[str], environ: dict[str, str] | None = None) -> Config:
    return load(argv, environ={} if environ is None else environ)


def _write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _error(argv: Sequence[str], environ: dict[str, str] | None = None) -> str:
    """The message of the ConfigError loading ``argv`` raises; checks it is one line, exit 2."""
    with pytest.raises(ConfigError) as info:
        _load(argv, environ)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert len(message.splitlines()) == 1 and message == message.strip(), message
    return message


def _cli_exit_code(argv: Sequence[str]) -> int:
    """What the entry point (rsockd.service.daemon:main) will do with a ConfigError."""
    try:
        load(argv, environ={})
    except ConfigError as err:
        print(f"rsockd: {err}", file=sys.stderr)
        return err.exit_code
    except SystemExit as done:  # --help, --version
        return int(done.code or 0)
    return 0


# ---------------------------------------------------------------------------------------------
# rsock's flags, every form


def test_defaults_server() -> None:
    c = _load(SERVER)
    assert c.role == "server"
    assert c.target == ("127.0.0.1", 8388)
    assert c.server is None and c.listen is None
    assert c.ports == tuple(range(10001, 10011))
    assert c.dev == () and c.local_ip is None and c.key is None
    assert (c.type, c.duration, c.backend, c.xdp_mode) == ("tcp", 30.0, "auto", "auto")
    assert (c.instance, c.log_level, c.runtime_dir, c.config_path) == ("rsockd", "info", "/run/rsockd", None)
    assert (c.keepalive, c.dead_timeout, c.syn_timeout, c.backlog) == (5.0, 20.0, 5.0, 256)
    assert (c.syn_rate, c.syn_burst) == (2000, 200)
    assert (c.reconnect_min, c.reconnect_max) == (0.5, 30.0)
    assert (c.max_sessions, c.max_flows, c.max_conns_per_client) == (1024, 4096, 64)
    assert (c.hello_skew, c.mark, c.mtu, c.workers) == (120.0, 0x72736B64, None, 1)


def test_defaults_client_listen() -> None:
    c = _load(CLIENT)
    assert c.role == "client"
    assert c.server == "192.0.2.7" and c.target is None
    assert c.listen == ("127.0.0.1", 30000)


@pytest.mark.parametrize(("argv", "field", "expected"), [
    (["--dev=eth0"], "dev", ("eth0",)),
    (["--dev", "eth0"], "dev", ("eth0",)),
    (["-d", "eth0"], "dev", ("eth0",)),
    (["-deth0"], "dev", ("eth0",)),
    (["-d", "eth0,eth1", "-d", "eth2", "--dev=eth1"], "dev", ("eth0", "eth1", "eth2")),
    (["--dev= eth0 , eth1 "], "dev", ("eth0", "eth1")),
    (["--lcapIp=10.0.0.1"], "local_ip", "10.0.0.1"),
    (["--lcapIp", "10.0.0.1"], "local_ip", "10.0.0.1"),
    (["--local-ip=2001:DB8::0:1"], "local_ip", "2001:db8::1"),
    (["--ports=80,443,10001-10010"], "ports", (80, 443, *range(10001, 10011))),
    (["-p", "10001-10010"], "ports", tuple(range(10001, 10011))),
    (["-p", "10001,10010"], "ports", (10001, 10010)),
    (["--ports", " 443 , 80 , 80-81 "], "ports", (80, 81, 443)),
    (["--hash=abc"], "key", "abc"),
    (["--hash", "abc"], "key", "abc"),
    (["--key=s3cret"], "key", "s3cret"),
    (["--type=all"], "type", "all"),
    (["--type", "udp"], "type", "udp"),
    (["--type=TCP"], "type", "tcp"),
    (["--duration=60"], "duration", 60.0),
    (["--duration", "1.5"], "duration", 1.5),
    (["--backend=nft"], "backend", "nft"),
    (["--backend=bpfdev"], "backend", "bpfdev"),
    (["--xdp-mode=skb"], "xdp_mode", "skb"),
    (["--instance=east-1"], "instance", "east-1"),
    (["--log-level=debug"], "log_level", "debug"),
    (["--keepalive=2"], "keepalive", 2.0),
    (["--dead-timeout=9"], "dead_timeout", 9.0),
    (["--syn-timeout=3"], "syn_timeout", 3.0),
    (["--backlog=10"], "backlog", 10),
    (["--syn-rate=500"], "syn_rate", 500),
    (["--syn-rate", "0"], "syn_rate", 0),
    (["--syn-burst=1"], "syn_burst", 1),
    (["--syn-burst", "4294967295"], "syn_burst", 0xFFFFFFFF),
    (["--max-sessions=7"], "max_sessions", 7),
    (["--max-flows=8"], "max_flows", 8),
    (["--max-conns-per-client=9"], "max_conns_per_client", 9),
    (["--hello-skew=30"], "hello_skew", 30.0),
    (["--mark=0x10"], "mark", 16),
    (["--mark", "4294967295"], "mark", 0xFFFFFFFF),
    (["--mtu=1400"], "mtu", 1400),
    (["--runtime-dir=/tmp/rs/"], "runtime_dir", "/tmp/rs"),
    (["--workers=1"], "workers", 1),
    (["--workers=4"], "workers", 4),
])
def test_server_flags(argv: list[str], field: str, expected: object) -> None:
    assert getattr(_load(SERVER + argv), field) == expected


@pytest.mark.parametrize(("argv", "field", "expected"), [
    (["--taddr=1.2.3.4:9999"], "target", ("1.2.3.4", 9999)),
    (["-t", "1.2.3.4:9999"], "target", ("1.2.3.4", 9999)),
    (["-t", "[::1]:9999"], "target", ("::1", 9999)),
    (["--taddr=[2001:db8:0::5]:53"], "target", ("2001:db8::5", 53)),
    (["-t", "backend.example:8388"], "target", ("backend.example", 8388)),
    (["--target=10.1.1.1:5"], "target", ("10.1.1.1", 5)),
])
def test_server_taddr(argv: list[str], field: str, expected: object) -> None:
    assert getattr(_load(["--role", "server", *argv]), field) == expected


@pytest.mark.parametrize(("argv", "field", "expected"), [
    (["-t", "1.2.3.4"], "server", "1.2.3.4"),
    (["--taddr=1.2.3.4"], "server", "1.2.3.4"),
    (["--taddr", "2001:db8::9"], "server", "2001:db8::9"),
    (["--taddr=[2001:db8::9]"], "server", "2001:db8::9"),
    (["-t", "vpn.example.org"], "server", "vpn.example.org"),
    (["--server=1.2.3.4"], "server", "1.2.3.4"),
    (["-t", "1.2.3.4", "--ludp=127.0.0.1:30000"], "listen", ("127.0.0.1", 30000)),
    (["-t", "1.2.3.4", "--ludp", "0.0.0.0:4000"], "listen", ("0.0.0.0", 4000)),
    (["-t", "1.2.3.4", "-l", "[::1]:30001"], "listen", ("::1", 30001)),
    (["-t", "1.2.3.4", "--listen=30002"], "listen", ("127.0.0.1", 30002)),
    (["-t", "1.2.3.4", "--listen=:30003"], "listen", ("127.0.0.1", 30003)),
    (["-t", "1.2.3.4", "--reconnect-min=1", "--reconnect-max=1"], "reconnect_max", 1.0),
])
def test_client_flags(argv: list[str], field: str, expected: object) -> None:
    assert getattr(_load(["--role=client", *argv]), field) == expected


def test_every_key_is_a_flag() -> None:
    parser = cfg._build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    for key in KEYS:
        assert "--" + key.replace("_", "-") in flags, key
    assert {"-d", "--dev", "-t", "--taddr", "-l", "--ludp", "-p", "--ports", "--hash", "--type",
            "--duration", "--lcapIp", "-f", "--config", "--role", "--instance"} <= flags
    assert set(KEYS) | {"config_path"} == {f.name for f in dataclasses.fields(Config)}


def test_config_file_flag_forms(tmp_path: Path) -> None:
    path = _write(tmp_path, "west.toml", 'role = "server"\ntarget = "10.0.0.2:53"\n')
    for argv in (["-f", path], [f"--config={path}"], ["--config", path]):
        c = _load(argv)
        assert (c.role, c.target, c.instance, c.config_path) == ("server", ("10.0.0.2", 53), "west", path)


def test_transports_and_socket_path() -> None:
    assert _load(SERVER).transports == ("tcp",)
    assert _load([*SERVER, "--type=udp"]).transports == ("udp",)
    assert _load([*SERVER, "--type=all"]).transports == ("tcp", "udp")
    c = _load([*SERVER, "--runtime-dir=/run/x", "--instance=east"])
    assert c.control_socket_path == "/run/x/east/control.sock"


def test_config_is_frozen_and_hides_the_key() -> None:
    c = _load([*SERVER, "--hash=topsecret"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.role = "client"  # type: ignore[misc]
    assert "topsecret" not in repr(c)


def test_check_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_invocation(SERVER, environ={}) == Invocation(_load(SERVER), False)
    assert load_invocation([*SERVER, "--check"], environ={}).check is True
    with pytest.raises(SystemExit) as done:
        load(["--version"], environ={})
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"rsockd {__version__}"


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli_exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rsockd") and "--lcapIp" in out and "--max-conns-per-client" in out


# ---------------------------------------------------------------------------------------------
# The file, and the command line over it


def test_cli_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "rsockd.toml", """\
        role = "server"
        target = "10.0.0.2:53"
        dev = ["eth0", "eth1"]
        ports = [80, "443", "10001-10003"]
        duration = 10
        type = "udp"
        key = "from-file"
        mark = "0x20"
        """)
    c = _load(["-f", path])
    assert c.dev == ("eth0", "eth1")
    assert c.ports == (80, 443, 10001, 10002, 10003)
    assert (c.duration, c.type, c.key, c.mark) == (10.0, "udp", "from-file", 0x20)
    c = _load(["-f", path, "--duration=60", "-d", "eth9", "--hash=cli", "-p", "5", "--taddr=1.1.1.1:9"])
    assert c.dev == ("eth9",)  # replaced, not extended
    assert (c.duration, c.key, c.ports, c.target, c.type) == (60.0, "cli", (5,), ("1.1.1.1", 9), "udp")


def test_taddr_follows_the_role_from_the_file(tmp_path: Path) -> None:
    client = _write(tmp_path, "c.toml", 'role = "client"\n')
    assert _load(["-f", client, "-t", "1.2.3.4"]).server == "1.2.3.4"
    server = _write(tmp_path, "s.toml", 'role = "server"\n')
    assert _load(["-f", server, "-t", "1.2.3.4:5"]).target == ("1.2.3.4", 5)
    # The command line's role wins over the file's, and -t follows it.
    assert _load(["-f", server, "--role=client", "-t", "1.2.3.4"]).server == "1.2.3.4"


def test_file_accepts_numbers_as_text_and_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "n.toml", """\
        role = "server"
        target = "127.0.0.1:8388"
        duration = "45"
        keepalive = 2.5
        backlog = "12"
        mark = 1234
        ports = 443
        dev = "eth0,eth1"
        mtu = 1280
        """)
    c = _load(["-f", path])
    assert (c.duration, c.keepalive, c.backlog, c.mark, c.ports, c.dev, c.mtu) == (
        45.0, 2.5, 12, 1234, (443,), ("eth0", "eth1"), 1280)


def test_instance_from_file_stem(tmp_path: Path) -> None:
    body = 'role = "server"\ntarget = "127.0.0.1:8388"\n'
    east = _write(tmp_path, "east.toml", body)
    assert _load(["-f", east]).instance == "east"
    assert _load(["-f", east, "--instance=other"]).instance == "other"
    named = _write(tmp_path, "west.toml", body + 'instance = "named"\n')
    assert _load(["-f", named]).instance == "named"
    assert _load(SERVER).instance == "rsockd"
    bad = _write(tmp_path, "my conf.toml", body)
    message = _error(["-f", bad])
    assert message.startswith(f"{bad}: instance: ") and "set instance" in message
    assert _load(["-f", bad, "--instance=ok"]).instance == "ok"


def test_default_file_only_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = _write(tmp_path, "rsockd.toml", 'role = "server"\ntarget = "127.0.0.1:9"\n')
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", default)
    c = _load([])
    assert (c.config_path, c.instance, c.target) == (default, "rsockd", ("127.0.0.1", 9))
    other = _write(tmp_path, "east.toml", 'role = "client"\nserver = "1.2.3.4"\n')
    assert _load(["-f", other]).role == "client"  # -f given: the default file is not read
    assert _load([], {"RSOCKD_CONFIG": other}).instance == "east"
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert _error([]) == "command line: role: missing (server or client)"


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the source and the key


@pytest.mark.parametrize(("argv", "key", "fragment"), [
    (["--role=both"], "role", '"both" is not one of server, client'),
    (["--role=server"], "target", "missing"),
    (["--role=client"], "server", "missing"),
    ([*SERVER, "--ports=10010-10001"], "ports", '"10010-10001" is an empty range'),
    ([*SERVER, "--ports=0-5"], "ports", "out of range"),
    ([*SERVER, "--ports=65536"], "ports", "out of range"),
    ([*SERVER, "--ports=abc"], "ports", "not a port or range"),
    ([*SERVER, "--ports=1-2-3"], "ports", "not a port or range"),
    ([*SERVER, "--ports="], "ports", "empty"),
    ([*SERVER, "--ports=80,,443"], "ports", "empty item"),
    ([*SERVER, "--ports=80,"], "ports", "empty item"),
    ([*SERVER, "--ports=" + "9" * 5000], "ports", "out of range"),
    ([*SERVER, "--keepalive=20"], "keepalive", "must be less than dead_timeout (20)"),
    ([*SERVER, "--dead-timeout=5"], "dead_timeout", "must be more than keepalive (5)"),
    ([*CLIENT, "--reconnect-min=40"], "reconnect_min", "at most reconnect_max"),
    ([*CLIENT, "--reconnect-max=0.1"], "reconnect_max", "at least reconnect_min"),
    ([*SERVER, "--duration=0"], "duration", "must be positive"),
    ([*SERVER, "--duration=-1"], "duration", "must be positive"),
    ([*SERVER, "--duration=abc"], "duration", 'expected a number, got "abc"'),
    ([*SERVER, "--duration=nan"], "duration", "expected a number"),
    ([*SERVER, "--duration=inf"], "duration", "expected a number"),
    ([*SERVER, "--duration=1e300"], "duration", "too large"),
    ([*SERVER, "--syn-timeout=0"], "syn_timeout", "must be positive"),
    ([*SERVER, "--hello-skew=-3"], "hello_skew", "must be positive"),
    ([*SERVER, "--keepalive=0"], "keepalive", "must be positive"),
    ([*SERVER, "--backlog=0"], "backlog", "out of range"),
    ([*SERVER, "--backlog=1.5"], "backlog", "expected an integer"),
    ([*SERVER, "--max-sessions=0"], "max_sessions", "out of range"),
    ([*SERVER, "--max-flows=-4"], "max_flows", "out of range"),
    ([*SERVER, "--max-conns-per-client=0"], "max_conns_per_client", "out of range"),
    ([*SERVER, "--max-conns-per-client=70000"], "max_conns_per_client", "16 bits"),
    ([*SERVER, "--workers=0"], "workers", "out of range"),
    ([*SERVER, "--workers=11"], "workers", "11 workers for 10 tunnel ports"),
    ([*SERVER, "--ports=10001-10002", "--workers=3"], "workers", "at most one worker per port"),
    ([*SERVER, "--workers=65"], "workers", "out of range (1..64)"),
    ([*CLIENT, "--workers=2"], "workers", "only a server runs several workers"),
    ([*SERVER, "--syn-rate=-1"], "syn_rate", "out of range (0..4294967295, 0 for no limit)"),
    ([*SERVER, "--syn-rate=4294967296"], "syn_rate", "out of range"),
    ([*SERVER, "--syn-rate=fast"], "syn_rate", "expected an integer"),
    ([*SERVER, "--syn-burst=0"], "syn_burst", "out of range (1..4294967295)"),
    ([*SERVER, "--mark=0"], "mark", "non-zero"),
    ([*SERVER, "--mark=-1"], "mark", "expected an integer or 0x"),
    ([*SERVER, "--mark=0x100000000"], "mark", "out of range"),
    ([*SERVER, "--mark=4294967296"], "mark", "out of range"),
    ([*SERVER, "--mark=0xzz"], "mark", "expected an integer or 0x"),
    ([*SERVER, "--mtu=100"], "mtu", "out of range"),
    ([*SERVER, "--mtu=big"], "mtu", "expected an integer"),
    ([*SERVER, "--type=quic"], "type", "not one of tcp, udp, all"),
    ([*SERVER, "--backend=bpf"], "backend", "not one of auto, xdp, nft"),
    ([*SERVER, "--xdp-mode=generic"], "xdp_mode", "not one of auto, native, skb"),
    ([*SERVER, "--log-level=trace"], "log_level", "not one of debug, info, warning, error"),
    ([*SERVER, "--instance=.hidden"], "instance", "not a valid name"),
    ([*SERVER, "--instance=a/b"], "instance", "not a valid name"),
    ([*SERVER, "--instance=" + "x" * 33], "instance", "not a valid name"),
    ([*SERVER, "--instance="], "instance", "not a valid name"),
    ([*SERVER, "--runtime-dir=run/rsockd"], "runtime_dir", "not an absolute path"),
    ([*SERVER, "--runtime-dir=/" + "r" * 100], "runtime_dir", "Unix socket path"),
    ([*SERVER, "--lcapIp=eth0"], "local_ip", "not an IPv4 or IPv6 address"),
    ([*SERVER, "--dev="], "dev", "empty interface name"),
    ([*SERVER, "-d", "a/b"], "dev", "not an interface name"),
    ([*SERVER, "-d", "x" * 16], "dev", "not an interface name"),
    ([*SERVER, "--key="], "key", "empty"),
    (["--role=server", "-t", "1.2.3.4"], "target", "expected host:port"),
    (["--role=server", "-t", "[::1"], "target", "expected host:port"),
    (["--role=server", "-t", "[1.2.3.4]:80"], "target", "not an IPv6 address"),
    (["--role=server", "-t", "::1:80"], "target", "brackets"),
    (["--role=server", "-t", ":80"], "target", "missing host"),
    (["--role=server", "-t", "host:0"], "target", "out of range"),
    (["--role=server", "-t", "host:99999"], "target", "out of range"),
    (["--role=server", "-t", "host:http"], "target", "not a port number"),
    (["--role=server", "-t", "bad host!:80"], "target", "not an IP address or host name"),
    (["--role=server", "-t", "1.2.3.999:80"], "target", "not an IP address or host name"),
    (["--role=server", "-t", "127.0.0.1:10001"], "target", "deliver to itself"),
    (["--role=client", "-t", "1.2.3.4:80"], "server", "without a port"),
    (["--role=client", "-t", "[::1]:80"], "server", "without a port"),
    (["--role=client", "-t", "1.2.3.999"], "server", "not an IP address or host name"),
    ([*CLIENT, "-l", "1.2.3.4:abc"], "listen", "not a port number"),
    ([*CLIENT, "-l", "nonsense"], "listen", "expected host:port"),
    ([*SERVER, "-l", "127.0.0.1:30000"], "listen", "only for a client"),
    ([*SERVER, "--server=1.2.3.4"], "server", "only for a client"),
    ([*CLIENT, "--target=1.2.3.4:5"], "target", "only for a server"),
    (["--role=server", "-t", "1.1.1.1:1", "--target=1.1.1.1:2"], "target", "given twice"),
    ([*SERVER, "--durtion=5"], "--durtion", "unknown option (did you mean --duration?)"),
    ([*SERVER, "--dur=5"], "--dur", "unknown option"),  # no abbreviations
    ([*SERVER, "--lcapip=1.2.3.4"], "--lcapip", "did you mean --lcapIp?"),
    ([*SERVER, "--duration"], "duration", "expected one argument"),
    ([*SERVER, "-d"], "dev", "expected one argument"),
    ([*SERVER, "-t"], "-t/--taddr", "expected one argument"),
    (["-f", ""], "config", "empty file name"),
    ([*SERVER, "--duration=1\n2"], "duration", 'got "1\\n2"'),
])
def test_cli_errors(argv: list[str], key: str, fragment: str) -> None:
    message = _error(argv)
    assert message.startswith(f"{CLI}: {key}: "), message
    assert fragment in message, message


def test_cli_error_exact_messages() -> None:
    assert _error([]) == "command line: role: missing (server or client)"
    assert _error([*SERVER, "--ports=10010-10001"]) == 'command line: ports: "10010-10001" is an empty range'
    assert _error([*SERVER, "stray"]).startswith('command line: unexpected argument "stray"')


def test_errors_stay_one_line_for_hostile_values() -> None:
    for value in ("a\u2028b", "a\x85b", "a\rb", "x" * 10_000, "\x1b[31mred"):
        for flag in ("--duration", "--ports", "--instance", "--type", "-d", "-t"):
            message = _error([*SERVER, f"{flag}={value}"])
            assert len(message) < 400 and "\x1b" not in message


@pytest.mark.parametrize(("body", "key", "fragment"), [
    ('duration = "abc"', "duration", 'expected a number, got "abc"'),
    ("duration = true", "duration", "expected a number, got true"),
    ("duration = [1]", "duration", "expected a number, got a list"),
    ('ports = "10010-10001"', "ports", '"10010-10001" is an empty range'),
    ('ports = [80, "10010-10001"]', "ports", '"10010-10001" is an empty range'),
    ("ports = [80, true]", "ports", "got true"),
    ("ports = []", "ports", "empty list"),
    ("ports = 70000", "ports", "out of range"),
    ("key = 123", "key", "expected a string, got 123"),
    ("dev = 5", "dev", "expected a string, got 5"),
    ("dev = []", "dev", "empty list"),
    ("backlog = 2.5", "backlog", "expected an integer, got 2.5"),
    ("backlog = true", "backlog", "expected an integer, got true"),
    ("syn_rate = 1.5e3", "syn_rate", "expected an integer, got 1500.0"),
    ("syn_burst = -3", "syn_burst", "out of range"),
    ('mark = "0x"', "mark", "expected an integer or 0x"),
    ("mark = 0", "mark", "non-zero"),
    ("mark = 1979-05-27", "mark", "got a date/time"),
    ('type = "both"', "type", "not one of tcp, udp, all"),
    ("keepalive = 25", "keepalive", "must be less than dead_timeout"),
    ("duraton = 5", "duraton", "unknown key (did you mean duration?)"),
    ("dead-timeout = 5", "dead-timeout", "did you mean dead_timeout?"),
    ("taddr = \"1.2.3.4:5\"", "taddr", "target"),
    ('hash = "x"', "hash", "use key"),
    ('lcapIp = "1.2.3.4"', "lcapIp", "local_ip"),
    ("[tunnel]\nports = 5", "tunnel", "unknown key"),
    ('instance = "../etc"', "instance", "not a valid name"),
    ('listen = "127.0.0.1:1"', "listen", "only for a client"),
])
def test_file_errors(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    path = _write(tmp_path, "rsockd.toml", 'role = "server"\ntarget = "127.0.0.1:8388"\n' + body + "\n")
    message = _error(["-f", path])
    assert message.startswith(f"{path}: {key}: "), message
    assert fragment in message, message


def test_file_error_names_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "rsockd.toml", 'role = "server"\ntarget = "127.0.0.1:1"\nports = "10010-10001"\n')
    assert _error(["-f", "rsockd.toml"]) == 'rsockd.toml: ports: "10010-10001" is an empty range'
    _write(tmp_path, "rsockd.toml", 'target = "127.0.0.1:1"\n')
    assert _error(["-f", "rsockd.toml"]) == "rsockd.toml: role: missing (server or client)"
    _write(tmp_path, "rsockd.toml", 'role = "server"\n')
    assert _error(["-f", "rsockd.toml"]).startswith("rsockd.toml: target: missing")
    _write(tmp_path, "rsockd.toml", 'role = "server"\nduration = "abc"\n')
    assert _error(["-f", "rsockd.toml", "-t", "1.1.1.1:1"]) == 'rsockd.toml: duration: expected a number, got "abc"'


def test_file_syntax_and_read_errors(tmp_path: Path) -> None:
    bad = _write(tmp_path, "bad.toml", 'role = "server"\ntarget = \n')
    message = _error(["-f", bad])
    assert message.startswith(f"{bad}: TOML syntax error at line 2"), message
    dup = _write(tmp_path, "dup.toml", "mtu = 1\nmtu = 2\n")
    assert _error(["-f", dup]).startswith(f"{dup}: TOML syntax error")
    missing = str(tmp_path / "nope.toml")
    assert _error(["-f", missing]) == f"{missing}: cannot read: not found"
    assert _error(["-f", str(tmp_path)]) == f"{tmp_path}: cannot read: is a directory"
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'key = "caf\xe9"\n')
    assert _error(["-f", str(latin)]).startswith(f"{latin}: not UTF-8 text")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbfrole = "server"\ntarget = "127.0.0.1:1"\n')
    assert _load(["-f", str(bom)]).role == "server"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_file_permission_denied(tmp_path: Path) -> None:
    path = _write(tmp_path, "secret.toml", 'role = "server"\n')
    os.chmod(path, 0)
    assert _error(["-f", path]) == f"{path}: cannot read: permission denied"


@pytest.mark.parametrize(("exc", "why"), [
    (PermissionError(13, "Permission denied"), "permission denied"),
    (IsADirectoryError(21, "Is a directory"), "is a directory"),
    (OSError(5, "Input/output error"), "input/output error"),
])
def test_file_read_errors_say_why(monkeypatch: pytest.MonkeyPatch, exc: OSError, why: str) -> None:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise exc

    monkeypatch.setattr(cfg, "open", refuse, raising=False)  # shadows the builtin in the module
    assert _error(["-f", "/etc/rsockd/x.toml"]) == f"/etc/rsockd/x.toml: cannot read: {why}"


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_text("# " + "x" * (1 << 20) + "\n")
    assert "is this the configuration file?" in _error(["-f", str(path)])


def test_cli_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli_exit_code(SERVER) == 0
    assert _cli_exit_code(["--role=server"]) == 2
    assert _cli_exit_code([*SERVER, "--bogus"]) == 2
    assert _cli_exit_code([*SERVER, "--duration"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("rsockd: command line: ") for line in err)


_ENTRY = """\
import sys
import rsockd.service.config as c
from rsockd.errors import ConfigError
c.DEFAULT_CONFIG_PATH = "/nonexistent/rsockd/rsockd.toml"
try:
    c.load(sys.argv[1:], environ={})
except ConfigError as err:
    print(f"rsockd: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
"""


@pytest.mark.parametrize(("argv", "code", "stderr"), [
    ([], 2, "rsockd: command line: role: missing (server or client)\n"),
    (["--nope"], 2, "rsockd: command line: --nope: unknown option (see --help)\n"),
    (["--ports"], 2, "rsockd: command line: ports: expected one argument (-p/--ports)\n"),
    (SERVER, 0, ""),
    (["--help"], 0, ""),
    (["--version"], 0, ""),
])
def test_entry_point_in_a_subprocess(argv: list[str], code: int, stderr: str) -> None:
    done = subprocess.run([sys.executable, "-c", _ENTRY, *argv], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stderr) == (code, stderr)
    if "--help" in argv:
        assert done.stdout.startswith("usage: rsockd")
    if "--version" in argv:
        assert done.stdout == f"rsockd {__version__}\n"


# ---------------------------------------------------------------------------------------------
# The parsers


@pytest.mark.parametrize(("spec", "expected"), [
    ("10001-10010", tuple(range(10001, 10011))),
    ("10001,10010", (10001, 10010)),
    ("80,443,10001-10010", (80, 443, *range(10001, 10011))),
    (" 80 , 443 , 10001 - 10003 ", (80, 443, 10001, 10002, 10003)),
    ("443,80,80", (80, 443)),
    ("1-1", (1,)),
    ("65535", (65535,)),
    ("0080", (80,)),
    (443, (443,)),
    ([443, "80", "1000-1001"], (80, 443, 1000, 1001)),
])
def test_parse_ports(spec: str | int | list[int | str], expected: tuple[int, ...]) -> None:
    assert parse_ports(spec) == expected


def test_parse_ports_errors_name_source_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_ports("10010-10001", source="rsockd.toml", key="ports")
    assert str(info.value) == 'rsockd.toml: ports: "10010-10001" is an empty range'
    assert (info.value.source, info.value.key, info.value.exit_code) == ("rsockd.toml", "ports", 2)
    for bad in ("", " ", "0", "65536", "-5", "5-", "a-b", "\uff11\uff12", "80;443", "80 443", "+80", "²"):
        with pytest.raises(ConfigError):
            parse_ports(bad)


_port = st.integers(1, 65535)
_item = st.one_of(
    _port.map(lambda p: (str(p), {p})),
    st.tuples(_port, st.integers(0, 300)).filter(lambda t: t[0] + t[1] <= 65535).map(
        lambda t: (f"{t[0]}-{t[0] + t[1]}", set(range(t[0], t[0] + t[1] + 1)))),
)
_space = st.sampled_from(["", " ", "  ", "\t"])


@given(st.lists(st.tuples(_item, _space, _space), min_size=1, max_size=8), st.booleans())
def test_parse_ports_round_trip(items: list[tuple[tuple[str, set[int]], str, str]], as_list: bool) -> None:
    expected: set[int] = set().union(*(ports for (_, ports), _, _ in items))
    texts = [f"{before}{text}{after}" for (text, _), before, after in items]
    spec: str | list[int | str] = list(texts) if as_list else ",".join(texts)
    result = parse_ports(spec)
    assert result == tuple(sorted(expected))
    # The result, written back as a list or as text, parses to itself.
    assert parse_ports(list(result)) == result
    assert parse_ports(",".join(map(str, result))) == result
    assert parse_ports(format_ports(result)) == result


def test_format_ports_merges_runs() -> None:
    assert format_ports([10003, 80, 10001, 443, 10002, 444]) == "80,443-444,10001-10003"
    assert format_ports((8388,)) == "8388"


_garbage = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789-, x:[]", max_size=30),
    st.lists(st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.floats()), max_size=5),
)


@given(_garbage)
def test_parse_ports_garbage_only_raises_config_error(spec: str | list[int | str]) -> None:
    try:
        result = parse_ports(spec)
    except ConfigError as err:
        assert len(str(err).splitlines()) == 1
    else:
        assert result == tuple(sorted(set(result))) and all(1 <= p <= 65535 for p in result)


@given(st.text(max_size=60), st.sampled_from([None, "127.0.0.1"]))
def test_address_parsers_garbage_only_raise_config_error(text: str, default: str | None) -> None:
    for parse in (lambda: parse_hostport(text, default_host=default), lambda: parse_address(text)):
        try:
            parse()
        except ConfigError as err:
            assert len(str(err).splitlines()) == 1


@pytest.mark.parametrize(("text", "default", "expected"), [
    ("127.0.0.1:30000", None, ("127.0.0.1", 30000)),
    ("[::1]:30000", None, ("::1", 30000)),
    ("[fe80::1%eth0]:53", None, ("fe80::1%eth0", 53)),
    ("Host-1.example.:8", None, ("Host-1.example.", 8)),
    (" localhost:9 ", None, ("localhost", 9)),
    ("30000", "127.0.0.1", ("127.0.0.1", 30000)),
])
def test_parse_hostport(text: str, default: str | None, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default_host=default) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("30000", "expected host:port, e.g. 127.0.0.1:30000 or [::1]:30000"),
    ("", "expected host:port"),
    ("::1", "brackets"),
    ("[::1]", "expected host:port"),
    ("-bad-:1", "not an IP address or host name"),
    ("a..b:1", "not an IP address or host name"),
])
def test_parse_hostport_says_what_was_expected(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_hostport(text)


def test_parse_address() -> None:
    assert parse_address("192.0.2.1") == "192.0.2.1"
    assert parse_address("2001:DB8::1") == "2001:db8::1"
    assert parse_address("[2001:db8::1]") == "2001:db8::1"
    assert parse_address("vpn.example.org") == "vpn.example.org"
    for bad in ("", "1.2.3.4:80", "[::1]:80", "no spaces", "999.1.1.1", "a_b"):
        with pytest.raises(ConfigError):
            parse_address(bad, source="x.toml", key="server")


# ---------------------------------------------------------------------------------------------
# Any value anywhere: a Config or a one-line ConfigError, nothing else


_flags = st.sampled_from(sorted({"--" + k.replace("_", "-") for k in KEYS} | {
    "-d", "-t", "-l", "-p", "--taddr", "--ludp", "--hash", "--lcapIp"}))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(_flags, st.text(max_size=30), st.sampled_from(["server", "client"]))
def test_any_flag_value_gives_config_or_config_error(flag: str, value: str, role: str) -> None:
    base = SERVER if role == "server" else CLIENT
    try:
        c = load([*base, f"{flag}={value}"], environ={})
    except ConfigError as err:
        assert err.exit_code == 2 and len(str(err).splitlines()) == 1
    else:
        assert isinstance(c, Config) and c.role == role


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value).replace("nan", "nan").replace("inf", "inf")


_toml_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20),
              st.floats(allow_nan=False, allow_infinity=False),
              st.sampled_from(["10001-10010", "0x10", "1.5", "eth0", "[::1]:5", "tcp", "1e400"])),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.sampled_from(KEYS), _toml_values, st.sampled_from(["server", "client"]))
def test_any_file_value_gives_config_or_config_error(
        tmp_path_factory: pytest.TempPathFactory, key: str, value: object, role: str) -> None:
    directory = tmp_path_factory.getbasetemp()
    path = directory / "fuzz.toml"
    base = {"server": 'target = "127.0.0.1:8388"\n', "client": 'server = "192.0.2.1"\n'}[role]
    body = base if key in ("target", "server") else ""
    path.write_text(f'role = "{role}"\n{body}{key} = {_toml_value(value)}\n')
    try:
        c = load(["-f", str(path)], environ={})
    except ConfigError as err:
        assert err.exit_code == 2 and len(str(err).splitlines()) == 1
        assert str(err).startswith(f"{path}: ")
    else:
        assert isinstance(c, Config)


# ---------------------------------------------------------------------------------------------
# The example file


@pytest.mark.parametrize("role", ["server", "client"])
def test_example_toml_loads(tmp_path: Path, role: str) -> None:
    text = example_toml(role)  # type: ignore[arg-type]
    path = _write(tmp_path, "rsockd.toml", text)
    c = _load(["-f", path])
    assert (c.role, c.instance, c.config_path) == (role, "rsockd", path)
    # Every commented-out setting is valid too: uncomment them all.
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    assert uncommented.count("\n# ") < text.count("\n# ")
    full = _load(["-f", _write(tmp_path, "full.toml", uncommented)])
    assert (full.role, full.instance, full.dev, full.mtu) == (role, "east", ("eth0",), 1400)
    assert full.key is not None and full.ports == Config.ports


_PACKAGED_EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "rsockd.toml.example"
_CLIENT_ONLY = {"server", "listen", "reconnect_min", "reconnect_max"}


@pytest.mark.skipif(not _PACKAGED_EXAMPLE.exists(), reason="no packaging/rsockd.toml.example")
def test_packaged_example_settings_are_valid(tmp_path: Path) -> None:
    """The shipped /etc/rsockd/rsockd.toml sets nothing; each commented setting must load."""
    text = _PACKAGED_EXAMPLE.read_text()
    assert _error(["-f", _write(tmp_path, "rsockd.toml", text)]).endswith("role: missing (server or client)")
    settings_ = re.findall(r"^#(\w+ = .*)$", text, flags=re.MULTILINE)
    assert len(settings_) > 20
    for line in settings_:
        key = line.split(" ", 1)[0]
        assert key in KEYS, line
        role = "client" if key in _CLIENT_ONLY or line.startswith('role = "client"') else "server"
        lines = {"role": f'role = "{role}"', "server" if role == "client" else "target":
                 'server = "192.0.2.1"' if role == "client" else 'target = "127.0.0.1:8388"'}
        body = [text for name, text in lines.items() if name != key]
        path = _write(tmp_path, "one.toml", "\n".join([*body, line]) + "\n")
        assert _load(["-f", path]).role in ("server", "client"), line


def test_example_toml_rejects_unknown_role() -> None:
    with pytest.raises(ValueError):
        example_toml("relay")  # type: ignore[arg-type]


def test_a_bad_file_value_is_reported_even_when_a_flag_overrides_it(tmp_path: Path) -> None:
    conf = tmp_path / "rsockd.toml"
    conf.write_text('role = "server"\ntarget = "127.0.0.1:9"\nports = "10010-10001"\n')
    with pytest.raises(ConfigError) as info:
        load(["-f", str(conf), "--ports", "10001"])
    assert str(info.value) == f'{conf}: ports: "10010-10001" is an empty range'
