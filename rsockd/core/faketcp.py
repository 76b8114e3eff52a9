"""The fake-TCP connection: a sans-IO state machine (no sockets, no clock).

A connection is driven only by ``connect(now)`` (client), ``receive(hdr, payload, now)``,
``receive_datagram(payload, now)`` (``udp`` transport), ``send_datagram(...)``, ``close(...)``
and ``handle_timer(now)``.  Output is pulled: ``segments_to_send()``, ``get_timer()``,
``next_event()``.  ``now`` is a monotonic time in seconds; the wall clock (for the hello
timestamp) is ``now + clock_offset``.  ``Acceptor`` is the server's passive side: the half-open
table and the lookup of connections by address.

Rules (the table below encodes the state changes; everything else is a counted drop):

1. Handshake (RFC 9293 §3.5).  The client sends SYN with Linux's option set (MSS, SACK-permitted,
   timestamps, window scale); the server answers SYN-ACK echoing what the client offered; the
   client ACKs.  The data offset, options and window are what a stateful middlebox expects, and
   their values are the host kernel's (``TcpProfile``, rsockd/core/tcpprofile.py): a passive
   fingerprint of rsockd's SYN is the host's own.
2. Hello.  Once TCP is established the client sends a HELLO record, authenticated under its own
   random nonce; the server checks it (the owner decides: ``accept()`` or ``refuse()``) and
   answers HELLO_ACK.  Only then is the connection ESTABLISHED.  Half-open and hello-pending
   connections live in the Acceptor's bounded backlog and die after ``syn_timeout``.
3. Data.  Seq advances by payload length; every segment carries the latest ack (the highest
   sequence number seen); after ``ack_every`` data segments without sending anything, or
   ``ack_delay`` seconds, the receiver sends a pure ACK.  The window starts as the kernel's and
   grows with the data received as a Linux receiver's does (``ReceiveWindow``), far enough that
   a middlebox tracking windows (Linux conntrack without be_liberal) accepts one-way bulk.
   Timestamps tick at 1 kHz from an offset per pair of addresses, random to an observer.  There is no retransmission:
   the tunnel is a datagram service.
4. Liveness.  A KEEPALIVE record goes out after ``keepalive`` seconds without sending a record;
   ``dead_timeout`` seconds without an authenticated record kill the connection.
5. RST and FIN (RFC 5961 §3.2, §4).  Honoured when they carry an authenticated CLOSE record or
   their sequence number is exactly the next expected one.  An RST elsewhere in the window gets
   a challenge ACK; anything else is dropped.
6. Reconnect.  A client connection that closes for any reason but ``close()`` reconnects after a
   back-off that doubles from ``reconnect_min`` up to ``reconnect_max`` (±20 % jitter), and
   resets once a hello succeeds.

7. Retirement.  A server connection that a newer one replaced (the endpoint decides: same
   4-tuple, or same client id and connection index) closes silently with ``retire()``.

Segments leave with a TCP checksum field of 0: the send path fills it in, or has the kernel do
it (only the send path knows which).

With the ``udp`` transport there is no TCP: a connection starts in HELLO and its datagrams are
``UDP_MARKER`` followed by records.
"""

from __future__ import annotations

import random
import struct
from collections import Counter, deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from ..errors import FrameError, LocalProtocolError, PacketError
from . import framing, syntag
from .counters import new_drops
from .framing import CloseReason, FrameType, Hello, HelloAck, Keyring
from .packet import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpHeader,
    TcpOptions,
    parse_options,
)
from .tcpprofile import TS_OPTION_SPACE, IpIdent, ReceiveWindow, TcpProfile

Role = Literal["client", "server"]
Transport = Literal["tcp", "udp"]
HostPort = tuple[bytes, int]  # packed address, port

CHALLENGE_INTERVAL = 0.1  # at most 10 challenge ACKs a second per connection
MASK32 = 0xFFFFFFFF


class State(IntEnum):
    CLOSED = 0
    SYN_SENT = 1
    SYN_RCVD = 2
    HELLO = 3  # TCP established (or udp transport), hello exchange in progress
    ESTABLISHED = 4
    FIN_WAIT = 5  # we sent FIN; waiting for the peer's FIN


#: state -> input -> next state.  An input missing for a state is a bug (LocalProtocolError).
TRANSITIONS: dict[State, dict[str, State]] = {
    State.CLOSED: {"connect_tcp": State.SYN_SENT, "connect_udp": State.HELLO, "syn": State.SYN_RCVD,
                   "hello_udp": State.HELLO},
    State.SYN_SENT: {"synack": State.HELLO, "rst": State.CLOSED, "timeout": State.CLOSED,
                     "close": State.CLOSED, "retire": State.CLOSED},
    State.SYN_RCVD: {"ack": State.HELLO, "rst": State.CLOSED, "timeout": State.CLOSED,
                     "close": State.CLOSED, "retire": State.CLOSED},
    State.HELLO: {"hello_ok": State.ESTABLISHED, "rst": State.CLOSED, "fin": State.CLOSED,
                  "timeout": State.CLOSED, "close": State.CLOSED, "retire": State.CLOSED},
    State.ESTABLISHED: {"rst": State.CLOSED, "fin": State.CLOSED, "dead": State.CLOSED,
                        "close": State.CLOSED, "close_fin": State.FIN_WAIT, "retire": State.CLOSED},
    State.FIN_WAIT: {"fin": State.CLOSED, "rst": State.CLOSED, "timeout": State.CLOSED,
                     "close": State.CLOSED, "dead": State.CLOSED, "retire": State.CLOSED},
}


