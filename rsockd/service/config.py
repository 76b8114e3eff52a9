"""Configuration: a flat TOML file and the command line → one frozen ``Config``.

The keys are those of the "Configuration keys" table in docs/design.md.  Every key is also a
flag (``--key-name``); rsock's flags are accepted too:

    -d, --dev IF[,IF]      dev            (repeatable; comma-separated lists allowed)
    --lcapIp, --local-ip   local_ip
    -t, --taddr            target on a server (host:port), server on a client (address only);
                           decided once the role is known, so the role may come from the file
    --target, --server     the same two keys by their own names
    -l, --ludp, --listen   listen
    -p, --ports            ports
    --hash, --key          key
    -f, --config FILE      the TOML file (else $RSOCKD_CONFIG, else /etc/rsockd/rsockd.toml
                           if it exists, else none)

``--name value`` and ``--name=value`` both work.  Command-line values replace the file's (a
list such as ``dev`` is replaced, not extended).  ``instance`` defaults to the file's stem
(``/etc/rsockd/east.toml`` → ``east``), else ``rsockd``.

Two flags are not configuration: ``--version`` prints the version and exits 0 (as ``--help``
does), and ``--check`` (validate, then exit) is returned beside the ``Config`` by
``load_invocation()`` as ``Invocation.check``.  ``load()`` returns the ``Config`` alone.

Every problem raises ``ConfigError`` (exit code 2) whose message is one line naming the source
(the file path as given, or ``command line``), the key, and what is wrong::

    rsockd.toml: ports: "10010-10001" is an empty range
    command line: role: missing (server or client)

argparse's own errors (unknown flag, missing value) become such a line too.

Host names: ``target``, ``server`` and ``listen`` accept IP literals and host names; names are
checked for syntax only here and resolved by the daemon.  ``local_ip`` must be an IP literal.
IP literals are returned normalised (``str(ipaddress.ip_address(...))``).

``parse_ports`` is the project's one port-range parser (``format_ports`` writes its form); ``parse_hostport`` and
``parse_address`` are the address parsers.  This module reads one file and nothing else.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Literal, NoReturn, TypeVar, cast

from .. import __version__
from ..core.faketcp import Role, Transport
from ..errors import ConfigError
from ..steer.cbpf import port_ranges

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli stays the fallback the packaging names
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TransportType = Literal["tcp", "udp", "all"]
Backend = Literal["auto", "xdp", "nft", "bpfdev"]
XdpMode = Literal["auto", "native", "skb"]
SendPath = Literal["auto", "raw", "packet"]
LogLevel = Literal["debug", "info", "warning", "error"]
HostPort = tuple[str, int]

DEFAULT_CONFIG_PATH = "/etc/rsockd/rsockd.toml"
#: Environment variable naming the config file when ``-f`` is not given.
CONFIG_ENV = "RSOCKD_CONFIG"
CLI_SOURCE = "command line"
DEFAULT_PORTS: tuple[int, ...] = tuple(range(10001, 10011))
DEFAULT_LISTEN: HostPort = ("127.0.0.1", 30000)
DEFAULT_MARK = 0x72736B64  # "rskd"
DEFAULT_INSTANCE = "rsockd"
#: macOS has no /run (and its system volume is read-only).
DEFAULT_RUNTIME_DIR = "/var/run/rsockd" if sys.platform == "darwin" else "/run/rsockd"

_T = TypeVar("_T")

_ROLES: tuple[Role, ...] = ("server", "client")
_TYPES: tuple[TransportType, ...] = ("tcp", "udp", "all")
_BACKENDS: tuple[Backend, ...] = ("auto", "xdp", "nft", "bpfdev")
_XDP_MODES: tuple[XdpMode, ...] = ("auto", "native", "skb")
_SEND_PATHS: tuple[SendPath, ...] = ("auto", "raw", "packet")
_LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")

_INSTANCE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,31}")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_DIGITS_RE = re.compile(r"[0-9]+")
_SIGNED_INT_RE = re.compile(r"[+-]?[0-9]+")
_MARK_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_TOML_POS_RE = re.compile(r"^(.*) \(at (line \d+, column \d+|end of document)\)$", re.DOTALL)

_MAX_FILE_BYTES = 1 << 20
_MAX_SECONDS = 10_000_000.0  # ~115 days: keeps timer arithmetic finite
_MAX_COUNT = 2**31 - 1
_MAX_CONNS = 0xFFFF  # the hello's connection index is a u16 (framing.HELLO)
_MAX_U32 = 0xFFFFFFFF  # syn_rate, syn_burst: u32 fields of the XDP program's config
_MAX_WORKERS = 64  # server worker processes (rsockd/service/worker.py); each needs a tunnel port of its own
_MAX_SUN_PATH = 103  # sun_path is 104 bytes on macOS, 108 on Linux, NUL included


@dataclass(frozen=True)
class Config:
    """One validated configuration.  Built by ``load()``; the defaults are the table's.

    ``listen`` stays ``None`` on a server; ``load()`` fills ``DEFAULT_LISTEN`` on a client.
    ``dev == ()`` and ``local_ip is None`` mean "derive from the route"; ``mtu is None`` means
    "the interface MTU".
    """

    role: Role
    dev: tuple[str, ...] = ()
    local_ip: str | None = None
    target: HostPort | None = None
    server: str | None = None
    listen: HostPort | None = None
    ports: tuple[int, ...] = DEFAULT_PORTS
    key: str | None = field(default=None, repr=False)  # a secret: kept out of logs
    type: TransportType = "tcp"
    duration: float = 30.0
    backend: Backend = "auto"
    xdp_mode: XdpMode = "auto"
    instance: str = DEFAULT_INSTANCE
    log_level: LogLevel = "info"
    keepalive: float = 5.0
    dead_timeout: float = 20.0
    syn_timeout: float = 5.0
    backlog: int = 256
    syn_rate: int = 2000
    syn_burst: int = 200
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    max_sessions: int = 1024
    max_flows: int = 4096
    max_conns_per_client: int = 64
    hello_skew: float = 120.0
    mark: int = DEFAULT_MARK
    mtu: int | None = None
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    config_path: str | None = None
    workers: int = 1
    send_path: SendPath = "auto"

    @property
    def transports(self) -> tuple[Transport, ...]:
        """The transports ``type`` enables: ``all`` is ``("tcp", "udp")``."""
        return ("tcp", "udp") if self.type == "all" else (self.type,)

    @property
    def control_socket_path(self) -> str:
        """``<runtime_dir>/<instance>/control.sock``."""
        return os.path.join(self.runtime_dir, self.instance, "control.sock")


@dataclass(frozen=True)
class Invocation:
    """What the daemon's command line asks for: a configuration, and whether only to check it."""

    config: Config
    check: bool = False


