"""macOS route and interface parsing (``rsockd.dataplane.netinfo_darwin``).

The sample outputs follow the format of macOS 13/14 ``route -n get`` (route(8): the
RTM_GET answer printed by ``print_getmsg``: key lines, then the metrics header and values)
and ``ifconfig`` (flags line with ``mtu``, tab-indented ``inet``/``inet6`` lines, link-local
IPv6 with ``%<if>`` and ``scopeid``).  They were written from that format, not captured on a
Mac (none is available here): a Mac user should compare them with real output first.

``source_address`` is the one piece that runs for real: it asks the kernel's source selection,
which works the same on Linux.
"""

from __future__ import annotations

import pytest

from rsockd.dataplane.netinfo_darwin import Interface, RouteGet, parse_ifconfig, parse_route_get, source_address

ROUTE_DEFAULT = """\
   route to: default
destination: default
       mask: default
    gateway: 192.168.1.1
  interface: en0
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1500         0
"""

ROUTE_HOST = """\
   route to: 203.0.113.9
destination: default
       mask: default
    gateway: 192.168.1.1
  interface: en0
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1500         0
"""

ROUTE_ONLINK_V6 = """\
   route to: 2001:db8:1234:5678::9
destination: 2001:db8:1234:5678::
       mask: ffff:ffff:ffff:ffff::
  interface: en1
      flags: <UP,DONE,CLONING,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1492         0
"""

ROUTE_UTUN = """\
   route to: 10.8.0.1
destination: 10.8.0.1
  interface: utun4
      flags: <UP,HOST,DONE,STATIC>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0         0         0
"""

IFCONFIG = """\
lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\toptions=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>
\tinet 127.0.0.1 netmask 0xff000000
\tinet6 ::1 prefixlen 128
\tinet6 fe80::1%lo0 prefixlen 64 scopeid 0x1
\tnd6 options=201<PERFORMNUD,DAD>
gif0: flags=8010<POINTOPOINT,MULTICAST> mtu 1280
stf0: flags=0<> mtu 1280
en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\toptions=6463<RXCSUM,TXCSUM,TSO4,TSO6,CHANNEL_IO,PARTIAL_CSUM,ZEROINVERT_CSUM>
\tether 3c:22:fb:12:34:56
\tinet6 fe80::1c8a:2b3c:4d5e:6f70%en0 prefixlen 64 secured scopeid 0xe
\tinet 192.168.1.23 netmask 0xffffff00 broadcast 192.168.1.255
\tinet6 2001:db8:1234:5678:10b2:3c4d:5e6f:7081 prefixlen 64 autoconf secured
\tinet6 2001:db8:1234:5678:a1b2:c3d4:e5f6:1 prefixlen 64 autoconf temporary
\tnd6 options=201<PERFORMNUD,DAD>
\tmedia: autoselect
\tstatus: active
utun4: flags=8051<UP,POINTOPOINT,RUNNING,MULTICAST> mtu 1380
\tinet 10.8.0.2 --> 10.8.0.1 netmask 0xffffffff
\tinet6 fe80::ce81:bff:fe20:1234%utun4 prefixlen 64 scopeid 0x11
\tnd6 options=201<PERFORMNUD,DAD>
"""


@pytest.mark.parametrize(("text", "want"), [
    (ROUTE_DEFAULT, RouteGet("en0", "192.168.1.1", 1500)),
    (ROUTE_HOST, RouteGet("en0", "192.168.1.1", 1500)),
    (ROUTE_ONLINK_V6, RouteGet("en1", None, 1492)),
    (ROUTE_UTUN, RouteGet("utun4", None, None)),  # mtu 0: the interface's
    ("route: writing to routing socket: not in table\n", RouteGet(None, None, None)),
    ("", RouteGet(None, None, None)),
])
def test_parse_route_get(text: str, want: RouteGet) -> None:
    assert parse_route_get(text) == want


def test_parse_ifconfig() -> None:
    ifs = parse_ifconfig(IFCONFIG)
    assert list(ifs) == ["lo0", "gif0", "stf0", "en0", "utun4"]
    assert ifs["lo0"] == Interface("lo0", 16384, frozenset({"UP", "LOOPBACK", "RUNNING", "MULTICAST"}),
                                   ("127.0.0.1", "::1", "fe80::1"))
    assert ifs["en0"].mtu == 1500
    assert ifs["en0"].addresses == ("fe80::1c8a:2b3c:4d5e:6f70", "192.168.1.23",
                                    "2001:db8:1234:5678:10b2:3c4d:5e6f:7081", "2001:db8:1234:5678:a1b2:c3d4:e5f6:1")
    assert "UP" in ifs["en0"].flags and "LOOPBACK" not in ifs["en0"].flags
    assert ifs["utun4"] == Interface("utun4", 1380, frozenset({"UP", "POINTOPOINT", "RUNNING", "MULTICAST"}),
                                     ("10.8.0.2", "fe80::ce81:bff:fe20:1234"))
    assert ifs["stf0"] == Interface("stf0", 1280, frozenset(), ())


def test_parse_ifconfig_single_interface() -> None:
    one = IFCONFIG[IFCONFIG.index("en0:"):IFCONFIG.index("utun4:")]
    assert list(parse_ifconfig(one)) == ["en0"]
    assert parse_ifconfig("ifconfig: interface en9 does not exist\n") == {}


def test_source_address_is_the_kernels_choice() -> None:
    assert source_address("127.0.0.1") == "127.0.0.1"
    assert source_address("127.3.4.5") == "127.0.0.1"
    assert source_address("::1") == "::1"
    assert source_address("fe80::1") is None  # link-local without a scope: no route to say
