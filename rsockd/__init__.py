"""rsockd: carry UDP datagrams inside fake TCP segments.

Importing the package loads nothing platform-specific: bcc, nftables and the
macOS ioctls are imported only inside their backends (``rsockd.steer``).

The core (``rsockd.core``) and the dataplane's per-datagram modules may be compiled with mypyc
(setup.py, ``NATIVE``, docs/design.md "The compiled core"): the interpreter then imports each
module's extension before its ``.py``.  The source is
taken instead when ``RSOCKD_PURE=1`` is in the environment, or in a source tree whose build is
older than its source (the digest ``scripts/setup`` leaves in ``rsockd/core/_native.stamp``
differs): a stale build never runs.
"""

from __future__ import annotations

import os
import sys
import zlib

__version__ = "0.1.0"

_STAMP = os.path.join(os.path.dirname(__file__), "core", "_native.stamp")


#: What a build compiles (setup.py), relative to the package: the pure core, and the dataplane
#: modules that every datagram passes through (mypyc).
NATIVE = ("core/*.py", "dataplane/relay.py", "dataplane/delivery.py", "dataplane/packetsend.py")
#: ... and the C extensions, which have no Python twin of the same name: the compiled reader of the
#: tunnel sockets (Linux; relay.py's loops are what runs without it).
C_EXTENSIONS = {"rsockd.dataplane._datapath": "dataplane/_datapath.c"}


def native_sources() -> list[str]:
    """The source files a compiled build compiles with mypyc (``__init__.py`` files never are)."""
    import glob

    base = os.path.dirname(__file__)
    return sorted(p for pattern in NATIVE for p in glob.glob(os.path.join(base, pattern))
                  if os.path.basename(p) != "__init__.py")


def native_digest() -> str:
    """A checksum of what a build compiles.  (zlib, not hashlib: this runs before
    rsockd.service.entry keeps OpenSSL out of the daemon, and it only tells a build from an
    edit.)"""
    crc = 0
    base = os.path.dirname(__file__)
    for path in native_sources() + sorted(os.path.join(base, c) for c in C_EXTENSIONS.values()):
        with open(path, "rb") as f:
            crc = zlib.crc32(os.path.basename(path).encode() + b"\0" + f.read(), crc)
    return f"crc32:{crc:08x}"


def _stale_build() -> bool:
    try:
        with open(_STAMP) as f:
            built = f.read().strip()
    except OSError:
        return False  # an installed package (no stamp): its build is its source
    if built == native_digest():
        return False
    print("rsockd: the compiled build is older than its source: running the source "
          "(./scripts/setup rebuilds it)", file=sys.stderr)
    return True


PURE = os.environ.get("RSOCKD_PURE", "") not in ("", "0") or _stale_build()

if PURE:
    from collections.abc import Sequence
    from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
    from types import ModuleType

    class _SourceOnly:
        """Finds ``rsockd.*`` modules among ``.py`` files only, before the path finder would
        take an extension module of the same name."""

        @staticmethod
        def find_spec(name: str, path: Sequence[str] | None = None,
                      target: ModuleType | None = None) -> ModuleSpec | None:
            if not name.startswith("rsockd.") or not path:
                return None
            for entry in path:
                spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
                if spec is not None:
                    return spec
            return None

    sys.meta_path.insert(0, _SourceOnly())


def compiled() -> bool:
    """Does the core run compiled (mypyc) rather than interpreted?"""
    from .core import endpoint

    return not (endpoint.__file__ or ".py").endswith(".py")
