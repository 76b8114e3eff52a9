"""The host's TCP as a passive observer sees it: what a connection copies so that its segments are
ones the host's own kernel could have sent.  Pure: the daemon reads the host's settings
(``rsockd.dataplane.hostprofile``) and passes them in.

A passive fingerprint (p0f, Zeek, a DPI box) reads the SYN and SYN-ACK: the option layout, the
MSS, the window and window scale, the TTL and how the IPv4 ID behaves.  Linux derives the window
and scale from the receive buffer settings and the MSS (``tcp_select_initial_window()`` in
net/ipv4/tcp_output.c); after the handshake the window grows as data arrives
(``tcp_grow_window()`` in net/ipv4/tcp_input.c).  IPv4 IDs come from a per-socket counter that
starts at a random number (``inet_id``, set in ``tcp_v4_connect()`` and
``tcp_v4_syn_recv_sock()``); a DF packet of no socket (the SYN-ACK of a request socket, a reset of
the control socket) carries 0.  The rules here follow those functions.

A profile whose ``stack`` is ``"darwin"`` copies macOS (XNU) instead, in what p0f reads: the SYN
and SYN-ACK options in XNU's order (``build_options_darwin``), their window (the receive buffer's
space, at most 65535, not rounded to the MSS: ``tcp_output()``), the window scale of
``tcp_set_max_rwinscale()`` (bsd/netinet/tcp_subr.c), and an IPv4 ID in the SYN-ACK (XNU answers a
SYN from the new connection's own socket).  After the handshake its window grows as Linux's.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from .packet import build_options, build_options_darwin

U16_MAX = 0xFFFF
TCP_MAX_WSCALE = 14  # RFC 7323 §2.3
MAX_SIGNED_WINDOW = 32767  # MAX_TCP_WINDOW: tcp_workaround_signed_windows
TS_OPTION_SPACE = 12  # TCPOLEN_TSTAMP_ALIGNED: what timestamps take from each segment's payload
FLOW_LABEL_MASK = 0xFFFFF

#: Whose TCP a profile copies.
Stack = Literal["linux", "darwin"]
#: macOS's defaults: ``net.inet.tcp.recvspace`` and ``net.inet.tcp.win_scale_factor``.
DARWIN_RECVSPACE = 131072
DARWIN_WIN_SCALE_FACTOR = 3
#: ``net.inet.tcp.autorcvbufmax`` when the host's cannot be read: the value for which XNU's rule
#: gives the window scale of p0f 3.09b's newest Mac OS X SYN signature (4, "MacOS X 10.9 or
#: newer"); a Mac's own setting replaces it (1 MiB gives scale 5, 2 MiB 6).
DARWIN_AUTORCVBUF_MAX = 512 * 1024


@dataclass(frozen=True, slots=True)
class TcpProfile:
    """The host's TCP settings (Linux sysctl names; defaults are Linux's; ``darwin()`` for macOS).

    ``rmem_default``/``rmem_max`` are ``net.ipv4.tcp_rmem[1]``/``[2]`` (a new socket's receive buffer
    and what autotuning may grow it to), ``core_rmem_max`` is ``net.core.rmem_max``.  On macOS they
    are ``net.inet.tcp.recvspace`` and ``net.inet.tcp.autorcvbufmax``.
    """

    rmem_default: int = 131072
    rmem_max: int = 6291456
    core_rmem_max: int = 212992
    window_scaling: bool = True  # net.ipv4.tcp_window_scaling
    timestamps: bool = True  # net.ipv4.tcp_timestamps != 0
    sack: bool = True  # net.ipv4.tcp_sack
    signed_windows: bool = False  # net.ipv4.tcp_workaround_signed_windows
    #: Keys the timestamp clock of each pair of addresses, as the kernel's boot-time ``ts_secret``.
    secret: bytes = field(default_factory=lambda: os.urandom(16), repr=False)
    #: Whose SYN and SYN-ACK the segments copy: option layout, window, window scale, IPv4 ID.
    stack: Stack = "linux"
    #: macOS's ``net.inet.tcp.win_scale_factor``: the least window scale XNU offers.
    win_scale_factor: int = DARWIN_WIN_SCALE_FACTOR

    @classmethod
    def darwin(cls, **settings: Any) -> TcpProfile:
        """A macOS profile: its defaults, with ``settings`` (the host's, where read) over them."""
        base: dict[str, Any] = {"stack": "darwin", "rmem_default": DARWIN_RECVSPACE,
                                "rmem_max": DARWIN_AUTORCVBUF_MAX}
        return cls(**(base | settings))

    @property
    def synack_ip_id(self) -> bool:
        """Whether a SYN-ACK carries an IPv4 ID from the connection's counter.  XNU answers from the
        new connection's own socket (p0f's Mac OS X ``[tcp:response]`` signatures say ``id+``);
        Linux from a request socket, whose DF packets carry 0."""
        return self.stack == "darwin"

    def handshake_options(self, *, mss: int, sack_permitted: bool, timestamps: tuple[int, int] | None,
                          wscale: int | None) -> bytes:
        """The options of a SYN or SYN-ACK, in the stack's order and padding."""
        build = build_options_darwin if self.stack == "darwin" else build_options
        return build(mss=mss, sack_permitted=sack_permitted, timestamps=timestamps, wscale=wscale)

    def win_from_space(self, space: int) -> int:
        """The window a buffer of ``space`` bytes offers: half of it, the kernel's default share
        (``tcp_adv_win_scale`` 1 before Linux 6.6, the initial ``scaling_ratio`` since)."""
        return space - (space >> 1)

    def ts_offset(self, local: bytes, remote: bytes) -> int:
        """``secure_tcp_ts_off()``: the timestamp offset of every connection between two addresses.

        One clock per pair, as Linux's: a fingerprinter that sees clocks jump between connections
        from one address (p0f's "host change") would see a different host in each.  Random to
        anyone without the secret, so the timestamps do not tell the host's uptime.
        """
        digest = hashlib.blake2b(local + remote, key=self.secret, digest_size=4).digest()
        return int.from_bytes(digest, "big")

    def initial_window(self, mss: int, wscale_ok: bool) -> tuple[int, int]:
        """``tcp_select_initial_window()``: a new connection's receive window and window scale.

        ``mss`` is what a segment of the connection carries: the advertised MSS, less the
        timestamp option when the peer's SYN carried one (a SYN-ACK's window is rounded to that).
        """
        if self.stack == "darwin":
            return self._xnu_initial_window(wscale_ok)
        clamp = U16_MAX << TCP_MAX_WSCALE  # no SO_RCVBUF clamp: the largest scaled window
        space = min(clamp, self.win_from_space(self.rmem_default))  # tcp_full_space()
        if space > mss:
            space -= space % mss  # a whole number of segments
        rcv_wnd = min(space, MAX_SIGNED_WINDOW if self.signed_windows else U16_MAX)
        wscale = 0
        if wscale_ok:
            # Scale for the largest window the buffer may grow to.
            most = min(max(space, self.rmem_max, self.core_rmem_max), clamp)
            wscale = max(0, min(TCP_MAX_WSCALE, most.bit_length() - 1 - 15))
        return rcv_wnd, wscale

    def _xnu_initial_window(self, wscale_ok: bool) -> tuple[int, int]:
        """XNU's handshake window and scale.  ``tcp_output()`` offers the receive buffer's space,
        at most ``TCP_MAXWIN`` (a SYN's window is never scaled, RFC 7323 §2.2), not rounded to the
        MSS; ``tcp_set_max_rwinscale()`` takes at least ``win_scale_factor`` and enough scale for
        ``TCP_MAXWIN`` to reach what autotuning may grow the buffer to."""
        rcv_wnd = min(self.rmem_default, U16_MAX)
        wscale = 0
        if wscale_ok:
            wscale = max(0, min(TCP_MAX_WSCALE, self.win_scale_factor))
            while wscale < TCP_MAX_WSCALE and (U16_MAX << wscale) < self.rmem_max:
                wscale += 1
        return rcv_wnd, wscale


class ReceiveWindow:
    """The window a Linux receiver whose reader keeps up advertises after the handshake.

    It starts at the handshake's window and grows by two segments for each data segment that
    arrives (``tcp_grow_window()``), up to what a receive buffer autotuned to ``tcp_rmem[2]``
    offers; it never shrinks (RFC 9293 §3.8.6.2.2).  Unlike Linux at a low RTT it reaches that
    ceiling whatever the RTT: rsockd does not flow-control the peer, so the window must stay ahead
    of what the peer sends for a middlebox that tracks windows (conntrack) to accept it.
    """

    __slots__ = ("_step", "clamp", "field", "wnd", "wscale")

    def __init__(self, profile: TcpProfile, rcv_wnd: int, wscale: int, mss: int) -> None:
        self.wnd = rcv_wnd
        self.wscale = wscale
        self.clamp = max(rcv_wnd, min(profile.win_from_space(profile.rmem_max), U16_MAX << wscale))
        self._step = 2 * mss
        self.field = 0  # the header's window field
        self._update()

    def _update(self) -> None:
        unit = 1 << self.wscale
        # __tcp_select_window(): rounded up to the scale's unit, so that scaling does not lose it.
        self.field = min((self.wnd + unit - 1) >> self.wscale, U16_MAX)

    def received(self, length: int) -> None:
        """A data segment of ``length`` bytes arrived."""
        if self.wnd < self.clamp and length:
            self.wnd = min(self.clamp, self.wnd + max(self._step, 2 * length))
            self._update()

    @property
    def bytes(self) -> int:
        """The advertised window in bytes (the field, scaled)."""
        return self.field << self.wscale


class IpIdent:
    """What the IP header of one connection's segments carries that the kernel picks per socket:
    the IPv4 identification and the IPv6 flow label.

    Linux sets DF on TCP, and numbers the IDs of a socket's packets from a random start, one per
    packet (one per segment of a GSO send); a request socket's SYN-ACK and the resets of no socket
    carry 0.  So: 0 until ``start()``, then a counter.  IPv6 packets carry a flow label drawn per
    connection (``sk_txhash``), drawn anew when a SYN is retransmitted.
    """

    __slots__ = ("_next", "label")

    def __init__(self) -> None:
        self._next = -1
        self.label = 0

    def start(self, rng: random.Random) -> None:
        """The connection has a socket now: its own counter from a random start.  Never 0: p0f
        reads a DF SYN with ID 0 as no counter (Linux draws 0 once in 65536)."""
        self._next = rng.randrange(1, 0x10000)

    def new_label(self, rng: random.Random) -> None:
        self.label = rng.randrange(1, FLOW_LABEL_MASK + 1)

    @property
    def counting(self) -> bool:
        """Whether IDs count (``start`` was called); until then every packet's is 0."""
        return self._next >= 0

    def peek(self) -> int:
        """The ID the next packet takes, without taking it; -1 while IDs do not count (all 0)."""
        return self._next

    def take(self, count: int = 1) -> int:
        """The ID of the next packet; ``count`` packets (a GSO batch) use it and the next ones."""
        v = self._next
        if v < 0:
            return 0
        self._next = (v + count) & 0xFFFF
        return v