# ---------------------------------------------------------------------------------------------
# The keys: one row per key of the design table.  Flags, help and the example file come from here.


@dataclass(frozen=True)
class _Key:
    name: str
    help: str
    aliases: tuple[str, ...] = ()  # extra flags (rsock's names)
    metavar: str = "VALUE"
    example: str | None = None  # the example file's value, as TOML text, if not the default
    roles: tuple[Role, ...] = _ROLES  # the example file shows the key for these roles


_KEY_TABLE: tuple[_Key, ...] = (
    _Key("role", "server or client (required)", metavar="ROLE"),
    _Key("dev", "interface(s) to attach to, comma-separated or repeated; default: from the route",
         ("-d",), "IF", example='["eth0"]'),
    _Key("local_ip", "local address (instead of dev); default: from dev or the route",
         ("--lcapIp",), "ADDR", example='"192.0.2.1"'),
    _Key("target", "server: UDP host:port to deliver to (required on a server)",
         metavar="HOST:PORT", example='"127.0.0.1:8388"', roles=("server",)),
    _Key("server", "client: the server's address, no port (required on a client)",
         metavar="ADDR", example='"203.0.113.10"', roles=("client",)),
    _Key("listen", "client: local UDP host:port the application sends to; default 127.0.0.1:30000",
         ("-l", "--ludp"), "HOST:PORT", roles=("client",)),
    _Key("ports", "tunnel TCP ports: a-b, a,b or 80,443,10001-10010; default 10001-10010",
         ("-p",), "PORTS"),
    _Key("key", "shared secret; without it nothing is authenticated (on the command line it is "
         "visible in ps: prefer the file)", ("--hash",), "SECRET", example='"a long random secret"'),
    _Key("type", "transports: tcp, udp or all; default tcp", metavar="TYPE"),
    _Key("duration", "idle flow expiry, seconds; default 30", metavar="SECONDS"),
    _Key("backend", "steering backend: auto, xdp, nft (Linux) or bpfdev (macOS); default auto",
         metavar="BACKEND"),
    _Key("xdp_mode", "XDP attach mode: auto, native or skb; default auto", metavar="MODE"),
    _Key("instance", "instance name (runtime dir, pins, nft table); default: the config file's "
         "stem, else rsockd", metavar="NAME", example='"east"'),
    _Key("log_level", "debug, info, warning or error; default info", metavar="LEVEL"),
    _Key("keepalive", "seconds of silence before a keepalive; default 5", metavar="SECONDS"),
    _Key("dead_timeout", "seconds without an authenticated record before a connection is dead; "
         "default 20", metavar="SECONDS"),
    _Key("syn_timeout", "lifetime of half-open and hello-pending connections, seconds; default 5",
         metavar="SECONDS"),
    _Key("backlog", "bound on half-open plus hello-pending connections; default 256", metavar="N"),
    _Key("syn_rate", "server: SYNs per second let through to the daemon, the rest dropped in XDP "
         "(xdp backend only); 0 for no limit; default 2000", metavar="N", roles=("server",)),
    _Key("syn_burst", "server: SYNs let through at once above syn_rate; default 200", metavar="N",
         roles=("server",)),
    _Key("reconnect_min", "client: shortest reconnect back-off, seconds; default 0.5",
         metavar="SECONDS", roles=("client",)),
    _Key("reconnect_max", "client: longest reconnect back-off, seconds; default 30",
         metavar="SECONDS", roles=("client",)),
    _Key("max_sessions", "server: most sessions (clients); default 1024", metavar="N",
         roles=("server",)),
    _Key("max_flows", "most flows per session; default 4096", metavar="N"),
    _Key("max_conns_per_client", "most connections per session; default 64", metavar="N"),
    _Key("hello_skew", "server: seconds of clock difference a hello may show; default 120",
         metavar="SECONDS", roles=("server",)),
    _Key("mark", "SO_MARK of raw sends (number or 0x...); default 0x72736b64", metavar="MARK"),
    _Key("mtu", "path MTU override; default: the interface MTU", metavar="BYTES", example="1400"),
    _Key("runtime_dir", "control socket at <runtime_dir>/<instance>/control.sock; default "
         "/run/rsockd (macOS: /var/run/rsockd)", metavar="DIR"),
    _Key("workers", "server: processes sharing the tunnel ports (each serves every N-th port, so a client's "
         "connections spread over them); at most one per port; a client is always one process", metavar="N",
         roles=("server",)),
    _Key("send_path", "auto (default: packet where the host has no output/postrouting rules or IPsec policies "
         "it would skip, else raw), raw (IP raw sockets) or packet (Linux, Ethernet: link-layer frames with the "
         "kernel computing checksums and splitting batches, skipping the output firewall)", metavar="PATH"),
)

