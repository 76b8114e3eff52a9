"""What the host's network looks like on macOS: routes, interfaces, addresses, MTUs.

The same functions as ``netinfo`` (Linux; ``rsockd.dataplane.platform`` picks one of the two),
from the two tools every macOS has: ``route -n get`` (route(8): the routing socket's answer for
one destination) and ``ifconfig`` (interfaces, their MTU and addresses).  Their output is parsed by the pure
``parse_*`` functions; the source address towards a destination comes from the kernel's own
source selection, by connecting a UDP socket (which sends nothing).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
from dataclasses import dataclass, field

from ..errors import RsockdError
from .netcommon import Route

ROUTE = "/sbin/route"
IFCONFIG = "/sbin/ifconfig"
TIMEOUT = 10.0


@dataclass(frozen=True)
class RouteGet:
    """The parts of ``route -n get <dest>`` rsockd uses."""

    interface: str | None
    gateway: str | None = None
    mtu: int | None = None  # the route's MTU (0 or missing: the interface's)


@dataclass(frozen=True)
class Interface:
    """One interface of ``ifconfig``."""

    name: str
    mtu: int
    flags: frozenset[str] = frozenset()
    addresses: tuple[str, ...] = field(default=())


_KV_RE = re.compile(r"^\s*([a-z ]+):\s*(\S.*?)\s*$")


def parse_route_get(text: str) -> RouteGet:
    """Parse ``route -n get <dest>``::

           route to: 203.0.113.9
        destination: default
               mask: default
            gateway: 192.168.1.1
          interface: en0
              flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>
         recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
               0         0         0         0         0         0      1500         0
    """
    values: dict[str, str] = {}
    lines = text.splitlines()
    mtu: int | None = None
    for i, line in enumerate(lines):
        cols = line.split()
        if "mtu" in cols and i + 1 < len(lines):
            nums = lines[i + 1].split()
            if len(nums) == len(cols):
                try:
                    mtu = int(nums[cols.index("mtu")])
                except ValueError:
                    mtu = None
            continue
        m = _KV_RE.match(line)
        if m:
            values[m.group(1).strip()] = m.group(2)
    return RouteGet(values.get("interface"), values.get("gateway"), mtu or None)


_IF_HEAD_RE = re.compile(r"^(\S+?):\s+flags=[0-9a-fA-F]+<([^>]*)>.*?\bmtu\s+(\d+)")
_INET_RE = re.compile(r"^\s+inet6?\s+(\S+)")


def parse_ifconfig(text: str) -> dict[str, Interface]:
    """Parse ``ifconfig`` (all interfaces, or one): name, flags, MTU and addresses, IPv4 and
    IPv6 (link-local ones without their ``%scope`` suffix), in the order listed::

        en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
                ether 3c:22:fb:12:34:56
                inet6 fe80::1c8a:2b3c:4d5e:6f70%en0 prefixlen 64 secured scopeid 0xe
                inet 192.168.1.23 netmask 0xffffff00 broadcast 192.168.1.255
    """
    out: dict[str, Interface] = {}
    name: str | None = None
    flags: frozenset[str] = frozenset()
    mtu = 0
    addrs: list[str] = []

    def done() -> None:
        if name is not None:
            out[name] = Interface(name, mtu, flags, tuple(addrs))

    for line in text.splitlines():
        head = _IF_HEAD_RE.match(line)
        if head:
            done()
            name, flags, mtu, addrs = head.group(1), frozenset(filter(None, head.group(2).split(","))), \
                int(head.group(3)), []
            continue
        m = _INET_RE.match(line)
        if m and name is not None:
            addr = m.group(1).split("%", 1)[0]
            try:
                addrs.append(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
    done()
    return out


def source_address(dest: str) -> str | None:
    """The source address the kernel would pick towards ``dest``: connect a UDP socket (no
    packet is sent) and read its local address; None when there is no route."""
    fam = socket.AF_INET6 if ipaddress.ip_address(dest).version == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect((dest, 9))
        except OSError:
            return None
        return str(s.getsockname()[0]).split("%", 1)[0]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RsockdError(f"{argv[0]}: {err}") from None


def _route_get(dest: str, v6: bool) -> RouteGet | None:
    res = _run([ROUTE, "-n", "get", *(["-inet6"] if v6 else []), dest])
    if res.returncode != 0:
        return None
    return parse_route_get(res.stdout)


def _interfaces(name: str | None = None) -> dict[str, Interface]:
    res = _run([IFCONFIG, *([name] if name else [])])
    if res.returncode != 0:
        if name is not None:
            raise RsockdError(f"interface {name} does not exist")
        raise RsockdError(f"ifconfig: {res.stderr.strip() or res.returncode}")
    return parse_ifconfig(res.stdout)


def route_to(dest: str) -> Route:
    """The interface and source address the kernel would use to reach ``dest``."""
    v6 = ipaddress.ip_address(dest).version == 6
    got = _route_get(dest, v6)
    if got is None or got.interface is None:
        raise RsockdError(f"no route to {dest}")
    mtu = interface_mtu(got.interface)
    if got.mtu and got.mtu < mtu:
        mtu = got.mtu
    return Route(got.interface, source_address(dest), mtu)


def interface_mtu(name: str) -> int:
    found = _interfaces(name).get(name)
    if found is None:
        raise RsockdError(f"interface {name} does not exist")
    return found.mtu


def interface_gro(name: str) -> bool | None:
    """GRO is a Linux setting (netinfo.py): macOS's BPF device reads what arrives, batched or not."""
    return None


def interface_addresses(name: str) -> list[str]:
    """Every address on ``name`` (IPv4 and IPv6, link-local included)."""
    found = _interfaces(name).get(name)
    return list(found.addresses) if found else []


def interface_of(address: str) -> str | None:
    """The interface holding ``address``, if any."""
    want = str(ipaddress.ip_address(address))
    for iface in _interfaces().values():
        if want in iface.addresses:
            return iface.name
    return None


def default_interfaces() -> list[str]:
    """Interfaces holding a default route (IPv4 first), without duplicates."""
    out: list[str] = []
    for v6 in (False, True):
        got = _route_get("default", v6)
        if got is not None and got.interface and got.interface not in out:
            out.append(got.interface)
    return out
