"""The one set of drop reasons, shared by the pure core, the daemon and ``rsockctl``.

Every packet rsockd refuses is counted under exactly one of these names; ``rsockctl status``
shows them.  Keep the descriptions short: they are printed as they are.
"""

from __future__ import annotations

from collections import Counter

DROP_REASONS: dict[str, str] = {
    "bad_checksum": "TCP checksum wrong (capture backends verify in userspace)",
    "malformed": "header, record or frame could not be parsed",
    "bad_auth": "record tag did not verify under the key",
    "replay": "record counter already seen or too old",
    "unexpected": "segment not valid in the connection's state",
    "no_connection": "segment for no known connection (answered with RST unless the kernel shares the port)",
    "rst_ignored": "RST/FIN without the exact sequence number (RFC 5961)",
    "bad_tag": "SYN without the key's tag, or replayed from another address (left to the kernel)",
    "backlog_full": "SYN or hello dropped: half-open table full",
    "refused": "hello refused: stale, replayed, bad version or a limit",
    "limit": "session, flow or connection limit reached",
    "oversized": "datagram larger than the tunnel can carry",
    "no_route": "no live connection to send on",
    "not_local": "captured segment addressed to another host (capture backends)",
}


def new_drops() -> Counter[str]:
    """A drop counter with every reason present (so status shows zeros too)."""
    return Counter(dict.fromkeys(DROP_REASONS, 0))