#: Every configuration key, in the order of the design table.
KEYS: tuple[str, ...] = tuple(k.name for k in _KEY_TABLE)

# rsock's names (and a common slip) in a file: hints for the unknown-key error.
_FILE_KEY_HINTS = {
    "taddr": "in the file use target = \"host:port\" (server) or server = \"address\" (client)",
    "ludp": "in the file use listen",
    "hash": "in the file use key",
    "lcapip": "in the file use local_ip",
    "config": "the config file cannot name another; use -f",
}


# ---------------------------------------------------------------------------------------------
# Errors


_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _clean(text: str) -> str:
    """Escape control and line-break characters: a message is always exactly one line."""
    return _UNSAFE_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                             else f"\\u{ord(m.group()):04x}", text)


def _fail(problem: str, source: str | None = None, key: str | None = None) -> NoReturn:
    raise ConfigError(_clean(problem), source=_clean(source) if source else None,
                      key=_clean(key) if key else None)


def _show(value: object) -> str:
    """A value as the user wrote it, quoted if a string, shortened if long."""
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "…"
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "…"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"  # the only other TOML values


# ---------------------------------------------------------------------------------------------
# Value parsers.  Each takes what TOML or the command line gave (command-line values are
# strings; a file may also give numbers, lists) and the source and key for its errors.


def _string(value: object, source: str | None, key: str | None) -> str:
    if not isinstance(value, str):
        _fail(f"expected a string, got {_show(value)}", source, key)
    return value


def _nonempty(value: object, source: str | None, key: str | None) -> str:
    text = _string(value, source, key)
    if not text.strip():
        _fail("empty", source, key)
    return text


def _choice(value: object, source: str, key: str, choices: tuple[str, ...]) -> str:
    text = _string(value, source, key).strip().lower()
    if text not in choices:
        _fail(f"{_show(value)} is not one of {', '.join(choices)}", source, key)
    return text


def _role(value: object, source: str, key: str) -> Role:
    return cast(Role, _choice(value, source, key, _ROLES))


def _transport_type(value: object, source: str, key: str) -> TransportType:
    return cast(TransportType, _choice(value, source, key, _TYPES))


def _backend(value: object, source: str, key: str) -> Backend:
    return cast(Backend, _choice(value, source, key, _BACKENDS))


def _xdp_mode(value: object, source: str, key: str) -> XdpMode:
    return cast(XdpMode, _choice(value, source, key, _XDP_MODES))


