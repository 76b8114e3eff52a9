"""rsockd.netlink.ChangeWatch against the kernel: a change to what the daemon looks up (links,
addresses, routes, rules, neighbours; nftables; IPsec policies) is noticed, and a namespace where
nothing changes says nothing.  The relay looks the host up again only when its watch says so
(relay.py ``_housekeep``); tests/integration/test_resilience.py and test_packet_path.py show it
following changes through them."""

from __future__ import annotations

import select
from collections.abc import Callable

import pytest

from rsockd.netlink import ChangeWatch
from tests.netns import NetnsPair

pytestmark = pytest.mark.root


def quiet(w: ChangeWatch) -> None:
    """Read until the namespace's own start-up news (IPv6 address set-up, neighbour discovery)
    is over: a third of a second with nothing.  Only an absence has to be waited for."""
    while select.select([w], [], [], 0.3)[0]:
        w.changed()


def watched(net: NetnsPair, make: Callable[[], ChangeWatch]) -> ChangeWatch:
    with net.inside("c"):
        w = make()
    quiet(w)
    assert not w.changed()
    return w


def test_links_addresses_routes_rules_and_neighbours() -> None:
    with NetnsPair() as net:
        dev = net.dev["c"]
        w = watched(net, ChangeWatch.routes)
        try:
            for change in (["ip", "addr", "add", "10.250.0.1/32", "dev", dev],
                           ["ip", "route", "add", "10.251.0.0/24", "via", net.srv4],
                           ["ip", "rule", "add", "fwmark", "0x99", "table", "99"],
                           ["ip", "-6", "rule", "add", "fwmark", "0x99", "table", "99"],
                           ["ip", "neigh", "replace", "10.250.0.9", "lladdr", "02:00:00:00:00:09", "dev", dev],
                           ["ip", "link", "set", dev, "mtu", "1400"]):
                net.run("c", change)
                assert w.changed(), change  # the kernel queued it before `ip` returned
                assert not w.changed()
            # the other namespace's changes are not this one's
            net.run("s", ["ip", "addr", "add", "10.252.0.1/32", "dev", net.dev["s"]])
            assert not w.changed()
        finally:
            w.close()


def test_nftables_and_ipsec_policies() -> None:
    with NetnsPair() as net:
        nft = watched(net, ChangeWatch.nftables)
        try:
            xfrm = watched(net, ChangeWatch.xfrm_policies)
        except OSError as e:
            nft.close()
            pytest.skip(f"no IPsec (xfrm) netlink here: {e}")
        try:
            net.run("c", ["nft", "add table inet hostfw; add chain inet hostfw out "
                                 "{ type filter hook output priority 0; }"])
            assert nft.changed() and not xfrm.changed()
            net.run("c", ["ip", "xfrm", "policy", "add", "src", "10.250.0.1", "dst", "10.250.0.2", "dir", "out"])
            assert xfrm.changed() and not nft.changed()
        finally:
            nft.close()
            xfrm.close()


def test_our_own_tables_are_no_news() -> None:
    """The relay's egress watch leaves out rsockd's tables (its steering changes them as
    connections come and go; the egress check leaves them out too): only other tables count."""
    with NetnsPair() as net:
        w = watched(net, lambda: ChangeWatch.nftables(ours="rsockd_"))
        try:
            for ours in ("add table inet rsockd_x",
                         "add chain inet rsockd_x out { type filter hook output priority 0; }",
                         "add rule inet rsockd_x out counter", "add set inet rsockd_x s { type ipv4_addr; }",
                         "add element inet rsockd_x s { 10.9.9.9 }", "delete table inet rsockd_x"):
                net.run("c", ["nft", ours])
                assert not w.changed(), ours
            net.run("c", ["nft", "add table inet hostfw"])
            assert w.changed()
            net.run("c", ["nft", "add table inet rsockd_y; add table ip other"])  # one transaction, both
            assert w.changed()
        finally:
            w.close()


def test_a_closed_watch_says_look() -> None:
    """An error other than an overflow: the caller cannot know, so it looks."""
    with NetnsPair() as net:
        w = watched(net, ChangeWatch.routes)
        w.close()
        assert w.changed()
