"""Steering backends: keep the kernel's TCP stack away from tunnel segments and hand them to us.

One backend per module, all behind the ``Steering`` protocol; each imports its platform
libraries (bcc, nftables, macOS ioctls) inside its own module, so importing this
package loads none of them.

- ``xdp``   (Linux): XDP rewrites tunnel segments into UDP in place; they land on the daemon's
            UDP sockets.  A TC egress guard drops kernel RST/ACK.  Needs bcc + kernel headers.
- ``nft``   (Linux): an nftables table keeps rsockd's own connections from the TCP stack (a SYN
            queue checks each SYN's tag first, ``nfqueue``); an AF_PACKET socket with a classic
            BPF filter receives them.  Everything else on the ports is the kernel's.  No bcc needed.
- ``bpfdev`` (macOS): a BPF device with a classic BPF filter receives; a pf anchor blocks.

The daemon owns the UDP sockets (they are needed for the ``udp`` transport anyway); a backend
only owns what it attaches and, for capture backends, its packet sockets.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..core.faketcp import Role

#: Counter names every backend reports (missing ones read as 0).
STEER_COUNTERS = (
    "steered_v4",  # tunnel segments handed to userspace, IPv4
    "steered_v6",  # ... IPv6
    "passed_malformed",  # matched the ports but malformed (bad data offset, truncated): left to the kernel
    "passed_fragment",  # IP fragments on tunnel ports: left to the kernel
    "passed_ip_options",  # IPv4 options / IPv6 extension headers on tunnel ports: left to the kernel
    "guard_dropped",  # kernel-made RST/ACK from tunnel ports dropped on egress
    "syn_limited",  # server: SYNs to tunnel ports over syn_rate/syn_burst, dropped before userspace
    "passed_transit",  # on tunnel ports but routed through this host, not to it: left to the kernel
    "passed_probe",  # on tunnel ports but of no connection of ours (an untagged SYN, a probe): left to the kernel
)


@dataclass(frozen=True)
class SteerPlan:
    """What to steer.  The same plan type serves every backend.

    Server: segments whose destination port is in ``tunnel_ports``.
    Client: segments from an address in ``peers`` whose source port is in ``tunnel_ports`` and
    whose destination port is in ``local_ports``.

    ``receive_ports`` (server): with several workers, each worker's capture sockets receive only
    its own share of the tunnel ports (rsockd/service/worker.py).

    ``syn_rate``/``syn_burst`` (server): SYNs per second, and the burst, that the backend lets
    through to the daemon; 0 is no limit.  Only the xdp backend can enforce them
    (docs/design.md, "SYN admission").

    Port sharing (docs/security.md): ``syn_key`` (server) is the SYN tag key
    (``Keyring.syn_key``; empty: the default key's, ``core/syntag.py``): only a SYN with its tag
    makes a connection rsockd's, and ``conn_timeout`` is how long the nft backend keeps such a
    connection steered without a segment.  ``conns`` (client) are the client's own connections
    as ``(local address, local port, server address, server port)``: only their segments are
    ours.  Everything else on the ports is the kernel's.
    """

    instance: str
    role: Role
    interfaces: tuple[str, ...]
    tunnel_ports: frozenset[int]
    local_ports: frozenset[int] = frozenset()
    peers: frozenset[str] = frozenset()  # textual IPv4/IPv6 addresses (client role)
    mark: int = 0x72736B64  # SO_MARK of our raw sends; the guard lets these through
    xdp_mode: Literal["auto", "native", "skb"] = "auto"
    syn_rate: int = 0  # server: SYNs/s passed to userspace, all CPUs together; 0: no limit
    syn_burst: int = 0  # server: SYNs the bucket holds when full
    receive_ports: frozenset[int] = frozenset()  # server, capture backends: the ports this process reads; empty: all
    syn_key: bytes = b""  # server: the SYN tag key (core/syntag.py); empty: the default key's
    conn_timeout: int = 60  # server, nft: seconds a connection stays steered without a segment
    conns: frozenset[tuple[str, int, str, int]] = frozenset()  # client: (local, lport, server, port) of each connection
    extra: dict[str, str] = field(default_factory=dict, compare=False)


class Receiver(Protocol):
    """A capture source: a readable file descriptor that yields whole L3 packets.

    ``shared``: the kernel's TCP also receives what this source sees, except rsockd's own
    connections (port sharing): a segment for no connection is the kernel's to answer.
    """

    shared: bool

    def fileno(self) -> int: ...

    def packets(self, buf: bytearray) -> Iterator[tuple[memoryview, bool]]:
        """Read what is ready (non-blocking, bounded) into ``buf``; yield each packet, IP header
        first, and whether its TCP checksum is still to be filled in by a device of this host (a
        local sender's, with offload: not to be checked).  A yielded view is valid until the next
        item is requested."""
        ...


SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 1 << 3  # the checksum is left to the device (a local sender's, over a veth)
_AUXDATA = socket.CMSG_SPACE(20)  # struct tpacket_auxdata


class PacketSocketReceiver:
    """A Linux ``AF_PACKET``/``SOCK_DGRAM`` socket: one packet per read, already L3.

    A segment whose checksum is not filled in yet (``TP_STATUS_CSUMNOTREADY``: sent by a program
    of this host with checksum offload, across a veth, as the packet send path does) is yielded
    as such: the field holds only a partial sum, and the data never left the host.
    """

    def __init__(self, sock: socket.socket, batch: int = 256, shared: bool = False, budget: int = 256 << 10) -> None:
        self.sock = sock
        self.batch = batch
        self.budget = budget  # bytes per call: a read may be a GSO packet of 64 segments
        self.shared = shared
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)

    def fileno(self) -> int:
        return self.sock.fileno()

    def packets(self, buf: bytearray) -> Iterator[tuple[memoryview, bool]]:
        view = memoryview(buf)
        recvmsg_into = self.sock.recvmsg_into
        got = 0
        for _ in range(self.batch):
            if got >= self.budget:
                return
            try:
                n, anc, _flags, _addr = recvmsg_into((buf,), _AUXDATA)
            except (BlockingIOError, InterruptedError):
                return
            got += n
            yield view[:n], bool(anc) and bool(int.from_bytes(anc[0][2][:4], sys.byteorder) & TP_STATUS_CSUMNOTREADY)


def split_peers(peers: Iterable[str], backend: str) -> tuple[list[ipaddress.IPv4Address],
                                                             list[ipaddress.IPv6Address]]:
    """Peers as sorted IPv4 and IPv6 addresses; a one-line ``SteerError`` for one that is not an address."""
    from ..errors import SteerError

    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    for p in peers:
        try:
            a = ipaddress.ip_address(p)
        except ValueError:
            raise SteerError(f"{backend}: peer {p!r} is not an IP address") from None
        if isinstance(a, ipaddress.IPv4Address):
            v4.add(a)
        else:
            v6.add(a)
    return sorted(v4), sorted(v6)


class Steering(Protocol):
    """A steering backend.  Every method is synchronous and quick except ``attach``."""

    name: str

    def attach(self) -> None:
        """Remove stale state of the same instance, then attach.  Raises ``SteerError``.

        On failure nothing of ours is left attached.
        """

    def update(self, plan: SteerPlan) -> None:
        """Apply a changed plan (ports, peers, local ports) to what is attached."""

    def receivers(self) -> list[Receiver]:
        """Capture sources delivering whole L3 packets (IP header first); [] for xdp."""

    def counters(self) -> dict[str, int]:
        """Counters named as in ``STEER_COUNTERS`` (and backend extras)."""

    def describe(self) -> list[dict[str, str]]:
        """One entry per interface, e.g. ``{"interface": "eth0", "mode": "native"}``."""

    def tick(self, wall: float) -> None:
        """Called about once a second with the wall clock: what depends on time (the SYN tag's slot)."""

    def forget(self, conns: Iterable[tuple[str, int, str, int]]) -> None:
        """Server: these connections, ``(local, lport, peer, pport)``, ended: their 4-tuples are
        the kernel's again (port sharing), so a late segment meets the kernel's RST."""

    def detach(self) -> None:
        """Remove everything attached; idempotent; never raises for state already gone."""