def _send_path(value: object, source: str, key: str) -> SendPath:
    return cast(SendPath, _choice(value, source, key, _SEND_PATHS))


def _log_level(value: object, source: str, key: str) -> LogLevel:
    return cast(LogLevel, _choice(value, source, key, _LOG_LEVELS))


def _seconds(value: object, source: str, key: str) -> float:
    """A positive, finite number of seconds (a TOML number or its text)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            _fail(f"expected a number, got {_show(value)}", source, key)
    else:
        _fail(f"expected a number, got {_show(value)}", source, key)
    if not math.isfinite(number):
        _fail(f"expected a number, got {_show(value)}", source, key)
    if number <= 0:
        _fail(f"must be positive, got {_show(value)}", source, key)
    if number > _MAX_SECONDS:
        _fail(f"{_show(value)} is too large (at most {_MAX_SECONDS:.0f} seconds)", source, key)
    return number


def _integer(value: object, source: str, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _SIGNED_INT_RE.fullmatch(value.strip()):
        text = value.strip()
        if len(text.lstrip("+-").lstrip("0")) > 18:
            _fail(f"{_show(value)} is out of range", source, key)
        return int(text)
    _fail(f"expected an integer, got {_show(value)}", source, key)


def _count(lo: int, hi: int, why: str = "") -> Callable[[object, str, str], int]:
    def parse(value: object, source: str, key: str) -> int:
        number = _integer(value, source, key)
        if not lo <= number <= hi:
            _fail(f"{number} is out of range ({lo}..{hi}{why})", source, key)
        return number

    return parse


def _mark(value: object, source: str, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _MARK_RE.fullmatch(value.strip()) and len(value.strip()) <= 20:
        number = int(value.strip(), 0) if value.strip()[:2].lower() == "0x" else int(value.strip())
    else:
        _fail(f"expected an integer or 0x..., got {_show(value)}", source, key)
    if number == 0:
        _fail("0 is not allowed: the egress guard tells our segments from the kernel's by a "
              "non-zero mark", source, key)
    if not 0 < number <= 0xFFFFFFFF:
        _fail(f"{_show(value)} is out of range (1..0xffffffff)", source, key)
    return number


def _dev(value: object, source: str, key: str) -> tuple[str, ...]:
    """Interface names: a string (comma-separated), or a list of them."""
    items: list[object] = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        _fail("empty list (leave dev out to use the route's interface)", source, key)
    names: list[str] = []
    for item in items:
        for name in _string(item, source, key).split(","):
            name = name.strip()
            if not name:
                _fail(f"empty interface name in {_show(item)}", source, key)
            if (len(name) > 15 or name in (".", "..")
                    or any(c in name for c in "/:=") or not name.isprintable()):
                _fail(f"{_show(name)} is not an interface name", source, key)
            if name not in names:
                names.append(name)
    return tuple(names)


def _ip_literal(value: object, source: str, key: str) -> str:
    text = _string(value, source, key).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        _fail(f"{_show(value)} is not an IPv4 or IPv6 address", source, key)


def _secret(value: object, source: str, key: str) -> str:
    text = _string(value, source, key)
    if not text:
        _fail("empty (leave key out for no key)", source, key)
    return text


def _instance(value: object, source: str, key: str) -> str:
    name = _string(value, source, key)
    if not _INSTANCE_RE.fullmatch(name):
        _fail(f"{_show(name)} is not a valid name (1 to 32 of A-Z a-z 0-9 _ . -, "
              "not starting with a dot)", source, key)
    return name


def _runtime_dir(value: object, source: str, key: str) -> str:
    text = _nonempty(value, source, key)
    if not os.path.isabs(text):
        _fail(f"{_show(value)} is not an absolute path", source, key)
    return os.path.normpath(text)


def _hostname_or_ip(text: str, original: object, source: str | None, key: str | None) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if (len(text) > 253 or not _HOSTNAME_RE.fullmatch(text) or labels[-1].isdigit()):
        _fail(f"{_show(original)} is not an IP address or host name", source, key)
    return text


def _port(text: str, original: object, source: str | None, key: str | None, what: str) -> int:
    text = text.strip()
    if not _DIGITS_RE.fullmatch(text):
        _fail(f"{_show(original)}: {_show(text)} is not a port number ({what})", source, key)
    if len(text.lstrip("0")) > 5 or not 1 <= int(text) <= 65535:
        _fail(f"{_show(original)}: port {text} is out of range (1..65535)", source, key)
    return int(text)


def parse_hostport(text: str, *, default_host: str | None = None,
                   source: str | None = None, key: str | None = None) -> HostPort:
    """``127.0.0.1:30000``, ``[::1]:30000`` or ``host:port`` → ``(host, port)``.

    IP literals come back normalised; host names are checked for syntax only.  With
    ``default_host``, a bare port (``30000`` or ``:30000``) is accepted too.  Raises
    ``ConfigError`` naming ``source`` and ``key``.
    """
    text = _string(text, source, key)
    expected = "expected host:port, e.g. 127.0.0.1:30000 or [::1]:30000"
    s = text.strip()
    if not s:
        _fail(f"empty ({expected})", source, key)
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or not s[close + 1:].startswith(":"):
            _fail(f"{_show(text)}: {expected}", source, key)
        host, port_text = s[1:close], s[close + 2:]
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            _fail(f"{_show(text)}: {_show(host)} is not an IPv6 address", source, key)
        return str(address), _port(port_text, text, source, key, expected)
    colons = s.count(":")
    if colons == 0 and default_host is not None and _DIGITS_RE.fullmatch(s):
        host, port_text = "", s
    elif colons == 1:
        host, port_text = s.split(":")
    elif colons > 1:
        _fail(f"{_show(text)}: put an IPv6 address in brackets, e.g. [::1]:30000", source, key)
    else:
        _fail(f"{_show(text)}: {expected}", source, key)
    port = _port(port_text, text, source, key, expected)
    if not host:
        if default_host is None:
            _fail(f"{_show(text)}: missing host ({expected})", source, key)
        host = default_host
    return _hostname_or_ip(host.strip(), text, source, key), port


def parse_address(text: str, *, source: str | None = None, key: str | None = None) -> str:
    """An IPv4/IPv6 literal (``[...]`` allowed) or a host name, without a port.

    Literals come back normalised; names are checked for syntax only (the daemon resolves
    them).  Raises ``ConfigError`` naming ``source`` and ``key``.
    """
    text = _string(text, source, key)
    s = text.strip()
    if not s:
        _fail("empty (expected an IP address or host name)", source, key)
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    elif s.count(":") == 1 or (s.startswith("[") and "]:" in s):
        _fail(f"expected an address without a port, got {_show(text)} "
              "(the server's ports are set with ports / -p)", source, key)
    return _hostname_or_ip(s, text, source, key)


def _target(value: object, source: str, key: str) -> HostPort:
    return parse_hostport(_string(value, source, key), source=source, key=key)


def _listen(value: object, source: str, key: str) -> HostPort:
    return parse_hostport(_string(value, source, key), default_host=DEFAULT_LISTEN[0],
                          source=source, key=key)


def _server(value: object, source: str, key: str) -> str:
    return parse_address(_string(value, source, key), source=source, key=key)


# ---------------------------------------------------------------------------------------------
# Ports


_PORTS_FORMS = "expected e.g. 10001-10010, 80,443 or 80,443,10001-10010"


def _one_port(text: str, item: str, source: str | None, key: str) -> int:
    text, item = text.strip(), item.strip()
    if not _DIGITS_RE.fullmatch(text):
        _fail(f"{_show(item)} is not a port or range ({_PORTS_FORMS})", source, key)
    if len(text.lstrip("0")) > 5 or not 1 <= int(text) <= 65535:
        _fail(f"{_show(item)}: port {text} is out of range (1..65535)", source, key)
    return int(text)


def _port_item(item: str, source: str | None, key: str) -> range:
    first, dash, last = item.partition("-")
    lo = _one_port(first, item, source, key)
    if not dash:
        return range(lo, lo + 1)
    hi = _one_port(last, item, source, key)
    if hi < lo:
        _fail(f"{_show(item.strip())} is an empty range", source, key)
    return range(lo, hi + 1)


def _ports(value: object, source: str | None, key: str) -> tuple[int, ...]:
    items: list[object] = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        _fail(f"empty list ({_PORTS_FORMS})", source, key)
    ports: set[int] = set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 1 <= item <= 65535:
                _fail(f"port {item} is out of range (1..65535)", source, key)
            ports.add(item)
            continue
        if not isinstance(item, str):
            _fail(f"expected a port, a range or a list of them, got {_show(item)}", source, key)
        if not item.strip():
            _fail(f"empty ({_PORTS_FORMS})", source, key)
        for part in item.split(","):
            if not part.strip():
                _fail(f"{_show(item)} has an empty item ({_PORTS_FORMS})", source, key)
            ports.update(_port_item(part, source, key))
    return tuple(sorted(ports))


def parse_ports(spec: str | int | Sequence[int | str], *, source: str | None = None,
                key: str = "ports") -> tuple[int, ...]:
    """The project's one port-range parser → sorted, unique ports.

    Forms: ``10001-10010``, ``10001,10010``, ``80,443,10001-10010`` (spaces around items
    allowed), a single port, or a (TOML) list of ports and such strings.  Raises
    ``ConfigError`` naming ``source`` and ``key``: empty ranges (``"10010-10001" is an empty
    range``), ports outside 1..65535, anything not a number, nothing at all.
    """
    return _ports(spec, source, key)


def format_ports(ports: Iterable[int]) -> str:
    """``parse_ports`` backwards: sorted ports as merged ranges, ``80,443-444,10001-10010``."""
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in port_ranges(ports))


# ---------------------------------------------------------------------------------------------
# The file


def _read_toml(path: str) -> dict[str, object]:
    """The file's top-level table.  Every failure is a one-line ``ConfigError``."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        _fail("cannot read: not found", path)
    except PermissionError:
        _fail("cannot read: permission denied", path)
    except IsADirectoryError:
        _fail("cannot read: is a directory", path)
    except OSError as e:
        _fail(f"cannot read: {(e.strerror or str(e)).lower()}", path)
    if len(data) > _MAX_FILE_BYTES:
        _fail(f"larger than {_MAX_FILE_BYTES} bytes; is this the configuration file?", path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"not UTF-8 text (byte {e.start})", path)
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS_RE.match(str(e))
        what, where = (m.group(1), m.group(2)) if m else (str(e), "")
        what = what[:1].lower() + what[1:]
        _fail(f"TOML syntax error at {where}: {what}" if where else f"TOML syntax error: {what}",
              path)


