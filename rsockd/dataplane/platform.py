"""The one place that picks the Linux or the macOS implementation of the data plane.

Everything else imports host facts and the raw sender from here, never from ``netinfo`` /
``netinfo_darwin`` or ``rawsock`` / ``rawsock_darwin`` directly: a module that asks
``sys.platform`` itself is a second place to keep in step.  Both implementations stay importable
on either platform (their platform calls happen when used), so tests of the macOS parsers and
headers run on Linux.  Steering backends are chosen in ``rsockd.steer.choose``.
"""

from __future__ import annotations

import sys

from .netcommon import Route, interface_exists, resolve

#: Running on macOS: the Darwin implementations below are the ones in use.
DARWIN = sys.platform == "darwin"
#: The kernel makes the datagrams of a run sent in one ``sendmsg`` (``UDP_SEGMENT``): Linux only.
UDP_GSO = sys.platform == "linux"

if sys.platform == "darwin":  # spelled out (not DARWIN) so mypy checks the branch of its --platform
    from .netinfo_darwin import (
        default_interfaces,
        interface_addresses,
        interface_gro,
        interface_mtu,
        interface_of,
        route_to,
    )
    from .rawsock_darwin import RawSender, Sender
else:
    from .netinfo import default_interfaces, interface_addresses, interface_gro, interface_mtu, interface_of, route_to
    from .rawsock import RawSender, Sender

__all__ = [
    "DARWIN",
    "UDP_GSO",
    "RawSender",
    "Route",
    "Sender",
    "default_interfaces",
    "interface_addresses",
    "interface_exists",
    "interface_gro",
    "interface_mtu",
    "interface_of",
    "resolve",
    "route_to",
]
