"""rsockd: carry UDP datagrams inside fake TCP segments.

Importing the package loads nothing platform-specific: bcc, nftables and the
macOS ioctls are imported only inside their backends (``rsockd.steer``).
"""

from __future__ import annotations

__version__ = "0.1.0"