def _check_file_keys(table: Mapping[str, object], path: str) -> None:
    for name in table:
        if name in KEYS:
            continue
        hint = _FILE_KEY_HINTS.get(name.lower())
        if hint is None and name.replace("-", "_") in KEYS:
            hint = f"did you mean {name.replace('-', '_')}?"
        if hint is None:
            close = difflib.get_close_matches(name, KEYS, n=1, cutoff=0.7)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(KEYS)}"
        _fail(f"unknown key ({hint})", path, name)


# ---------------------------------------------------------------------------------------------
# The command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, except that errors raise a one-line ``ConfigError`` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        m = re.match(r"argument ([^:]+): (.*)$", message, re.DOTALL)
        if m:
            for action in self._actions:
                if "/".join(action.option_strings) == m.group(1):
                    if action.dest in KEYS:
                        _fail(f"{m.group(2)} ({m.group(1)})", CLI_SOURCE, action.dest)
                    _fail(m.group(2), CLI_SOURCE, m.group(1))
        _fail(message, CLI_SOURCE)


def _build_parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="rsockd", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Carry UDP inside fake TCP segments.  Every configuration key is also a "
                    "flag; flags override the config file.",
        epilog="rsock's flags are accepted: --dev, --taddr, --ludp, --ports, --hash, --type, "
               "--duration, --lcapIp, in --name value and --name=value forms.")
    parser.add_argument("-f", "--config", metavar="FILE", dest="config",
                        help=f"TOML config file (default: ${CONFIG_ENV}, else "
                             f"{DEFAULT_CONFIG_PATH} if it exists)")
    parser.add_argument("-t", "--taddr", metavar="ADDR", dest="taddr",
                        help="rsock's name for target (server, host:port) or server (client)")
    for k in _KEY_TABLE:
        flags = [a for a in k.aliases if len(a) == 2] + [_flag(k.name)]
        flags += [a for a in k.aliases if len(a) > 2]
        action = "append" if k.name == "dev" else "store"
        parser.add_argument(*flags, dest=k.name, metavar=k.metavar, action=action, help=k.help)
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"rsockd {__version__}")
    return parser