@dataclass(frozen=True, slots=True)
class Timing:
    """Every timer of a connection, in seconds."""

    keepalive: float = 5.0
    dead_timeout: float = 20.0
    syn_timeout: float = 5.0  # server: half-open / hello-pending lifetime
    rto: float = 1.0  # client: first SYN / hello retransmission
    retries: int = 4  # client: SYN / hello retransmissions before giving up
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    ack_delay: float = 0.02
    ack_every: int = 16
    fin_timeout: float = 2.0


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Connected:
    """The hello exchange completed: data may flow."""


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Server: an authenticated hello arrived; call ``accept()`` or ``refuse()``."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class FlowClosed:
    flow_id: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    reason: str
    reconnect_at: float | None = None


Event = Connected | HelloReceived | FlowClosed | ConnectionClosed


def seq_after(a: int, b: int) -> bool:
    """a > b in sequence space (RFC 1982 serial arithmetic on 32 bits)."""
    return 0 < ((a - b) & MASK32) < 0x80000000


_HDR = struct.Struct("!HHIIHHHH")
_HDR_TS = struct.Struct("!HHIIHHHHIII")  # header + NOP NOP TS(10)
_TS_LEAD = 0x0101080A
_OFF5 = 5 << 12
_OFF8 = 8 << 12


def _timestamps(options: bytes) -> tuple[int, int] | None:
    """The timestamps of an option list, fast for the usual ``NOP NOP TS`` layout."""
    if len(options) == 12 and options[:4] == b"\x01\x01\x08\x0a":
        val, ecr = struct.unpack_from("!II", options, 4)
        return val, ecr
    if not options:
        return None
    try:
        return parse_options(options).timestamps
    except PacketError:
        return None


def _options_or_none(options: bytes) -> TcpOptions:
    """The peer's options; a malformed list counts as no options (we still answer)."""
    try:
        return parse_options(options)
    except PacketError:
        return TcpOptions()


