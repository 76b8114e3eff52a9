"""macOS steering backend: a BPF device receives the tunnel segments, a pf anchor keeps them
from the kernel's TCP stack.

**Receive.**  One ``/dev/bpf*`` device per interface (libpcap's order, bpf(4)): ``BIOCVERSION``
check, ``BIOCSBLEN`` (before ``BIOCSETIF``: the buffers are allocated at attach and cannot be
resized after), ``BIOCSETIF``, ``BIOCGDLT``, ``BIOCIMMEDIATE``, ``BIOCSSEESENT`` 0 (not on
loopback, see ``open_device``), ``BIOCGBLEN``, then ``BIOCSETF`` with ``cbpf.tunnel_filter`` for
the link type (``receiver_filter``).  ``BIOCSHDRCMPLT`` only matters for ``write(2)`` on the
device; rsockd sends through raw IP sockets (``rsockd.rawsock_darwin``), so it is not set.
A ``read(2)`` must ask for exactly the buffer size (xnu ``bpfread``: ``uio_resid != bd_bufsize``
→ EINVAL) and returns ``bpf_hdr`` records (``parse_records``); the device reads into its own
buffer of that size.  Taps run in the interface layer, before pf and IP input, so the device
sees the segments pf then drops.  Python verifies the TCP checksum (``Relay._packet``).

**Block.**  pf rules in an anchor of our own, never the main ruleset.  An anchor only takes
effect when a rule of an evaluated ruleset calls it; Apple's ``/etc/pf.conf`` (loaded at boot)
ends with ``anchor "com.apple/*"``, which evaluates every child anchor of ``com.apple`` at
packet time, including children created later.  So the rules go into a child of our own::

    com.apple/100.rsockd.<instance>

loaded with ``pfctl -a <anchor> -f -`` (the load replaces that anchor's rules atomically, so a
stale set left by a killed daemon is replaced, not merged) and removed with ``-a <anchor> -F
rules``: the anchor holds filter rules only, and ``-F all`` would also flush its tables (and
without ``-a`` any ``-F`` would flush Apple's main ruleset, which rsockd never touches).
No edit of ``/etc/pf.conf`` is needed; ``attach`` checks that the main ruleset still holds the
``com.apple/*`` anchor point and says how to restore it when it does not.  Children are
evaluated in name order (``strcmp``), and Apple's own are numbered (``200.AirDrop``,
``250.ApplicationFirewall``), so ``100.`` puts ours first.  The instance in the name keeps two
instances apart.  The rules (``pf_anchor_rules``) are ``quick``, which makes a match final for
the whole ruleset (pf.conf(5), Anchors):

- ``block drop in quick on <if> ...`` for the tunnel segments (the match rule of
  docs/design.md, per family, labelled ``steered_v4``/``steered_v6`` for the counters);
- ``pass out quick ... no state`` for our own segments: pf looks up states *before* rules, so a
  state created for our outgoing SYN by some other ``pass ... keep state`` rule would let the
  peer's answers bypass the block and reach TCP, which would answer with RST.

pf is off by default on macOS; each user takes a reference with ``pfctl -E`` (which prints
``Token : <n>``) and gives it back with ``pfctl -X <n>``, so pf stays enabled exactly as long as
someone needs it (Apple's ``/etc/pf.conf`` header; pfctl(8)).  The token is written to
``<state_dir>/<instance>.pf-token`` so that the reference of a daemon killed while holding it
is released at the next start (``cleanup_stale``), like the stale XDP programs on Linux.

Sequences (the tests run them against a recording stand-in for ``pfctl``):

    attach:        [-X <stale token>]  -s rules  -a A -f -  -E
    detach:        -a A -F rules  -X <token>
    cleanup_stale: -a A -s rules  [-a A -F rules]  [-X <stale token>]

On a failure inside ``attach`` everything done so far is undone in reverse (rules flushed,
token released, devices closed).

macOS-only calls (``fcntl.ioctl`` on a BPF device, ``pfctl``) happen only inside methods, so
this module imports and its pure parts run anywhere.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import logging
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import SteerError
from . import Receiver, SteerPlan, cbpf, split_peers

LOG = logging.getLogger(__name__)

PFCTL = "/sbin/pfctl"
DEV_GLOB = "/dev/bpf*"
STATE_DIR = "/var/run/rsockd"  # /var/run is emptied at boot, as are pf's enable references
#: Requested capture buffer; xnu caps it (``BPF_BUFSIZE_CAP``) and reports what it granted.
BUFSIZE = 1 << 20
#: Reads per wake-up before yielding to the event loop (each returns up to a whole buffer).
READS_PER_WAKEUP = 8

# ---------------------------------------------------------------------------------------------
# ioctl request numbers, computed from their C definitions
#
# <sys/ioccom.h> (xnu bsd/sys/ioccom.h):
#   #define IOCPARM_MASK 0x1fff
#   #define IOC_VOID (unsigned long)0x20000000, IOC_OUT 0x40000000, IOC_IN 0x80000000
#   #define _IOC(inout,group,num,len) (inout | ((len & IOCPARM_MASK) << 16) | ((group) << 8) | (num))

IOCPARM_MASK = 0x1FFF
IOC_VOID = 0x20000000
IOC_OUT = 0x40000000
IOC_IN = 0x80000000
IOC_INOUT = IOC_IN | IOC_OUT

#: What ``sizeof`` applies to: a C type or a byte count.
Size: TypeAlias = "int | type[ctypes._SimpleCData[Any]] | type[ctypes.Structure] | type[ctypes.Union]"


def _sizeof(t: Size) -> int:
    return t if isinstance(t, int) else ctypes.sizeof(t)


def ioc(inout: int, group: str, num: int, length: int) -> int:
    """``_IOC(inout, group, num, len)``."""
    return inout | ((length & IOCPARM_MASK) << 16) | (ord(group) << 8) | num


def io(group: str, num: int) -> int:
    """``_IO(g, n)``."""
    return ioc(IOC_VOID, group, num, 0)


def ior(group: str, num: int, t: Size) -> int:
    """``_IOR(g, n, t)``: the kernel copies ``sizeof(t)`` bytes out."""
    return ioc(IOC_OUT, group, num, _sizeof(t))


def iow(group: str, num: int, t: Size) -> int:
    """``_IOW(g, n, t)``: the kernel copies ``sizeof(t)`` bytes in."""
    return ioc(IOC_IN, group, num, _sizeof(t))


def iowr(group: str, num: int, t: Size) -> int:
    """``_IOWR(g, n, t)``: in and out."""
    return ioc(IOC_INOUT, group, num, _sizeof(t))


# The structures the requests carry, as macOS declares them for 64-bit processes (LP64: the
# sizes come out the same on any LP64 host, which is what lets the tests check them on Linux).

IFNAMSIZ = 16


class Sockaddr(ctypes.Structure):
    """``struct sockaddr`` (BSD: with ``sa_len``)."""

    _fields_ = [("sa_len", ctypes.c_uint8), ("sa_family", ctypes.c_uint8), ("sa_data", ctypes.c_char * 14)]


class _IfKpiData(ctypes.Union):
    _fields_ = [("ifk_ptr", ctypes.c_void_p), ("ifk_value", ctypes.c_int)]


class IfKpi(ctypes.Structure):
    """``struct ifkpi`` (<net/if.h>): one of the ``ifr_ifru`` members, 16 bytes."""

    _fields_ = [("ifk_module_id", ctypes.c_uint32), ("ifk_type", ctypes.c_uint32), ("ifk_data", _IfKpiData)]


class IfDevMtu(ctypes.Structure):
    """``struct ifdevmtu`` (<net/if.h>)."""

    _fields_ = [("ifdm_current", ctypes.c_int), ("ifdm_min", ctypes.c_int), ("ifdm_max", ctypes.c_int)]


class IfrIfru(ctypes.Union):
    """``ifr_ifru`` of ``struct ifreq`` (<net/if.h>): the members that set its size (16) and
    alignment (8, from the pointers); the rest are ``int``/``short``/``u_int32_t``."""

    _fields_ = [("ifru_addr", Sockaddr), ("ifru_flags", ctypes.c_short), ("ifru_mtu", ctypes.c_int),
                ("ifru_intval", ctypes.c_int), ("ifru_data", ctypes.c_void_p), ("ifru_devmtu", IfDevMtu),
                ("ifru_kpi", IfKpi), ("ifru_cap", ctypes.c_int * 2)]


class Ifreq(ctypes.Structure):
    """``struct ifreq`` (<net/if.h>): 32 bytes on LP64 macOS."""

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ), ("ifr_ifru", IfrIfru)]


class BpfProgram(ctypes.Structure):
    """``struct bpf_program { u_int bf_len; struct bpf_insn *bf_insns; }``: 16 bytes on LP64
    (xnu's ``bpf_program64`` aligns the pointer to 8)."""

    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class BpfStat(ctypes.Structure):
    """``struct bpf_stat { u_int bs_recv; u_int bs_drop; }``."""

    _fields_ = [("bs_recv", ctypes.c_uint), ("bs_drop", ctypes.c_uint)]


class BpfVersion(ctypes.Structure):
    """``struct bpf_version { u_short bv_major; u_short bv_minor; }``."""

    _fields_ = [("bv_major", ctypes.c_ushort), ("bv_minor", ctypes.c_ushort)]


# <net/bpf.h> (xnu bsd/net/bpf.h)
BIOCGBLEN = ior("B", 102, ctypes.c_uint)
BIOCSBLEN = iowr("B", 102, ctypes.c_uint)
BIOCSETF = iow("B", 103, BpfProgram)
BIOCFLUSH = io("B", 104)
BIOCGDLT = ior("B", 106, ctypes.c_uint)
BIOCSETIF = iow("B", 108, Ifreq)
BIOCGSTATS = ior("B", 111, BpfStat)
BIOCIMMEDIATE = iow("B", 112, ctypes.c_uint)
BIOCVERSION = ior("B", 113, BpfVersion)
BIOCGHDRCMPLT = ior("B", 116, ctypes.c_uint)
BIOCSHDRCMPLT = iow("B", 117, ctypes.c_uint)
BIOCGSEESENT = ior("B", 118, ctypes.c_uint)
BIOCSSEESENT = iow("B", 119, ctypes.c_uint)

BPF_MAJOR_VERSION, BPF_MINOR_VERSION = 1, 1
#: ``BPF_MAXINSNS`` of macOS (Linux accepts 4096: ``cbpf.BPF_MAXINSNS``).
BPF_MAXINSNS = 512

# Data-link types (<net/bpf.h>)
DLT_NULL = 0  # BSD loopback, utun: 4-byte address family in host byte order
DLT_EN10MB = 1  # Ethernet (and Wi-Fi, which macOS presents as Ethernet)
DLT_RAW = 12  # raw IP (macOS's value; some interfaces, e.g. ipsec)

_LINKS: dict[int, tuple[cbpf.Link, int]] = {DLT_EN10MB: ("en10mb", 14), DLT_NULL: ("null", 4), DLT_RAW: ("raw", 0)}
LINK_NAMES = {DLT_NULL: "null", DLT_EN10MB: "en10mb", DLT_RAW: "raw"}

# ---------------------------------------------------------------------------------------------
# bpf_hdr records (pure)

#: ``struct bpf_hdr``: ``struct timeval32 bh_tstamp`` (two int32 on LP64 macOS: BPF_TIMEVAL),
#: ``bh_caplen``, ``bh_datalen``, ``u_short bh_hdrlen``: 18 bytes in host byte order.  Records
#: start at word-aligned offsets; ``bh_hdrlen`` includes the padding that aligns the *network*
#: header (18 for Ethernet, 20 for DLT_NULL), so a reader must use it, never ``sizeof``.
BPF_HDR = struct.Struct("=iiIIH")
BPF_ALIGNMENT = 4  # sizeof(int32_t)

ETHERTYPE_IP, ETHERTYPE_IPV6 = 0x0800, 0x86DD
#: DLT_NULL address families: AF_INET is 2 everywhere; AF_INET6 is 30 on macOS, 24 on
#: NetBSD/OpenBSD, 28 on FreeBSD/DragonFly.
NULL_FAMILIES = {2: 4, 30: 6, 24: 6, 28: 6}
_NULL_AF = struct.Struct("=I")


def bpf_wordalign(n: int) -> int:
    """``BPF_WORDALIGN(x)``: round up to a multiple of ``BPF_ALIGNMENT``."""
    return (n + BPF_ALIGNMENT - 1) & ~(BPF_ALIGNMENT - 1)


def parse_records(buf: bytes | bytearray | memoryview, n: int, linktype: int) -> Iterator[memoryview]:
    """Yield the IP packet of each ``bpf_hdr`` record in the first ``n`` bytes of ``buf``.

    The link header is stripped: Ethernet (14 bytes, ethertype 0x0800/0x86DD), DLT_NULL (4 bytes,
    a known address family), DLT_RAW (none, version nibble 4 or 6).  Records of other protocols,
    records cut short by the snapshot length (``bh_caplen < bh_datalen``) and a last record that
    runs past ``n`` are skipped; a header whose ``bh_hdrlen`` is below its own size ends the walk
    (nothing after it can be located).  Raises ``ValueError`` for an unsupported link type.
    """
    if linktype not in _LINKS:
        raise ValueError(f"unsupported BPF link type {linktype}")
    view = memoryview(buf)[:n]
    n = len(view)
    off = 0
    while off + BPF_HDR.size <= n:
        _sec, _usec, caplen, datalen, hdrlen = BPF_HDR.unpack_from(view, off)
        if hdrlen < BPF_HDR.size:
            LOG.debug("bpf record at %d: bh_hdrlen %d is too short; dropping the rest of the buffer", off, hdrlen)
            return
        start = off + hdrlen
        end = start + caplen
        if end > n:
            return
        if caplen == datalen:
            pkt = _strip(view[start:end], linktype)
            if pkt is not None:
                yield pkt
        off = bpf_wordalign(end)


def _strip(frame: memoryview, linktype: int) -> memoryview | None:
    if linktype == DLT_EN10MB:
        if len(frame) < 14 or int.from_bytes(frame[12:14], "big") not in (ETHERTYPE_IP, ETHERTYPE_IPV6):
            return None
        return frame[14:]
    if linktype == DLT_NULL:
        if len(frame) < 4 or _NULL_AF.unpack_from(frame)[0] not in NULL_FAMILIES:
            return None
        return frame[4:]
    if not frame or frame[0] >> 4 not in (4, 6):
        return None
    return frame


# ---------------------------------------------------------------------------------------------
# The receive filter (pure)


def receiver_filter(plan: SteerPlan, linktype: int) -> cbpf.Program:
    """The classic BPF program a device on a link of ``linktype`` gets for ``plan``.  Raises
    ``SteerError`` for a link type rsockd cannot parse or a program macOS would refuse."""
    try:
        link, l3 = _LINKS[linktype]
    except KeyError:
        raise SteerError(f"bpfdev: link type {linktype} is not supported (Ethernet, loopback and raw IP are)") from None
    try:
        program = cbpf.tunnel_filter(plan.role, plan.tunnel_ports, plan.local_ports, plan.peers,
                                     l3_offset=l3, link=link)
    except ValueError as err:
        raise SteerError(f"bpfdev: receive filter: {err}") from None
    if len(program) > BPF_MAXINSNS:
        raise SteerError(f"bpfdev: receive filter needs {len(program)} instructions, macOS accepts {BPF_MAXINSNS}: "
                         "use fewer, contiguous tunnel ports")
    return program


# ---------------------------------------------------------------------------------------------
# pf: the anchor and pfctl's output (pure)

ANCHOR_PARENT = "com.apple"
ANCHOR_PREFIX = "100.rsockd."
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
LABEL_V4, LABEL_V6 = "steered_v4", "steered_v6"


def anchor_name(instance: str) -> str:
    """``com.apple/100.rsockd.<instance>``: see the module docstring for why there."""
    if not _NAME_RE.fullmatch(instance) or instance.startswith("."):
        raise SteerError(f"bpfdev: instance name {instance!r} cannot name a pf anchor")
    return f"{ANCHOR_PARENT}/{ANCHOR_PREFIX}{instance}"


def _pf_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _pf_ports(ports: Iterable[int]) -> str:
    """pf's port list: ``443``, ``10001:10010`` (``:`` includes both ends) or ``{ 80, 10001:10010 }``."""
    try:
        ranges = cbpf.port_ranges(ports)
    except ValueError as err:
        raise SteerError(f"bpfdev: {err}") from None
    return _pf_list([str(a) if a == b else f"{a}:{b}" for a, b in ranges]) if ranges else ""


def pf_anchor_rules(plan: SteerPlan) -> str:
    """The rules of the instance's anchor (see the module docstring).  Raises ``SteerError`` for
    a plan that cannot be written as pf rules (bad interface name, peer or port)."""
    name = anchor_name(plan.instance)
    for iface in plan.interfaces:
        if not _IFNAME_RE.fullmatch(iface):
            raise SteerError(f"bpfdev: {iface!r} is not an interface name")
    on = f"on {_pf_list(plan.interfaces)} " if plan.interfaces else ""
    tunnel = _pf_ports(plan.tunnel_ports)
    blocks: list[str] = []
    passes: list[str] = []
    if plan.role == "server":
        if tunnel:
            for af, label in (("inet", LABEL_V4), ("inet6", LABEL_V6)):
                blocks.append(f'block drop in quick {on}{af} proto tcp from any to any port {tunnel} label "{label}"')
            passes.append(f"pass out quick proto tcp from any port {tunnel} to any no state")
    elif plan.role == "client":
        local = _pf_ports(plan.local_ports)
        peers4, peers6 = ([str(a) for a in fam] for fam in split_peers(plan.peers, "bpfdev"))
        for af, peers, label in (("inet", peers4, LABEL_V4), ("inet6", peers6, LABEL_V6)):
            if not (peers and tunnel and local):
                continue
            hosts = _pf_list(peers)
            blocks.append(f'block drop in quick {on}{af} proto tcp from {hosts} port {tunnel} to any port {local} '
                          f'label "{label}"')
            passes.append(f"pass out quick {af} proto tcp from any port {local} to {hosts} port {tunnel} no state")
    else:
        raise SteerError(f"bpfdev: role {plan.role!r} is neither server nor client")
    head = (f"# {name}: rsockd {plan.role} instance {plan.instance}; written by rsockd at start, "
            "flushed at stop (do not edit)")
    return "\n".join([head, *blocks, *passes]) + "\n"


_TOKEN_RE = re.compile(r"^\s*Token\s*:\s*(\d+)\s*$", re.MULTILINE)
_ANCHOR_POINT_RE = re.compile(r'^\s*anchor\s+"' + re.escape(ANCHOR_PARENT) + r'/\*"', re.MULTILINE)
_LABEL_LINE_RE = re.compile(r"^(\S+)((?:\s+\d+){7})\s*$", re.MULTILINE)


def parse_token(output: str) -> str | None:
    """The reference token ``pfctl -E`` prints (``pf enabled`` / ``Token : <n>`` on stderr)."""
    m = _TOKEN_RE.search(output)
    return m.group(1) if m else None


def has_anchor_point(main_rules: str) -> bool:
    """Whether ``pfctl -s rules`` (the main ruleset) calls ``anchor "com.apple/*"``."""
    return bool(_ANCHOR_POINT_RE.search(main_rules))


def parse_labels(output: str) -> dict[str, int]:
    """Packets per label from ``pfctl -s labels``: each line is ``label evaluations packets
    bytes in_packets in_bytes out_packets out_bytes``; rules with the same label add up."""
    out: dict[str, int] = {}
    for m in _LABEL_LINE_RE.finditer(output):
        numbers = m.group(2).split()
        out[m.group(1)] = out.get(m.group(1), 0) + int(numbers[1])
    return out


# Lines pfctl prints on success that are not worth repeating in an error.
_PFCTL_NOISE = ("No ALTQ support in kernel", "ALTQ related functions disabled", "pfctl: Use of -f option",
                "present in the main ruleset", "See /etc/pf.conf")


def _reason(out: str, err: str, rc: int) -> str:
    for text in (err, out):
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith(_PFCTL_NOISE):
                return line
    return f"exit status {rc}"


# ---------------------------------------------------------------------------------------------
# pfctl and the token file


class Pfctl:
    """Runs ``pfctl``; ``SteerError`` with pfctl's own complaint when it fails."""

    def __init__(self, path: str = PFCTL, timeout: float = 15.0) -> None:
        self.path = path
        self.timeout = timeout

    def run(self, *args: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``pfctl *args`` with ``stdin`` as its input; ``check``: raise on a non-zero exit."""
        try:
            res = subprocess.run([self.path, *args], input=stdin, capture_output=True, text=True,
                                 timeout=self.timeout, check=False)
        except FileNotFoundError:
            raise SteerError(f"bpfdev: {self.path} not found (pf is part of macOS)") from None
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SteerError(f"bpfdev: pfctl {' '.join(args)}: {err}") from None
        if check and res.returncode != 0:
            raise SteerError(f"bpfdev: pfctl {' '.join(args)}: {_reason(res.stdout, res.stderr, res.returncode)}")
        return res

    def release(self, token: str) -> bool:
        """``pfctl -X <token>``; a token pf no longer knows (pf disabled with ``-d`` since, which
        drops every reference) is only logged."""
        res = self.run("-X", token, check=False)
        if res.returncode != 0:
            LOG.warning("pf: releasing enable reference %s failed: %s", token,
                        _reason(res.stdout, res.stderr, res.returncode))
            return False
        return True


class TokenFile:
    """``<state_dir>/<instance>.pf-token``: the pf reference an instance holds."""

    def __init__(self, state_dir: str, instance: str) -> None:
        self.path = os.path.join(state_dir, f"{instance}.pf-token")

    def read(self) -> str | None:
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        except OSError as err:
            LOG.warning("pf: cannot read %s: %s", self.path, err.strerror)
            return None
        return text if text.isdigit() else None

    def write(self, token: str) -> None:
        """Atomically (rename); raises ``OSError``."""
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Never raises: a file that cannot be removed is logged (the next start would release
        a reference pf no longer has, which is only a warning)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            LOG.warning("pf: cannot remove %s: %s", self.path, err.strerror)


def _release_stale_token(pf: Pfctl, tokens: TokenFile) -> str | None:
    token = tokens.read()
    if token is None:
        return None
    pf.release(token)
    tokens.remove()
    return token


def cleanup_stale(instance: str, *, pfctl: str = PFCTL, state_dir: str = STATE_DIR) -> list[str]:
    """At start: flush the anchor and release the pf reference a dead daemon of ``instance``
    left.  Returns what was removed (for the log)."""
    pf = Pfctl(pfctl)
    anchor = anchor_name(instance)
    removed: list[str] = []
    shown = pf.run("-a", anchor, "-s", "rules", check=False)  # fails for an anchor that does not exist
    if shown.returncode == 0 and shown.stdout.strip():
        pf.run("-a", anchor, "-F", "rules")
        removed.append(f"pf anchor {anchor}")
    token = _release_stale_token(pf, TokenFile(state_dir, instance))
    if token is not None:
        removed.append(f"pf enable reference {token}")
    for what in removed:
        LOG.info("removed stale %s", what)
    return removed


def bpfdev_available(*, pfctl: str = PFCTL, dev_glob: str = DEV_GLOB, platform: str = sys.platform) -> str | None:
    """None if this backend can work here, else a one-line reason."""
    if platform != "darwin":
        return "bpfdev: BPF devices and pf anchors are the macOS backend"
    if not os.access(pfctl, os.X_OK):
        return f"bpfdev: {pfctl} not found"
    if not glob.glob(dev_glob):
        return f"bpfdev: no BPF device matches {dev_glob}"
    if os.geteuid() != 0:
        return "bpfdev: BPF devices and pf need root"
    return None


# ---------------------------------------------------------------------------------------------
# BPF devices

Ioctl = Callable[[int, int, bytes], bytes]


def _fcntl_ioctl(fd: int, request: int, arg: bytes) -> bytes:
    return fcntl.ioctl(fd, request, arg)


def device_paths(dev_glob: str) -> list[str]:
    """The devices ``dev_glob`` matches, in unit order (``/dev/bpf``, ``bpf0``, ``bpf1``, ... ``bpf10``)."""
    def key(path: str) -> tuple[str, int]:
        m = re.match(r"(.*?)(\d*)$", path)
        assert m is not None
        return m.group(1), int(m.group(2)) if m.group(2) else -1

    return sorted(glob.glob(dev_glob), key=key)


def open_free(paths: Sequence[str], opener: Callable[[str, int], int] = os.open) -> tuple[int, str]:
    """Open the first device not in use (a busy one fails with EBUSY).  macOS creates another
    ``/dev/bpfN`` when the last one is opened, so there is normally always a free one."""
    busy = 0
    for path in paths:
        try:
            return opener(path, os.O_RDONLY), path
        except OSError as err:
            if err.errno == errno.EBUSY:
                busy += 1
                continue
            if err.errno == errno.ENOENT:
                continue
            if err.errno in (errno.EACCES, errno.EPERM):
                raise SteerError(f"bpfdev: {path}: permission denied (run as root)") from None
            raise SteerError(f"bpfdev: {path}: {err.strerror}") from None
    raise SteerError(f"bpfdev: no free BPF device ({busy} of {len(paths)} busy)")


def _uint(value: int) -> bytes:
    return bytes(ctypes.c_uint(value))


def _get_uint(data: bytes) -> int:
    return ctypes.c_uint.from_buffer_copy(data).value


class BpfDevice:
    """An open, attached BPF device: a ``Receiver`` yielding the IP packets it captures."""

    shared = False  # the pf anchor blocks every tunnel segment from the kernel

    def __init__(self, fd: int, path: str, interface: str, linktype: int, bufsize: int,
                 ioctl: Ioctl = _fcntl_ioctl) -> None:
        self.fd = fd
        self.path = path
        self.interface = interface
        self.linktype = linktype
        self.bufsize = bufsize
        self._ioctl = ioctl
        self._buf = bytearray(bufsize)  # bpfread wants exactly bd_bufsize

    def fileno(self) -> int:
        return self.fd

    def packets(self, buf: bytearray) -> Iterator[tuple[memoryview, bool]]:
        """Read what is ready and yield each captured IP packet (its checksum always to be
        checked).  ``buf`` is not used: a BPF device must be read with a buffer of exactly its
        own size, which the device keeps."""
        for _ in range(READS_PER_WAKEUP):
            try:
                n = os.readv(self.fd, [self._buf])
            except (BlockingIOError, InterruptedError):
                return
            if n <= 0:
                return
            for pkt in parse_records(self._buf, n, self.linktype):
                yield pkt, False

    def set_filter(self, program: cbpf.Program) -> None:
        """``BIOCSETF``: replace the filter (xnu also flushes the buffer and the counters)."""
        insns = ctypes.create_string_buffer(program.pack(), len(program) * cbpf.SOCK_FILTER.size)
        prog = BpfProgram(len(program), ctypes.addressof(insns))
        self._ioctl(self.fd, BIOCSETF, bytes(prog))
        del insns  # the kernel copied the instructions during the call

    def stats(self) -> tuple[int, int]:
        """``BIOCGSTATS``: (packets seen by the filter, packets dropped for want of room)."""
        s = BpfStat.from_buffer_copy(self._ioctl(self.fd, BIOCGSTATS, bytes(BpfStat())))
        return s.bs_recv, s.bs_drop

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_device(interface: str, plan: SteerPlan, *, dev_glob: str = DEV_GLOB, bufsize: int = BUFSIZE,
                ioctl: Ioctl = _fcntl_ioctl, opener: Callable[[str, int], int] = os.open) -> BpfDevice:
    """Open a free BPF device, attach it to ``interface`` and install ``plan``'s filter for the
    interface's link type.  Raises ``SteerError``; on failure the device is closed.

    ``BIOCSSEESENT`` 0 keeps our own outgoing segments out (they cross the same tap), except on
    loopback, where xnu taps each packet once, in the output direction (``lo_output``), so a
    device that did not see sent packets would see nothing there.
    """
    fd, path = open_free(device_paths(dev_glob), opener)
    where = f"bpfdev: {path} on {interface}"
    try:
        v = BpfVersion.from_buffer_copy(ioctl(fd, BIOCVERSION, bytes(BpfVersion())))
        if v.bv_major != BPF_MAJOR_VERSION or v.bv_minor < BPF_MINOR_VERSION:
            raise SteerError(f"{where}: kernel BPF version {v.bv_major}.{v.bv_minor}, need "
                             f"{BPF_MAJOR_VERSION}.{BPF_MINOR_VERSION}")
        ioctl(fd, BIOCSBLEN, _uint(bufsize))  # before BIOCSETIF: the buffers are allocated there
        ifr = Ifreq()
        ifr.ifr_name = interface.encode()
        try:
            ioctl(fd, BIOCSETIF, bytes(ifr))
        except OSError as err:
            if err.errno == errno.ENXIO:
                raise SteerError(f"bpfdev: interface {interface} does not exist") from None
            raise
        dlt = _get_uint(ioctl(fd, BIOCGDLT, _uint(0)))
        program = receiver_filter(plan, dlt)
        ioctl(fd, BIOCIMMEDIATE, _uint(1))  # wake the reader per packet, not per full buffer
        if not interface.startswith("lo"):
            ioctl(fd, BIOCSSEESENT, _uint(0))
        size = _get_uint(ioctl(fd, BIOCGBLEN, _uint(0)))
        device = BpfDevice(fd, path, interface, dlt, size, ioctl)
        device.set_filter(program)
        os.set_blocking(fd, False)
    except SteerError:
        os.close(fd)
        raise
    except OSError as err:
        os.close(fd)
        raise SteerError(f"{where}: {err.strerror or err}") from None
    LOG.debug("%s: link %s, buffer %d bytes, filter %d instructions", where, LINK_NAMES[dlt], size, len(program))
    return device


# ---------------------------------------------------------------------------------------------
# The backend


@dataclass
class _Attached:
    anchor: str
    token: str | None = None


class BpfDevSteering:
    """The ``bpfdev`` steering backend (see the module docstring)."""

    name = "bpfdev"

    def __init__(self, plan: SteerPlan, *, pfctl: str = PFCTL, dev_glob: str = DEV_GLOB,
                 state_dir: str = STATE_DIR, bufsize: int = BUFSIZE, ioctl: Ioctl = _fcntl_ioctl,
                 opener: Callable[[str, int], int] = os.open) -> None:
        self.plan = plan
        self._pf = Pfctl(pfctl)
        self._dev_glob = dev_glob
        self._state_dir = state_dir
        self._bufsize = bufsize
        self._ioctl = ioctl
        self._opener = opener
        self._devices: dict[str, BpfDevice] = {}
        self._attached: _Attached | None = None
        self._rx_dropped = 0

    @property
    def anchor(self) -> str:
        return anchor_name(self.plan.instance)

    def _tokens(self, instance: str | None = None) -> TokenFile:
        return TokenFile(self._state_dir, instance or self.plan.instance)

    def attach(self) -> None:
        """Open the devices, load the anchor, take a pf reference.  Raises ``SteerError``; on
        failure nothing of ours is left (rules flushed, reference released, devices closed)."""
        plan = self.plan
        if not plan.interfaces:
            raise SteerError(f"bpfdev: anchor {self.anchor}: no interface to receive on")
        rules = pf_anchor_rules(plan)  # a bad plan fails before anything is touched
        self._close_devices()
        stale = _release_stale_token(self._pf, self._tokens())
        if stale is not None:
            LOG.info("pf: released the enable reference %s a previous daemon left", stale)
        state = _Attached(self.anchor)
        loaded = False
        try:
            for iface in plan.interfaces:
                self._devices[iface] = self._open(iface, plan)
            if not has_anchor_point(self._pf.run("-s", "rules").stdout):
                raise SteerError(f'bpfdev: the main pf ruleset has no anchor "{ANCHOR_PARENT}/*", so anchor '
                                 f"{state.anchor} would not be evaluated: reload Apple's ruleset with "
                                 "sudo pfctl -f /etc/pf.conf (or add that line to your own)")
            loaded = True  # a failed load may leave the previous rules: flush them too
            self._pf.run("-a", state.anchor, "-f", "-", stdin=rules)
            enabled = self._pf.run("-E")
            state.token = parse_token(enabled.stderr + enabled.stdout)  # stderr, in Apple's pfctl
            if state.token is None:
                raise SteerError("bpfdev: pfctl -E printed no reference token: "
                                 f"{_reason(enabled.stdout, enabled.stderr, 0)}")
            try:
                self._tokens().write(state.token)
            except OSError as err:
                raise SteerError(f"bpfdev: cannot record the pf reference in {self._tokens().path}: "
                                 f"{err.strerror}") from None
        except BaseException:
            self._undo(state, loaded)
            raise
        self._attached = state
        LOG.info("bpfdev: pf anchor %s loaded (reference %s); receiving on %s", state.anchor, state.token,
                 ", ".join(f"{d.interface} ({d.path}, {LINK_NAMES[d.linktype]})" for d in self._devices.values()))

    def _open(self, iface: str, plan: SteerPlan) -> BpfDevice:
        return open_device(iface, plan, dev_glob=self._dev_glob, bufsize=self._bufsize, ioctl=self._ioctl,
                           opener=self._opener)

    def _undo(self, state: _Attached, loaded: bool) -> None:
        """Reverse a partial attach; never raises (the original error is what the user needs)."""
        try:
            if loaded:
                self._pf.run("-a", state.anchor, "-F", "rules")
        except SteerError as err:
            LOG.error("%s", err)
        try:
            if state.token is not None:
                self._pf.release(state.token)
        except SteerError as err:
            LOG.error("%s", err)
        if state.token is not None:
            self._tokens().remove()
        self._close_devices()

    def update(self, plan: SteerPlan) -> None:
        """Apply a changed plan: the anchor reloaded in one ``pfctl -f`` (atomic), new filters on
        the devices, devices opened and closed as interfaces come and go."""
        state = self._attached
        if state is None:
            self.plan = plan
            return
        if not plan.interfaces:
            raise SteerError(f"bpfdev: anchor {anchor_name(plan.instance)}: no interface to receive on")
        rules = pf_anchor_rules(plan)
        added: dict[str, BpfDevice] = {}
        try:
            programs = {d.linktype: receiver_filter(plan, d.linktype) for d in self._devices.values()}
            for iface in plan.interfaces:
                if iface not in self._devices:
                    added[iface] = self._open(iface, plan)
            new_anchor = anchor_name(plan.instance)
            self._pf.run("-a", new_anchor, "-f", "-", stdin=rules)
        except BaseException:
            for d in added.values():
                d.close()
            raise
        if new_anchor != state.anchor:
            self._pf.run("-a", state.anchor, "-F", "rules", check=False)
            if state.token is not None:
                self._tokens(self.plan.instance).remove()
                try:
                    self._tokens(plan.instance).write(state.token)
                except OSError as err:
                    LOG.warning("pf: cannot record the reference in %s: %s", self._tokens(plan.instance).path,
                                err.strerror)
            state.anchor = new_anchor
        for iface, dev in list(self._devices.items()):
            self._bank(dev)
            if iface in plan.interfaces:
                try:
                    dev.set_filter(programs[dev.linktype])
                except OSError as err:
                    raise SteerError(f"bpfdev: {dev.path} on {iface}: filter: {err.strerror}") from None
            else:
                dev.close()
                del self._devices[iface]
        self._devices.update(added)
        self.plan = plan

    def receivers(self) -> list[Receiver]:
        return list(self._devices.values())

    def counters(self) -> dict[str, int]:
        """``steered_v4``/``steered_v6``: segments the anchor kept from the kernel (its labelled
        block rules); extra ``receiver_dropped``: segments a full device buffer lost."""
        out = {LABEL_V4: 0, LABEL_V6: 0, "guard_dropped": 0,
               "receiver_dropped": self._rx_dropped + sum(self._drops(d) for d in self._devices.values())}
        if self._attached is not None:
            labels = parse_labels(self._pf.run("-a", self._attached.anchor, "-s", "labels", check=False).stdout)
            out[LABEL_V4] = labels.get(LABEL_V4, 0)
            out[LABEL_V6] = labels.get(LABEL_V6, 0)
        return out

    def tick(self, wall: float) -> None:
        pass  # nothing here depends on the time

    def forget(self, conns: Iterable[tuple[str, int, str, int]]) -> None:
        pass  # the ports are not shared here

    def describe(self) -> list[dict[str, str]]:
        anchor = self._attached.anchor if self._attached else self.anchor
        out = []
        for iface in self.plan.interfaces:
            d = self._devices.get(iface)
            entry: dict[str, str] = {"interface": iface, "mode": "bpfdev", "anchor": anchor}
            if d is not None:
                entry["device"] = d.path
                entry["link"] = LINK_NAMES.get(d.linktype, str(d.linktype))
            out.append(entry)
        return out

    def detach(self) -> None:
        """Close the devices, flush the anchor, release the pf reference; idempotent.  A flush
        that fails is raised after the rest is done."""
        self._close_devices()
        state, self._attached = self._attached, None
        anchor = state.anchor if state is not None else self.anchor
        failure: SteerError | None = None
        try:
            self._pf.run("-a", anchor, "-F", "rules")
        except SteerError as err:
            failure = err
        token = state.token if state is not None else None
        if token is not None:
            self._pf.release(token)
            self._tokens().remove()
        if failure is not None:
            raise failure

    def _drops(self, dev: BpfDevice) -> int:
        try:
            return dev.stats()[1]
        except OSError:
            return 0

    def _bank(self, dev: BpfDevice) -> None:
        """Keep a device's drop count before BIOCSETF or close resets or loses it."""
        self._rx_dropped += self._drops(dev)

    def _close_devices(self) -> None:
        for dev in self._devices.values():
            self._bank(dev)
            dev.close()
        self._devices.clear()