def _parse_cli(argv: Sequence[str]) -> dict[str, object]:
    parser = _build_parser()
    namespace, extras = parser.parse_known_args(list(argv))
    for extra in extras:
        if extra.startswith("-") and extra != "-":
            name = extra.partition("=")[0]
            known = [s for a in parser._actions for s in a.option_strings]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else " (see --help)"
            _fail(f"unknown option{hint}", CLI_SOURCE, name)
        _fail(f"unexpected argument {_show(extra)} (options are --name value or --name=value)",
              CLI_SOURCE)
    return dict(vars(namespace))


# ---------------------------------------------------------------------------------------------
# Putting it together


class _Values:
    """Raw values with their sources; ``get`` converts one, naming its source in errors.

    A value overridden by a later source (the file's, by a flag) is still checked: a broken file
    is reported even while the command line happens to override the broken key.
    """

    def __init__(self) -> None:
        self.raw: dict[str, tuple[object, str]] = {}
        self.overridden: dict[str, list[tuple[object, str]]] = {}

    def set(self, key: str, value: object, source: str) -> None:
        if key in self.raw:
            self.overridden.setdefault(key, []).append(self.raw[key])
        self.raw[key] = (value, source)

    def source(self, key: str) -> str | None:
        return self.raw[key][1] if key in self.raw else None

    def get(self, key: str, parse: Callable[[object, str, str], _T], default: _T) -> _T:
        if key not in self.raw:
            return default
        for old, old_source in self.overridden.get(key, ()):
            parse(old, old_source, key)
        value, source = self.raw[key]
        return parse(value, source, key)


