"""rsockd: carry UDP datagrams inside fake TCP segments.

Importing the package loads nothing platform-specific: bcc, nftables and the
macOS ioctls are imported only inside their backends (``rsockd.steer``).

The core (``rsockd.core``) may be compiled with mypyc (setup.py, docs/design.md "The compiled
core"): the interpreter then imports each module's extension before its ``.py``.  The source is
taken instead when ``RSOCKD_PURE=1`` is in the environment, or in a source tree whose build is
older than its source (the digest ``scripts/setup`` leaves in ``rsockd/core/_native.sha256``
differs): a stale build never runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

_CORE = Path(__file__).parent / "core"
_STAMP = _CORE / "_native.sha256"


def core_digest() -> str:
    """The hash of the core's source: the modules that a compiled build compiles."""
    h = hashlib.sha256()
    for p in sorted(_CORE.glob("*.py")):
        if p.name != "__init__.py":
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _stale_build() -> bool:
    try:
        built = _STAMP.read_text().strip()
    except OSError:
        return False  # an installed package (no stamp): its build is its source
    if built == core_digest():
        return False
    print("rsockd: the compiled core is older than its source: running the source "
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
