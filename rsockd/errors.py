"""The one error hierarchy of rsockd.

User-facing errors (``RsockdError`` and subclasses) carry a one-line message that says what is
wrong and where; the entry points print it and exit with ``exit_code``, never a traceback.

Protocol errors follow h11: ``LocalProtocolError`` means we misused an object (a bug here),
``RemoteProtocolError`` means the peer sent garbage.  Peer garbage never escapes into the event
loop: the parsers raise ``PacketError``/``FrameError`` (both ``RemoteProtocolError``) and the
connection turns them into a counted drop.
"""

from __future__ import annotations

import errno


class RsockdError(Exception):
    """An error the user can act on; ``str(err)`` is the one line to print."""

    exit_code = 1


class ConfigError(RsockdError):
    """A bad configuration file or flag: ``path: key: problem``."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        parts = [p for p in (source, key) if p]
        super().__init__(": ".join([*parts, message]))
        self.source = source
        self.key = key


class InputError(RsockdError):
    """Unreadable or ill-formed input to a command (a file, a pair of files)."""

    exit_code = 2


class SteerError(RsockdError):
    """Steering (XDP/TC, nftables, BPF device, pf) could not be set up or torn down."""

    exit_code = 1


class LocalProtocolError(Exception):
    """rsockd itself misused a protocol object (a bug, not peer input)."""


class RemoteProtocolError(Exception):
    """The peer (or anyone on the path) sent something malformed or unauthenticated."""


class PacketError(RemoteProtocolError):
    """An IP/TCP header or option list that cannot be parsed."""


class FrameError(RemoteProtocolError):
    """A tunnel record or frame that cannot be parsed or does not authenticate."""


def errno_name(e: OSError | int) -> str:
    """The errno of ``e`` (or an errno) as a counter name: ``eagain``, ``enobufs``... (``error`` when
    it has none)."""
    n = e if isinstance(e, int) else e.errno or 0
    return errno.errorcode.get(n, "error").lower()