def _config_file(cli: Mapping[str, object], environ: Mapping[str, str]) -> str | None:
    if "config" in cli:
        path = cast(str, cli["config"])
        if not path:
            _fail("empty file name", CLI_SOURCE, "config")
        return path
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def load_invocation(argv: Sequence[str] | None = None, *,
                    environ: Mapping[str, str] = os.environ) -> Invocation:
    """Parse the daemon's command line (``sys.argv[1:]`` if ``None``) and its config file.

    ``--help`` and ``--version`` print and raise ``SystemExit(0)``; every problem raises a
    one-line ``ConfigError`` (exit code 2).
    """
    cli = _parse_cli(sys.argv[1:] if argv is None else argv)
    check = bool(cli.pop("check", False))
    path = _config_file(cli, environ)
    cli.pop("config", None)
    values = _Values()
    if path is not None:
        table = _read_toml(path)
        _check_file_keys(table, path)
        for name, value in table.items():
            values.set(name, value, path)
    taddr = cli.pop("taddr", None)
    for name, value in cli.items():
        values.set(name, value, CLI_SOURCE)
    # Where a missing key should have been: the file if there is one.
    home = path if path is not None else CLI_SOURCE

    role = values.get("role", _role, None)
    if role is None:
        _fail("missing (server or client)", home, "role")
    if taddr is not None:
        # -t means target on a server, server on a client: known only now that role is.
        mapped = "target" if role == "server" else "server"
        if values.source(mapped) == CLI_SOURCE:
            _fail(f"given twice (-t/--taddr and {_flag(mapped)})", CLI_SOURCE, mapped)
        values.set(mapped, taddr, CLI_SOURCE)
    return Invocation(_build(values, role, path, home), check)


def load(argv: Sequence[str] | None = None, *,
         environ: Mapping[str, str] = os.environ) -> Config:
    """The ``Config`` the command line (and its config file) describe; see ``load_invocation``."""
    return load_invocation(argv, environ=environ).config


def _build(values: _Values, role: Role, path: str | None, home: str) -> Config:
    exclusive = {"target": ("server", "a client names its server with server or -t"),
                 "server": ("client", "a server delivers to target"),
                 "listen": ("client", "a server delivers to target")}
    for name, (only, why) in exclusive.items():
        source = values.source(name)
        if source is not None and only != role:
            _fail(f"only for a {only} ({why})", source, name)

    target = values.get("target", _target, None)
    server = values.get("server", _server, None)
    listen = values.get("listen", _listen, None)
    if role == "server" and target is None:
        _fail("missing (the UDP host:port to deliver to; -t/--taddr)", home, "target")
    if role == "client":
        if server is None:
            _fail("missing (the server's address; -t/--taddr)", home, "server")
        if listen is None:
            listen = DEFAULT_LISTEN

    ports = values.get("ports", _ports, Config.ports)
    if target is not None and target[1] in ports and _is_loopback(target[0]):
        _fail(f"{target[0]}:{target[1]} is a tunnel port on this host: the tunnel would deliver "
              "to itself", values.source("target"), "target")

    if "instance" in values.raw:
        instance = values.get("instance", _instance, DEFAULT_INSTANCE)
    elif path is not None:
        stem = PurePath(path).stem
        if not _INSTANCE_RE.fullmatch(stem):
            _fail(f"the file name {_show(stem)} is not a valid instance name; set instance",
                  path, "instance")
        instance = stem
    else:
        instance = DEFAULT_INSTANCE

    config = Config(
        role=role,
        dev=values.get("dev", _dev, Config.dev),
        local_ip=values.get("local_ip", _ip_literal, None),
        target=target,
        server=server,
        listen=listen,
        ports=ports,
        key=values.get("key", _secret, None),
        type=values.get("type", _transport_type, Config.type),
        duration=values.get("duration", _seconds, Config.duration),
        backend=values.get("backend", _backend, Config.backend),
        xdp_mode=values.get("xdp_mode", _xdp_mode, Config.xdp_mode),
        instance=instance,
        log_level=values.get("log_level", _log_level, Config.log_level),
        keepalive=values.get("keepalive", _seconds, Config.keepalive),
        dead_timeout=values.get("dead_timeout", _seconds, Config.dead_timeout),
        syn_timeout=values.get("syn_timeout", _seconds, Config.syn_timeout),
        backlog=values.get("backlog", _count(1, _MAX_COUNT), Config.backlog),
        syn_rate=values.get("syn_rate", _count(0, _MAX_U32, ", 0 for no limit"), Config.syn_rate),
        syn_burst=values.get("syn_burst", _count(1, _MAX_U32), Config.syn_burst),
        reconnect_min=values.get("reconnect_min", _seconds, Config.reconnect_min),
        reconnect_max=values.get("reconnect_max", _seconds, Config.reconnect_max),
        max_sessions=values.get("max_sessions", _count(1, _MAX_COUNT), Config.max_sessions),
        max_flows=values.get("max_flows", _count(1, _MAX_COUNT), Config.max_flows),
        max_conns_per_client=values.get(
            "max_conns_per_client", _count(1, _MAX_CONNS, ", the hello's index is 16 bits"),
            Config.max_conns_per_client),
        hello_skew=values.get("hello_skew", _seconds, Config.hello_skew),
        mark=values.get("mark", _mark, Config.mark),
        mtu=values.get("mtu", _count(576, 65535), None),
        runtime_dir=values.get("runtime_dir", _runtime_dir, Config.runtime_dir),
        config_path=path,
        workers=values.get("workers", _count(1, _MAX_WORKERS), Config.workers),
        send_path=values.get("send_path", _send_path, Config.send_path),
    )
    _check_relations(config, values)
    return config


