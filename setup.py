"""Build rsockd, compiling with mypyc, when mypyc is there, the modules ``rsockd.NATIVE`` names.

Everything else is in pyproject.toml.  The compiled modules are the same source: the
interpreter imports a module's extension before its ``.py``, and ``RSOCKD_PURE=1`` at run time
makes it take the ``.py`` (rsockd/__init__.py).  ``RSOCKD_COMPILE=0`` builds the pure package
(also what happens when mypyc cannot be imported); ``RSOCKD_COMPILE=1`` makes a missing mypyc an
error instead; ``RSOCKD_COMPILE=c`` builds the C extensions alone.  docs/design.md "The compiled
core" says which modules and why.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

# What rsockd.NATIVE names: the pure core and the dataplane's per-datagram modules, as one shared
# library inside the package (calls between them stay native).  rsockd/__init__.py reads only
# the standard library; RSOCKD_PURE keeps it from looking for a build of its own.
os.environ["RSOCKD_PURE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rsockd import C_EXTENSIONS, native_sources

COMPILED = [os.path.relpath(p) for p in native_sources()]


def ext_modules() -> list:  # type: ignore[type-arg]
    want = os.environ.get("RSOCKD_COMPILE", "auto")
    if want in ("0", "c"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if want == "1":
            sys.exit("setup.py: RSOCKD_COMPILE=1 but mypyc is not installed")
        print("setup.py: mypyc not installed: building the pure-Python package", file=sys.stderr)
        return []
    try:  # the shared library inside the package, where mypyc can name it (1.3+)
        return mypycify(COMPILED, opt_level="3", debug_level="0", group_name="rsockd.core._native")
    except TypeError:  # an older mypyc (Debian bookworm's 1.0): a top-level module of its own
        return mypycify(COMPILED, opt_level="3", debug_level="0")


def c_extensions() -> list[Extension]:
    """The C extensions (rsockd.C_EXTENSIONS: Linux only, they read sockets with recvmmsg), built
    whenever the package compiles anything; ``RSOCKD_COMPILE=0`` leaves them out too, and
    ``RSOCKD_COMPILE=c`` builds only them (the .deb: its mypyc is too old)."""
    want = os.environ.get("RSOCKD_COMPILE", "auto")
    if want == "0" or not sys.platform.startswith("linux"):
        return []
    # "auto": a build that fails leaves the relay's Python loops (a warning); "1" and "c": an error
    return [Extension(name, [os.path.join("rsockd", src)], extra_compile_args=["-O3", "-std=gnu11"],
                      optional=want == "auto")
            for name, src in C_EXTENSIONS.items()]


setup(ext_modules=[*ext_modules(), *c_extensions()])
