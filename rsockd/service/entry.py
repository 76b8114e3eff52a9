"""The ``rsockd`` console script: the daemon's entry point, loaded before anything heavy.

The daemon never speaks TLS and its only hash is BLAKE2, built into CPython; yet ``import
asyncio`` loads ``ssl`` and ``hashlib`` loads ``_hashlib``, mapping OpenSSL's libssl and libcrypto
(~7 MB resident).  Marking both as absent before the daemon is imported keeps them out of this
process only (asyncio and hashlib fall back by design: ``ssl = None``, builtin hashes).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    for name in ("ssl", "_ssl", "_hashlib"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    if "RSOCKD_WORKER_FD" in os.environ:  # a server worker started by the daemon (rsockd/service/worker.py)
        from .worker import child_main

        return child_main()
    from .daemon import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