def _blame(values: _Values, low: str, high: str) -> tuple[str, str]:
    """The (source, key) to name when two keys disagree: the one the user set (``low`` first)."""
    for key in (low, high):
        source = values.source(key)
        if source is not None:
            return source, key
    return "defaults", low  # unreachable: the defaults agree


def _check_relations(config: Config, values: _Values) -> None:
    # (low, high, strict): low must be below high (or at most high when not strict).
    for low, high, strict in (("keepalive", "dead_timeout", True),
                              ("reconnect_min", "reconnect_max", False)):
        lo, hi = getattr(config, low), getattr(config, high)
        if lo > hi or (strict and lo == hi):
            source, key = _blame(values, low, high)
            less = "less than" if strict else "at most"
            more = "more than" if strict else "at least"
            problem = (f"{lo:g} must be {less} {high} ({hi:g})" if key == low
                       else f"{hi:g} must be {more} {low} ({lo:g})")
            _fail(problem, source, key)
    if config.workers > 1:
        source = values.source("workers") or CLI_SOURCE
        if config.role != "server":
            _fail(f"{config.workers}: only a server runs several workers (a client is one process; "
                  "its connections already spread over the server's workers)", source, "workers")
        if config.workers > len(config.ports):
            _fail(f"{config.workers} workers for {len(config.ports)} tunnel ports: each worker serves ports of its "
                  "own, so use at most one worker per port", source, "workers")
    socket_path = config.control_socket_path
    if len(os.fsencode(socket_path)) > _MAX_SUN_PATH:
        key = "runtime_dir" if values.source("runtime_dir") else "instance"
        _fail(f"control socket path {_show(socket_path)} is longer than {_MAX_SUN_PATH} bytes "
              "(the limit of a Unix socket path)",
              values.source(key) or config.config_path or CLI_SOURCE, key)


def _is_loopback(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The example file


def _toml_default(name: str) -> str:
    value = getattr(Config, name)
    if name == "ports":
        return '"10001-10010"'
    if name == "mark":
        return f"0x{value:x}"
    if name == "listen":
        return f'"{DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]}"'
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}" if value != int(value) else f"{value:.0f}"
    return str(value)


def example_toml(role: Role) -> str:
    """A commented example config for ``role`` that ``load(["-f", path])`` accepts.

    The required keys are set; every other key is shown commented out with its default (or,
    where the default is "derived", an example value).
    """
    if role not in _ROLES:
        raise ValueError(f"role must be server or client, not {role!r}")
    required = {"role": json.dumps(role), "target": '"127.0.0.1:8388"',
                "server": '"203.0.113.10"'}
    lines = [
        f"# rsockd configuration ({role}).",
        "# Every key is also a command-line flag (--key-name, underscores as dashes); a flag",
        "# overrides the file.  The instance name defaults to this file's name without .toml.",
        "",
    ]
    for k in _KEY_TABLE:
        if role not in k.roles:
            continue
        lines.extend(textwrap.wrap(k.help, 96, initial_indent="# ", subsequent_indent="# "))
        if k.name in required:
            lines.append(f"{k.name} = {required[k.name]}")
        else:
            value = k.example if k.example is not None else _toml_default(k.name)
            lines.append(f"# {k.name} = {value}")
        lines.append("")
    return "\n".join(lines)
