"""Choosing a steering backend and removing what a dead daemon left attached.

The one place that knows which backends a platform has and in what order ``auto`` tries them:
the daemon attaches through ``choose_steering``, ``rsockd --check`` asks ``unavailable`` the same
questions without attaching anything.  Each backend module is imported only when it is asked
about, so importing this module loads no platform library.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from ..errors import SteerError
from . import Steering, SteerPlan

LOG = logging.getLogger("rsockd")


def unavailable(backend: str) -> str | None:
    """None when ``backend`` (xdp, nft or bpfdev) can work here, else a one-line reason."""
    if backend == "xdp":
        from . import xdp

        return xdp.bcc_available()
    if backend == "nft":
        from . import nft

        return nft.nft_available()
    if backend == "bpfdev":
        from . import bpfdev

        return bpfdev.bpfdev_available()
    return f"{backend}: no such backend"


def cleanup_stale(instance: str) -> list[str]:
    """Remove what a dead daemon of ``instance`` left attached (any backend)."""
    removed: list[str] = []
    if sys.platform == "darwin":
        from . import bpfdev

        with contextlib.suppress(SteerError, OSError):
            removed += bpfdev.cleanup_stale(instance)
        return removed
    if sys.platform != "linux":
        return removed
    from . import nft, xdp

    with contextlib.suppress(SteerError, OSError, ImportError):
        removed += xdp.cleanup_stale(instance)
    with contextlib.suppress(SteerError, OSError, ImportError):
        if nft.nft_available() is None and nft.cleanup_stale(instance):
            removed.append(f"nft table {nft.table_name(instance)}")
    return removed


def choose_steering(backend: str, plan: SteerPlan) -> Steering:
    """The steering for ``backend`` (the config's ``backend``), attached.  ``auto`` falls back
    from xdp to nft, saying why; on macOS ``auto`` means bpfdev."""
    if backend == "bpfdev" or (backend == "auto" and sys.platform == "darwin"):
        from . import bpfdev

        why = unavailable("bpfdev")
        if why is not None:
            raise SteerError(f"backend {why}")
        mac = bpfdev.BpfDevSteering(plan)
        mac.attach()
        return mac
    if sys.platform == "darwin":
        raise SteerError(f"backend {backend}: Linux only; on macOS use auto or bpfdev")
    from . import nft, xdp

    if backend in ("auto", "xdp"):
        reason = unavailable("xdp")
        if reason is None:
            steering = xdp.XdpSteering(plan)
            try:
                steering.attach()
                load_notrack(plan)
                return steering
            except SteerError as e:
                if backend == "xdp":
                    raise
                reason = str(e)
        elif backend == "xdp":
            raise SteerError(f"backend xdp: {reason}")
        LOG.warning("xdp backend unavailable (%s); using the nft backend", reason)
    why = unavailable("nft")
    if why is not None:
        raise SteerError(f"backend nft: {why}")
    if plan.role == "server" and plan.syn_rate:
        LOG.warning("the nft backend cannot enforce syn_rate: under a SYN flood established sessions slow down "
                    "(docs/design.md, SYN admission)")
    n = nft.NftSteering(plan)
    n.attach()
    return n


def load_notrack(plan: SteerPlan) -> None:
    """Exempt our marked raw sends from the host's conntrack (docs/design.md, Marks and conntrack)."""
    from . import nft

    why = nft.nft_available()
    if why is not None:
        LOG.warning("no notrack rule for our packets (%s): a firewall dropping INVALID in output would drop them", why)
        return
    try:
        nft.load_notrack(plan.instance, plan.mark)
    except SteerError as e:
        LOG.warning("no notrack rule for our packets: %s", e)


def unload_notrack(instance: str) -> None:
    """Remove the notrack table ``load_notrack`` loaded (the xdp backend's); quiet when absent."""
    from . import nft

    with contextlib.suppress(SteerError, OSError, ImportError):
        if nft.nft_available() is None:
            nft.unload(instance)