class Connection:
    """One fake-TCP (or ``udp``-transport) connection.  See the module docstring."""

    def __init__(
        self,
        *,
        role: Role,
        local: HostPort,
        remote: HostPort,
        keyring: Keyring,
        transport: Transport = "tcp",
        timing: Timing | None = None,
        client_id: bytes = b"\0" * 8,
        conn_index: int = 0,
        conn_count: int = 1,
        mss: int = 1460,
        rng: random.Random | None = None,
        clock_offset: float = 0.0,
        drops: Counter[str] | None = None,
        profile: TcpProfile | None = None,
    ) -> None:
        self.role = role
        self.transport = transport
        self.local = local
        self.remote = remote
        self.keyring = keyring
        self.timing = timing or Timing()
        self.client_id = client_id
        self.conn_index = conn_index
        self.conn_count = conn_count
        self.mss = mss
        # ISNs, timestamp offsets and IP IDs must not be predictable from earlier ones (RFC 6528):
        # the OS's generator unless a test passes its own.
        self.rng = rng or random.SystemRandom()
        self.clock_offset = clock_offset
        self.drops = drops if drops is not None else new_drops()
        self.profile = profile or TcpProfile()
        #: The IPv4 ID / IPv6 flow label of this connection's packets; the send path numbers them.
        self.ip = IpIdent()

        self.state = State.CLOSED
        self.hello: Hello | None = None
        self.close_reason: str | None = None
        self.reconnects = 0
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.last_rx = self.last_tx = 0.0
        self._challenged = -1e9

        self._iss = 0
        self.snd_nxt = 0
        self.rcv_nxt = 0
        self._ts_ok = False
        self._ts_offset = 0
        self._ts_recent = 0
        self._rwin = ReceiveWindow(self.profile, 0xFFFF, 0, mss)  # replaced at the handshake
        self._syn_window = 0xFFFF  # the handshake's window (never scaled, RFC 7323 §2.2) ...
        self._syn_wscale: int | None = None  # ... and the window scale its options offer
        self._syn_sack = False
        self._syn_ts = 0  # client: the TSval of its SYN, the tag (core/syntag.py)
        self._sealer: framing.Sealer | None = None
        self._opener: framing.Opener | None = None
        self._nonce = b""
        self._unacked = 0
        self._ack_at: float | None = None
        self._deadline: float | None = None  # handshake / hello / fin / syn_timeout
        self._tries = 0
        self._last_seal = 0.0
        self._last_auth = 0.0
        self._reconnect_at: float | None = None
        self._backoff = self.timing.reconnect_min
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()

    # -- table ----------------------------------------------------------------------------------

    def _goto(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise LocalProtocolError(f"{event!r} is not valid in state {self.state.name}") from None

    # -- outputs --------------------------------------------------------------------------------

    def segments_to_send(self) -> list[bytes]:
        """Wire payloads produced since the last call: TCP segments (header + payload) or, for the
        udp transport, UDP payloads.  The TCP checksum field is 0: the send path fills it in (or
        has the kernel do it), since only the send path knows which of the two it takes."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest time ``handle_timer`` has work to do, or None."""
        if self.state == State.CLOSED:
            return self._reconnect_at
        t = self._deadline
        if self._ack_at is not None and (t is None or self._ack_at < t):
            t = self._ack_at
        if self.state == State.ESTABLISHED:  # after every wake-up's segments: no generator here
            ka = self._last_seal + self.timing.keepalive
            dead = self._last_auth + self.timing.dead_timeout
            first = ka if ka < dead else dead
            t = first if t is None or first < t else t
        return t

    @property
    def established(self) -> bool:
        return self.state == State.ESTABLISHED

    # -- building segments ----------------------------------------------------------------------

    def _tsval(self, now: float) -> int:
        return (int(now * 1000) + self._ts_offset) & MASK32

    def _emit(self, flags: int, payload: bytes, now: float, options: bytes | None = None) -> bytes:
        """Build one segment (or udp datagram) carrying ``payload`` and account for it."""
        self.tx_packets += 1
        self.tx_bytes += len(payload)
        self.last_tx = now
        if self.transport == "udp":
            return bytes((framing.UDP_MARKER,)) + payload
        seq, ack = self._advance(flags, len(payload) + (1 if flags & (SYN | FIN) else 0))
        if options is None and self._ts_ok:
            tsval = self._tsval(now)
            return _HDR_TS.pack(self.local[1], self.remote[1], seq, ack, _OFF8 | flags, self._rwin.field, 0, 0,
                                _TS_LEAD, tsval, self._ts_recent) + payload
        window = self._rwin.field if options is None else self._syn_window
        return TcpHeader(self.local[1], self.remote[1], seq, ack, flags, window, options or b"").pack(payload)

    def _advance(self, flags: int, length: int) -> tuple[int, int]:
        """Take ``length`` of sequence space for what is sent now (it acknowledges all received):
        its sequence number and acknowledgment number."""
        seq = self.snd_nxt
        self.snd_nxt = (seq + length) & MASK32
        self._unacked = 0
        self._ack_at = None
        return seq, (self.rcv_nxt if flags & ACK else 0)

    def _send(self, flags: int, payload: bytes, now: float, options: bytes | None = None) -> None:
        self._out.append(self._emit(flags, payload, now, options))

    def _seal(self, frames: bytes, now: float) -> bytes:
        assert self._sealer is not None
        self._last_seal = now
        return self._sealer.seal(frames)

    def _send_record(self, frames: bytes, now: float, flags: int = ACK | PSH) -> None:
        self._send(flags, self._seal(frames, now), now)

    # -- inputs: client side --------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Client: open (or reopen) the connection."""
        if self.role != "client":
            raise LocalProtocolError("connect() is for client connections")
        self._reconnect_at = None
        self._tries = 0
        self.close_reason = None
        if self.transport == "udp":
            self._goto("connect_udp")
            self._start_hello(now)
            return
        self._goto("connect_tcp")
        self._iss = self.rng.getrandbits(32)
        # The SYN's TSval is its tag (core/syntag.py): the server's steering lets only a SYN that
        # carries it reach rsockd.  The connection's clock runs on from it, as from a random offset.
        self._syn_ts = syntag.syn_tag(self.keyring.syn_key, self._iss, syntag.slot_of(now + self.clock_offset))
        self._ts_offset = (self._syn_ts - int(now * 1000)) & MASK32
        self.snd_nxt = self._iss
        self.rcv_nxt = 0
        prof = self.profile
        # tcp_connect_init(): the SYN's window is rounded to the whole MSS (no peer timestamps yet).
        self._syn_window, wscale = prof.initial_window(self.mss, prof.window_scaling)
        self._syn_wscale = wscale if prof.window_scaling else None
        self._syn_sack = prof.sack
        self.ip.start(self.rng)
        self.ip.new_label(self.rng)
        self._send_syn(now)

    def _send_syn(self, now: float) -> None:
        self.snd_nxt = self._iss
        if self._tries:
            self.ip.new_label(self.rng)  # Linux re-hashes a flow whose SYN timed out
        # Timestamps always: the tag needs them.  A retransmitted SYN carries the same tag.
        opts = self.profile.handshake_options(mss=self.mss, sack_permitted=self._syn_sack,
                                              timestamps=(self._syn_ts, 0), wscale=self._syn_wscale)
        self._send(SYN, b"", now, opts)
        self._deadline = now + self.timing.rto * (2 ** self._tries)

    def _start_hello(self, now: float) -> None:
        self._nonce = self.rng.getrandbits(64).to_bytes(8, "big")
        self._sealer = self.keyring.sealer(self._nonce, framing.DIR_CLIENT_TO_SERVER)
        self._opener = self.keyring.opener(self._nonce, framing.DIR_SERVER_TO_CLIENT)
        self._tries = 0
        self._send_hello(now)

    def _send_hello(self, now: float) -> None:
        wall_ns = int((now + self.clock_offset) * 1e9)
        self.hello = Hello(self.client_id, self.conn_index, self.conn_count, self._nonce, wall_ns)
        self._send_record(self.hello.encode(), now)
        self._deadline = now + self.timing.rto * (2 ** self._tries)

    # -- inputs: server side --------------------------------------------------------------------

    def accept_syn(self, hdr: TcpHeader, now: float) -> None:
        """Server: a SYN created this connection; answer with SYN-ACK (RFC 9293 §3.5)."""
        self._goto("syn")
        opts = _options_or_none(hdr.options)
        prof = self.profile
        self._iss = self.rng.getrandbits(32)
        self._ts_offset = self.profile.ts_offset(self.local[0], self.remote[0])
        self.rcv_nxt = (hdr.seq + 1) & MASK32
        self._ts_ok = opts.timestamps is not None and prof.timestamps
        self._ts_recent = opts.timestamps[0] if opts.timestamps else 0
        self._syn_sack = opts.sack_permitted and prof.sack
        # tcp_openreq_init_rwin(): rounded to what a segment carries once timestamps are on.
        mss = self.mss - (TS_OPTION_SPACE if self._ts_ok else 0)
        wscale_ok = opts.wscale is not None and prof.window_scaling
        self._syn_window, wscale = prof.initial_window(mss, wscale_ok)
        self._syn_wscale = wscale if wscale_ok else None
        self._rwin = ReceiveWindow(prof, self._syn_window, wscale, mss)
        self.ip.new_label(self.rng)
        if prof.synack_ip_id:
            self.ip.start(self.rng)  # XNU's SYN-ACK comes from the new connection's socket
        # else Linux's request socket: its IPv4 ID stays 0 until the ACK
        self._deadline = now + self.timing.syn_timeout
        self.last_rx = now
        self._send_synack(now)

    def _send_synack(self, now: float) -> None:
        self.snd_nxt = self._iss
        ts = (self._tsval(now), self._ts_recent) if self._ts_ok else None
        out = self.profile.handshake_options(mss=self.mss, sack_permitted=self._syn_sack, timestamps=ts,
                                             wscale=self._syn_wscale)
        self._send(SYN | ACK, b"", now, out)

    def accept(self, now: float) -> None:
        """Server: admit the hello; the connection becomes ESTABLISHED."""
        if self.state != State.HELLO or self.hello is None:
            raise LocalProtocolError(f"accept() in state {self.state.name}")
        self._goto("hello_ok")
        self._deadline = None
        self._last_auth = now
        self._send_record(HelloAck(self.hello.conn_index).encode(), now)
        self._events.append(Connected())

    def refuse(self, now: float, reason: CloseReason = CloseReason.REFUSED) -> None:
        """Server: reject the hello; tell the client why and reset.  (The caller counts why.)"""
        self._abort(now, reason, "refused")

    def adopt_udp_hello(self, payload: bytes | memoryview, now: float) -> bool:
        """Server, udp transport: a datagram from an unknown peer; keep it if it holds a hello."""
        self._goto("hello_udp")
        self._deadline = now + self.timing.syn_timeout
        self.last_rx = now
        self._records(memoryview(payload)[1:], now)
        return self.hello is not None and self.state == State.HELLO

    # -- inputs: both ---------------------------------------------------------------------------

    def receive(self, hdr: TcpHeader, payload: bytes | memoryview, now: float) -> list[tuple[int, memoryview]]:
        """Process one TCP segment for this connection; returns the DATA frames it carried."""
        flags = hdr.flags
        state = self.state
        self.rx_packets += 1
        self.rx_bytes += len(payload)
        if flags & RST:
            self._on_rst(hdr, payload, now)
            return []
        if state == State.SYN_SENT:
            if flags & SYN and flags & ACK and hdr.ack == (self._iss + 1) & MASK32:
                self._on_synack(hdr, now)
            else:
                self.drops["unexpected"] += 1
            return []
        if flags & SYN:
            if state == State.SYN_RCVD and hdr.seq == (self.rcv_nxt - 1) & MASK32:
                # A retransmitted SYN: our SYN-ACK was lost (RFC 9293 §3.10.7.4).
                self._resend_synack(hdr, now)
            else:
                self.drops["unexpected"] += 1
            return []
        if not flags & ACK:
            self.drops["unexpected"] += 1
            return []
        if state == State.SYN_RCVD:
            if hdr.ack != (self._iss + 1) & MASK32:
                self.drops["unexpected"] += 1
                return []
            self._goto("ack")
            self.snd_nxt = (self._iss + 1) & MASK32
            if not self.profile.synack_ip_id:
                self.ip.start(self.rng)  # Linux's child socket: IPv4 IDs from a random start
        elif state == State.CLOSED:
            self.drops["unexpected"] += 1
            return []
        self.last_rx = now
        # Only what authenticates may move rcv_nxt (and the timestamp we echo): a bare ACK carries
        # no sequence space, and a spoofed one must not shift the number RST/FIN are judged by.
        in_order = hdr.seq == self.rcv_nxt
        data: list[tuple[int, memoryview]] = []
        closing = authed = False
        if payload:
            data, closing, authed = self._records(memoryview(payload), now)
        if authed:
            self._rwin.received(len(payload))
            end = (hdr.seq + len(payload)) & MASK32
            if seq_after(end, self.rcv_nxt):
                self.rcv_nxt = end
            if self._ts_ok:
                ts = _timestamps(hdr.options)
                if ts is not None:
                    self._ts_recent = ts[0]
            if self.state in (State.HELLO, State.ESTABLISHED, State.FIN_WAIT):
                self._unacked += 1
                if self._unacked >= self.timing.ack_every:
                    self._send(ACK, b"", now)
                elif self._ack_at is None:
                    self._ack_at = now + self.timing.ack_delay
        if flags & FIN:
            if closing or in_order:
                fin = (hdr.seq + len(payload) + 1) & MASK32
                if seq_after(fin, self.rcv_nxt):
                    self.rcv_nxt = fin
                self._on_fin(now)
            else:
                self.drops["rst_ignored"] += 1
        return data

    def fast_state(self) -> FastState | None:
        """What the compiled reader (dataplane/_datapath.c) needs to take this connection's data
        segments itself: (self, rcv_nxt, timestamps on, the timestamp to echo, the tag's key,
        the replay window's top, bits and size).  None unless ESTABLISHED over tcp: every
        segment then takes ``receive``."""
        opener = self._opener
        if self.state != State.ESTABLISHED or self.transport != "tcp" or opener is None:
            return None
        w = opener.window
        if w.size > 1024:
            return None
        return (self, self.rcv_nxt, self._ts_ok, self._ts_recent, opener.mac_key, w.top,
                w.bits.to_bytes((w.size + 7) // 8, "little"), w.size)

    def received_run(self, segments: int, nbytes: int, authed: int, authed_bytes: int, rcv_nxt: int,
                     ts_recent: int | None, top: int, bits: bytes, replays: int, bad: int, now: float) -> None:
        """The compiled reader took ``segments`` data segments of this connection (``nbytes`` of
        payload), ``authed`` of them with a record that authenticated: what ``receive`` does
        for each, at once.  One ACK answers them all when they reach ``ack_every``; the window
        (the look of our segments, tcpprofile) grows as for ``authed`` segments of equal size."""
        self.rx_packets += segments
        self.rx_bytes += nbytes
        self.last_rx = now
        if replays:
            self.drops["replay"] += replays
        if bad:
            self.drops["bad_auth"] += bad
        opener = self._opener
        if not authed or opener is None:
            return
        self._last_auth = now
        opener.window.top = top
        opener.window.bits = int.from_bytes(bits, "little")
        rwin = self._rwin
        each = authed_bytes // authed
        for _ in range(authed):
            if rwin.wnd >= rwin.clamp:
                break
            rwin.received(each)
        self.rcv_nxt = rcv_nxt
        if ts_recent is not None:
            self._ts_recent = ts_recent
        self._unacked += authed
        if self._unacked >= self.timing.ack_every:
            self._send(ACK, b"", now)
        elif self._ack_at is None:
            self._ack_at = now + self.timing.ack_delay

    def receive_datagram(self, payload: bytes | memoryview, now: float) -> list[tuple[int, memoryview]]:
        """Process one datagram of the udp transport (first byte ``UDP_MARKER``)."""
        self.rx_packets += 1
        self.rx_bytes += len(payload)
        self.last_rx = now
        if self.state == State.CLOSED:
            self.drops["unexpected"] += 1
            return []
        data, closing, _authed = self._records(memoryview(payload)[1:], now)
        if closing:
            self._closed("peer closed", now)
        return data

    def _resend_synack(self, hdr: TcpHeader, now: float) -> None:
        self._send_synack(now)

    def _on_synack(self, hdr: TcpHeader, now: float) -> None:
        try:
            opts = parse_options(hdr.options)
        except PacketError:
            self.drops["malformed"] += 1
            return
        self._goto("synack")
        self.snd_nxt = (self._iss + 1) & MASK32
        self.rcv_nxt = (hdr.seq + 1) & MASK32
        self._ts_ok = opts.timestamps is not None  # our SYN offered them (the tag)
        self._ts_recent = opts.timestamps[0] if opts.timestamps else 0
        # Scaling applies only when both SYNs offered it (RFC 7323 §2.2).
        wscale = self._syn_wscale if self._syn_wscale is not None and opts.wscale is not None else 0
        self._rwin = ReceiveWindow(self.profile, self._syn_window, wscale,
                                   self.mss - (TS_OPTION_SPACE if self._ts_ok else 0))
        self.last_rx = now
        self._send(ACK, b"", now)
        self._start_hello(now)

    def _on_rst(self, hdr: TcpHeader, payload: bytes | memoryview, now: float) -> None:
        state = self.state
        if state == State.CLOSED:
            return
        if state == State.SYN_SENT:
            # RFC 9293 §3.10.7.3: acceptable if it acknowledges our SYN.
            if hdr.flags & ACK and hdr.ack == (self._iss + 1) & MASK32:
                self._closed("refused", now, "rst")
            else:
                self.drops["rst_ignored"] += 1
            return
        if payload and self._opener is not None:
            _data, closing, _authed = self._records(memoryview(payload), now)
            if closing and self.state != State.CLOSED:
                self._closed("reset", now, "rst")
                return
            if self.state == State.CLOSED:
                return
        if hdr.seq == self.rcv_nxt:
            self._closed("reset", now, "rst")
        elif 0 < (hdr.seq - self.rcv_nxt) & MASK32 < self._rwin.bytes:
            self.drops["rst_ignored"] += 1
            if now - self._challenged >= CHALLENGE_INTERVAL:  # RFC 5961 §5: rate-limited
                self._challenged = now
                self._send(ACK, b"", now)  # challenge ACK (RFC 5961 §3.2)
        else:
            self.drops["rst_ignored"] += 1

    def _on_fin(self, now: float) -> None:
        if self.state == State.FIN_WAIT:
            self._send(ACK, b"", now)
            self._closed("closed", now, "fin", reconnect=False)
            return
        if self.state in (State.HELLO, State.ESTABLISHED):
            self._send(FIN | ACK, b"", now)
            self._closed("peer closed", now, "fin")

    # -- records and frames ---------------------------------------------------------------------

    def _records(self, payload: memoryview, now: float) -> tuple[list[tuple[int, memoryview]], bool, bool]:
        """Open every record of a payload; returns (DATA frames, whether a CLOSE frame came,
        whether any record authenticated)."""
        data: list[tuple[int, memoryview]] = []
        closing = authed = False
        try:
            for counter, tag, frames in framing.split_records(payload):
                opener = self._opener
                if opener is None:
                    opener = self._opener_from_hello(frames)
                    if opener is None:
                        return data, closing, authed
                if not opener.window.fresh(counter):
                    self.drops["replay"] += 1
                    continue
                if not opener.verify(counter, tag, frames):
                    self.drops["bad_auth"] += 1
                    continue
                if self._opener is None:
                    self._opener = opener  # the hello authenticated: the connection is its
                    self._sealer = self.keyring.sealer(self._nonce, framing.DIR_SERVER_TO_CLIENT)
                opener.window.mark(counter)
                self._last_auth = now
                authed = True
                closing = self._frames(frames, data, now) or closing
        except FrameError:
            self.drops["malformed"] += 1
        return data, closing, authed

    def _opener_from_hello(self, frames: memoryview) -> framing.Opener | None:
        """Server: the first record must start with a HELLO, whose nonce keys the connection."""
        if self.role != "server" or self.state != State.HELLO:
            self.drops["unexpected"] += 1
            return None
        for ftype, body in framing.iter_frames(frames):
            if ftype != FrameType.HELLO:
                break
            hello = Hello.decode(body)
            self._nonce = hello.nonce
            return self.keyring.opener(hello.nonce, framing.DIR_CLIENT_TO_SERVER)
        self.drops["unexpected"] += 1
        return None

    def _frames(self, frames: memoryview, data: list[tuple[int, memoryview]], now: float) -> bool:
        closing = False
        for ftype, body in framing.iter_frames(frames):
            if ftype == FrameType.DATA:
                if len(body) < 4:
                    raise FrameError("DATA frame without a flow id")
                if self.state != State.ESTABLISHED:
                    self.drops["unexpected"] += 1
                    continue
                data.append((int.from_bytes(body[:4], "big"), body[4:]))
            elif ftype == FrameType.KEEPALIVE:
                pass
            elif ftype == FrameType.HELLO:
                self._on_hello(Hello.decode(body), now)
            elif ftype == FrameType.HELLO_ACK:
                self._on_hello_ack(HelloAck.decode(body), now)
            elif ftype == FrameType.FLOW_CLOSE:
                if len(body) >= 4:
                    self._events.append(FlowClosed(int.from_bytes(body[:4], "big")))
            elif ftype == FrameType.CLOSE:
                closing = True
            # unknown frame types are skipped: a newer peer may send them
        return closing

    def _on_hello(self, hello: Hello, now: float) -> None:
        if self.role != "server":
            self.drops["unexpected"] += 1
            return
        if self.state == State.ESTABLISHED and self.hello is not None and hello.nonce == self.hello.nonce:
            # The client did not see our HELLO_ACK and sent its hello again.
            self._send_record(HelloAck(hello.conn_index).encode(), now)
            return
        if self.state != State.HELLO or self.hello is not None:
            self.drops["unexpected"] += 1
            return
        self.hello = hello
        self.conn_index, self.conn_count = hello.conn_index, hello.conn_count
        self._events.append(HelloReceived(hello))

    def _on_hello_ack(self, ack: HelloAck, now: float) -> None:
        if self.role != "client" or self.state != State.HELLO:
            return  # a duplicate HELLO_ACK: harmless
        if ack.version != framing.PROTOCOL_VERSION:
            self.drops["refused"] += 1
            self._abort(now, CloseReason.PROTOCOL, "version")
            return
        self._goto("hello_ok")
        self._deadline = None
        self._backoff = self.timing.reconnect_min
        self._events.append(Connected())

    # -- data -----------------------------------------------------------------------------------

    def send_datagram(self, flow_id: int, datagram: bytes | memoryview, now: float) -> bytes | None:
        """Seal one datagram of ``flow_id`` into a segment; None unless ESTABLISHED."""
        return self.send_frames(framing.data_frame(flow_id, datagram), now)

    def send_frames(self, frames: bytes, now: float) -> bytes | None:
        """Seal already-encoded frames (several datagrams batched) into one segment."""
        if self.state != State.ESTABLISHED:
            return None
        return self._emit(ACK | PSH, self._seal(frames, now), now)

    def seal(self, frames: bytes, now: float) -> bytes | None:
        """``frames`` sealed as this connection's next record; None unless ESTABLISHED."""
        return self._seal(frames, now) if self.state == State.ESTABLISHED else None

    def send_sealed(self, record: bytes, now: float) -> bytes | None:
        """One segment carrying a record sealed already (``seal``, or the compiled writer)."""
        if self.state != State.ESTABLISHED:
            return None
        return self._emit(ACK | PSH, record, now)

    def send_batch(self, records: list[bytes], now: float) -> tuple[bytes, list[bytes]] | None:
        """Seal ``records`` (each the frames of one segment) for one send that the kernel splits
        into segments (GSO): returns the first segment's TCP header, checksum left 0, and the
        sealed payloads, whose sequence numbers follow on from the header's.  The caller passes
        records of one length (the last may be shorter), so every payload but the last is as
        long as the first.  None unless an ESTABLISHED tcp connection with timestamps."""
        if not self.batches:
            return None
        payloads = [self._seal(r, now) for r in records]
        return self.batch_header(payloads, now), payloads

    @property
    def batches(self) -> bool:
        """Can runs of segments leave as one send (``batch_header``)?"""
        return self.state == State.ESTABLISHED and self.transport == "tcp" and self._ts_ok

    def batch_header(self, payloads: list[bytes], now: float) -> bytes:
        """The first TCP header of a run carrying sealed ``payloads`` (``send_batch``)."""
        total = sum(map(len, payloads))
        self.tx_packets += len(payloads)
        self.tx_bytes += total
        self.last_tx = now
        seq, ack = self._advance(ACK | PSH, total)
        return _HDR_TS.pack(self.local[1], self.remote[1], seq, ack, _OFF8 | ACK | PSH, self._rwin.field, 0, 0,
                            _TS_LEAD, self._tsval(now), self._ts_recent)

    def wire_state(self, now: float) -> tuple[int, int, int, int, int, int, int, int, int] | None:
        """What the compiled writer needs to make this connection's segments itself, as
        ``batch_header`` does: (local port, remote port, sequence number, acknowledgment number,
        window, timestamp, the timestamp to echo, the next IPv4 ID or -1, the IPv6 flow label).
        None unless runs can leave as one send (``batches``)."""
        if not self.batches:
            return None
        return (self.local[1], self.remote[1], self.snd_nxt, self.rcv_nxt, self._rwin.field, self._tsval(now),
                self._ts_recent, self.ip.peek(), self.ip.label)

    def sent_by_writer(self, counter: int, segments: int, nbytes: int, snd_nxt: int, ids: int, now: float) -> None:
        """The compiled writer sealed records up to ``counter`` and sent them as ``segments``
        segments of ``nbytes`` in all, up to ``snd_nxt``, with ``ids`` IPv4 IDs (``wire_state``):
        what ``batch_header`` and the send path count."""
        self.sealed_by_writer(counter, now)
        self.tx_packets += segments
        self.tx_bytes += nbytes
        self.last_tx = now
        self.snd_nxt = snd_nxt & MASK32
        self._unacked = 0
        self._ack_at = None
        if ids:
            self.ip.take(ids)

    def fast_sealer(self) -> tuple[tuple[bytes, bytes, bytes], int] | None:
        """What the compiled writer (dataplane/_datapath.c) needs to seal this connection's
        records itself: the tag's key and the next counter.  None unless ESTABLISHED over tcp."""
        sealer = self._sealer
        if self.state != State.ESTABLISHED or self.transport != "tcp" or sealer is None:
            return None
        return sealer.mac_key, sealer.counter

    def sealed_by_writer(self, counter: int, now: float) -> None:
        """The compiled writer sealed this connection's records up to ``counter`` (exclusive)."""
        assert self._sealer is not None
        self._sealer.counter = counter
        self._last_seal = now

    def probe(self, now: float) -> None:
        """Send a keepalive now: a peer that lost our state answers with an RST at once."""
        if self.state == State.ESTABLISHED:
            self._send_record(framing.keepalive_frame(), now)

    def close_flow(self, flow_id: int, now: float) -> None:
        if self.state == State.ESTABLISHED:
            self._send_record(framing.flow_close_frame(flow_id), now)

    # -- closing --------------------------------------------------------------------------------

    def close(self, now: float, reason: CloseReason = CloseReason.SHUTDOWN) -> None:
        """Close for good (no reconnect): CLOSE record + FIN, or RST before ESTABLISHED."""
        if self.state == State.CLOSED:
            self._reconnect_at = None
            return
        if self.state == State.ESTABLISHED and self.transport == "tcp":
            self._send(FIN | ACK, self._seal(framing.close_frame(reason), now), now)
            self._goto("close_fin")
            self._deadline = now + self.timing.fin_timeout
            self.close_reason = "closed"
            return
        self._abort(now, reason, "closed", reconnect=False)

    def retire(self) -> None:
        """Server: a newer connection took this one's place (same tuple, or same client id and
        index): close silently, without telling the peer or raising an event."""
        if self.state != State.CLOSED:
            self._goto("retire")
        self.close_reason = "replaced"
        self._deadline = self._ack_at = self._reconnect_at = None
        self._sealer = self._opener = None

    def _abort(self, now: float, reason: CloseReason, why: str, *, reconnect: bool = True) -> None:
        """Tell the peer (authenticated CLOSE where we can) and reset."""
        if self.state in (State.HELLO, State.ESTABLISHED, State.FIN_WAIT) and self._sealer is not None:
            payload = self._seal(framing.close_frame(reason), now)
        else:
            payload = b""
        if self.state not in (State.CLOSED, State.SYN_SENT):
            if self.transport == "udp":
                if payload:
                    self._send(0, payload, now)
            else:
                self._send(RST | ACK, payload, now)
        self._closed(why, now, "close", reconnect=reconnect)

    def _closed(self, reason: str, now: float, event: str = "close", *, reconnect: bool = True) -> None:
        if self.state != State.CLOSED:
            self._goto(event if event in TRANSITIONS[self.state] else "close")
        self.close_reason = reason
        self._deadline = self._ack_at = None
        self._sealer = None
        self._opener = None
        reconnect_at = None
        if reconnect and self.role == "client":
            delay = min(self._backoff, self.timing.reconnect_max) * self.rng.uniform(0.8, 1.2)
            reconnect_at = now + min(delay, self.timing.reconnect_max)
            self._backoff = min(self._backoff * 2, self.timing.reconnect_max)
            self._reconnect_at = reconnect_at
            self.reconnects += 1
        self._events.append(ConnectionClosed(reason, reconnect_at))

    # -- timers ---------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        state = self.state
        if state == State.CLOSED:
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self.connect(now)
            return
        if self._ack_at is not None and now >= self._ack_at:
            self._send(ACK, b"", now)
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if state == State.SYN_SENT:
                self._tries += 1
                if self._tries > self.timing.retries:
                    self._closed("syn timeout", now, "timeout")
                else:
                    self._send_syn(now)
            elif state == State.HELLO and self.role == "client":
                self._tries += 1
                if self._tries > self.timing.retries:
                    self._abort(now, CloseReason.DEAD, "hello timeout")
                else:
                    self._send_hello(now)
            elif state in (State.SYN_RCVD, State.HELLO):
                self._abort(now, CloseReason.REFUSED, "handshake timeout", reconnect=False)
            elif state == State.FIN_WAIT:
                self._closed("closed", now, "timeout", reconnect=False)
            return
        if state == State.ESTABLISHED:
            if now >= self._last_auth + self.timing.dead_timeout:
                self._abort(now, CloseReason.DEAD, "dead")
            elif now >= self._last_seal + self.timing.keepalive:
                self._send_record(framing.keepalive_frame(), now)


# ---------------------------------------------------------------------------------------------
# The server's passive side

ConnKey = tuple[str, bytes, int, bytes, int]  # transport, local address and port, remote address and port
#: ``Connection.fast_state``: what the compiled reader needs of a connection.
FastState = tuple[Connection, int, bool, int, tuple[bytes, bytes, bytes], int, bytes, int]


def _syn_tsval(hdr: TcpHeader) -> int | None:
    """A SYN's TSval, None without a timestamp option (or with options that do not parse)."""
    try:
        ts = parse_options(hdr.options).timestamps
    except PacketError:
        return None
    return ts[0] if ts else None


class Acceptor:
    """Server: routes each segment to its connection and owns the bounded half-open table.

    ``pending`` holds connections between SYN and an accepted hello (the SYN backlog); they die
    after ``timing.syn_timeout``.  ``connections`` holds accepted ones.  A client that reconnects
    on the same 4-tuple gets a new pending connection beside the old one; segments whose ack
    matches the pending connection's sequence space go to it.  Segments for no connection are
    answered with an RST (rate-limited, RFC 9293 §3.10.7.1), as a closed port would - unless
    ``reset_strays`` is off: when the port is shared with the kernel's TCP, which receives every
    segment of no connection of ours and answers it itself (a second answer would show rsockd).
    """

    def __init__(
        self,
        *,
        keyring: Keyring,
        timing: Timing | None = None,
        backlog: int = 256,
        mss: int = 1460,
        rng: random.Random | None = None,
        clock_offset: float = 0.0,
        drops: Counter[str] | None = None,
        rst_rate: float = 100.0,
        profile: TcpProfile | None = None,
    ) -> None:
        self.keyring = keyring
        self.timing = timing or Timing()
        self.backlog = backlog
        self.mss = mss
        self.rng = rng or random.SystemRandom()  # see Connection
        self.profile = profile or TcpProfile()
        self.clock_offset = clock_offset
        self.drops = drops if drops is not None else new_drops()
        self.pending: dict[ConnKey, Connection] = {}
        self.connections: dict[ConnKey, Connection] = {}
        self.seen = syntag.SeenSyns()  # tags seen, and where from (a replay from elsewhere is refused)
        self.reset_strays = True
        self._rst_rate = rst_rate
        self._rst_tokens = rst_rate
        self._rst_time = 0.0
        self._out: list[tuple[HostPort, HostPort, bytes]] = []

    def _new(self, transport: Transport, local: HostPort, remote: HostPort) -> Connection:
        return Connection(
            role="server", transport=transport, local=local, remote=remote, keyring=self.keyring,
            timing=self.timing, mss=self.mss - (20 if len(local[0]) == 16 else 0),  # self.mss is IPv4's
            rng=self.rng, clock_offset=self.clock_offset, drops=self.drops, profile=self.profile,
        )

    def segment(self, local: HostPort, remote: HostPort, hdr: TcpHeader, payload: bytes | memoryview,
                now: float) -> tuple[Connection | None, list[tuple[int, memoryview]]]:
        """Route one TCP segment; returns the connection that took it and its DATA frames."""
        key: ConnKey = ("tcp", local[0], local[1], remote[0], remote[1])
        flags = hdr.flags
        pend = self.pending.get(key)
        if flags & SYN and not flags & ACK:
            if pend is not None and pend.state == State.SYN_RCVD and hdr.seq == (pend.rcv_nxt - 1) & MASK32:
                return pend, pend.receive(hdr, payload, now)  # retransmitted SYN
            wall = now + self.clock_offset
            ts = _syn_tsval(hdr)
            if ts is None or not syntag.tag_ok(self.keyring.syn_key, hdr.seq, ts, wall):
                self.drops["bad_tag"] += 1  # a prober's or another program's SYN: never answered by us
                return None, []
            if not self.seen.claim(hdr.seq, ts, (local, remote), wall):
                self.drops["bad_tag"] += 1  # that tag came from elsewhere first: a replay
                return None, []
            if pend is None and len(self.pending) >= self.backlog:
                self.drops["backlog_full"] += 1
                return None, []
            conn = self._new("tcp", local, remote)
            conn.accept_syn(hdr, now)
            self.pending[key] = conn  # a newer SYN on the same tuple replaces an older attempt
            return conn, []
        target = pend if pend is not None and hdr.ack == pend.snd_nxt else self.connections.get(key) or pend
        if target is None:
            self.drops["no_connection"] += 1
            if not flags & RST and self.reset_strays:
                self._reset(local, remote, hdr, len(payload), now)
            return None, []
        return target, target.receive(hdr, payload, now)

    def datagram(self, local: HostPort, remote: HostPort, payload: bytes | memoryview,
                 now: float) -> tuple[Connection | None, list[tuple[int, memoryview]]]:
        """Route one datagram of the udp transport (first byte ``UDP_MARKER``)."""
        key: ConnKey = ("udp", local[0], local[1], remote[0], remote[1])
        conn = self.connections.get(key) or self.pending.get(key)
        if conn is not None and not _is_new_hello(payload, conn):
            return conn, conn.receive_datagram(payload, now)
        if key not in self.pending and len(self.pending) >= self.backlog:
            self.drops["backlog_full"] += 1
            return None, []
        conn = self._new("udp", local, remote)
        if not conn.adopt_udp_hello(payload, now):
            return None, []
        self.pending[key] = conn
        return conn, []

    def promote(self, conn: Connection) -> Connection | None:
        """Move an accepted connection out of the backlog; returns the one it replaced."""
        key = self.key_of(conn)
        if self.pending.get(key) is conn:
            del self.pending[key]
        old = self.connections.get(key)
        self.connections[key] = conn
        return old if old is not conn else None

    def forget(self, conn: Connection) -> None:
        """Drop a closed connection from the tables (if it is still the one listed)."""
        key = self.key_of(conn)
        for table in (self.pending, self.connections):
            if table.get(key) is conn:
                del table[key]

    @staticmethod
    def key_of(conn: Connection) -> ConnKey:
        return (conn.transport, conn.local[0], conn.local[1], conn.remote[0], conn.remote[1])

    def all(self) -> list[Connection]:
        return [*self.pending.values(), *self.connections.values()]

    def segments_to_send(self) -> list[tuple[HostPort, HostPort, bytes]]:
        """RSTs for segments that matched no connection: (local, remote, segment)."""
        out, self._out = self._out, []
        return out

    def _reset(self, local: HostPort, remote: HostPort, hdr: TcpHeader, length: int, now: float) -> None:
        self._rst_tokens = min(self._rst_rate, self._rst_tokens + (now - self._rst_time) * self._rst_rate)
        self._rst_time = now
        if self._rst_tokens < 1:
            return
        self._rst_tokens -= 1
        if hdr.flags & ACK:
            rst = TcpHeader(local[1], remote[1], hdr.ack, 0, RST, 0)
        else:
            end = hdr.seq + length + (1 if hdr.flags & (SYN | FIN) else 0)
            rst = TcpHeader(local[1], remote[1], 0, end & MASK32, RST | ACK, 0)
        self._out.append((local, remote, rst.pack()))


def _is_new_hello(payload: bytes | memoryview, conn: Connection) -> bool:
    """Does a udp-transport datagram open a new connection (a HELLO under another nonce)?"""
    try:
        for _counter, _tag, frames in framing.split_records(memoryview(payload)[1:]):
            for ftype, body in framing.iter_frames(frames):
                if ftype != FrameType.HELLO:
                    return False
                hello = Hello.decode(body)
                return conn.hello is None or hello.nonce != conn.hello.nonce
            return False
    except FrameError:
        return False
    return False
