"""``send_path = "auto"``: whether the packet send path is safe on this host (Linux).

The packet send path (``packetsend.py``) hands Ethernet frames to the link: they skip routing
decisions after ours, the netfilter ``output`` and ``postrouting`` hooks (an output firewall,
SNAT/masquerade, conntrack) and IPsec policies.  Where the host has none of these, skipping them
changes nothing, and the path costs a quarter less CPU per datagram (docs/bench.md); where it
has any, the frames would leave without what the administrator set up, so ``auto`` sends
through raw sockets, which go through all of it.

``egress_hooks()`` names the first thing found, or returns None.  It asks the network namespace
the daemon runs in (each has its own rules), and the relay asks again within 5 s of a change
(nftables and IPsec notifications; ``legacy_tables`` read every 5 s), so a firewall started
after rsockd turns the packet path off.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

LOG = logging.getLogger(__name__)

#: netfilter hooks a packet socket's frames skip.
_HOOKS = ("output", "postrouting")
#: Our own tables (steer/nft.py): their output chain only matters for raw sends.
OUR_TABLES = "rsockd_"
#: Legacy iptables (x_tables): one file per family; a line per table in use.
_LEGACY = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")


def egress_hooks() -> str | None:
    """What on this host's egress the packet path would skip, in words; None when nothing is."""
    return _nft_hooks() or legacy_tables() or _xfrm_policies()


def _nft_hooks() -> str | None:
    try:
        import nftables  # type: ignore[import-not-found]
    except ImportError:
        return None if not Path("/usr/sbin/nft").exists() else _nft_cli()
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, err = nft.cmd("list ruleset")
    if rc != 0:
        return f"the nftables ruleset cannot be read ({err.strip() or rc})"
    return _hooked(out)


def _nft_cli() -> str | None:
    try:
        r = subprocess.run(["/usr/sbin/nft", "-j", "list", "ruleset"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the nftables ruleset cannot be read ({e})"
    return _hooked(r.stdout) if r.returncode == 0 else f"the nftables ruleset cannot be read ({r.stderr.strip()})"


def _hooked(text: str) -> str | None:
    """The first chain on an output/postrouting hook, not ours, that holds a rule or drops."""
    try:
        items = json.loads(text or "{}").get("nftables", [])
    except ValueError:
        return "the nftables ruleset cannot be read (not JSON)"
    rules: dict[tuple[str, str, str], int] = {}
    for item in items:
        r = item.get("rule")
        if r:
            key = (r.get("family", ""), r.get("table", ""), r.get("chain", ""))
            rules[key] = rules.get(key, 0) + 1
    for item in items:
        c = item.get("chain")
        if not c or c.get("hook") not in _HOOKS or str(c.get("table", "")).startswith(OUR_TABLES):
            continue
        key = (c.get("family", ""), c.get("table", ""), c.get("name", ""))
        if rules.get(key) or c.get("policy", "accept") != "accept":
            return f"nftables chain {key[0]} {key[1]} {key[2]} on the {c['hook']} hook"
    return None


def legacy_tables() -> str | None:
    for path in _LEGACY:
        try:
            names = Path(path).read_text().split()
        except OSError:
            continue
        if names:
            return f"legacy iptables tables ({path}: {', '.join(names)})"
    return None


def _xfrm_policies() -> str | None:
    try:
        r = subprocess.run(["ip", "-j", "xfrm", "policy", "list"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no iproute2: nothing can have set policies up with it either
    if r.returncode != 0:
        return None
    # `ip -j` lists policies as JSON where iproute2 can, as text where not: either way, any output is a policy.
    return "IPsec (xfrm) policies" if r.stdout.strip() not in ("", "[]") else None
