"""Choosing a steering backend and removing what a dead daemon left attached.

The one place that knows which backends a platform has and in what order ``auto`` tries them:
the daemon attaches through ``choose_steering``; ``rsockd --check`` asks ``candidates`` and
``unavailable`` the same questions without attaching anything.  Each backend module is imported
only when it is asked about, so importing this module loads no platform library.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from ..errors import SteerError
from . import Steering, SteerPlan

LOG = logging.getLogger("rsockd")


def candidates(backend: str, platform: str = sys.platform) -> tuple[str, ...]:
    """The backends the config's ``backend`` tries, in order: ``auto`` is xdp then nft on Linux
    and bpfdev on macOS.  ``SteerError`` for a Linux backend asked for on macOS."""
    if backend == "bpfdev" or (backend == "auto" and platform == "darwin"):
        return ("bpfdev",)
    if platform == "darwin":
        raise SteerError(f"backend {backend}: Linux only; on macOS use auto or bpfdev")
    return ("xdp", "nft") if backend == "auto" else (backend,)


def unavailable(name: str) -> str | None:
    """None when the backend ``name`` (xdp, nft or bpfdev) can work here, else a one-line reason."""
    if name == "xdp":
        from . import xdp

        return xdp.bcc_available()
    if name == "nft":
        from . import nft

        return nft.nft_available()
    if name == "bpfdev":
        from . import bpfdev

        why = bpfdev.bpfdev_available()
        return None if why is None else why.removeprefix("bpfdev: ")
    return "no such backend"


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
    """The steering for the config's ``backend``, attached: the first of its ``candidates`` that
    is available and attaches.  ``auto`` falls back from xdp to nft, saying why."""
    names = candidates(backend)
    for name, then in zip(names, (*names[1:], None), strict=True):
        why = unavailable(name)
        if why is None:
            try:
                return _attach(name, plan)
            except SteerError as e:
                if then is None:
                    raise
                why = str(e)
        elif then is None:
            raise SteerError(f"backend {name}: {why}")
        LOG.warning("%s backend unavailable (%s); using the %s backend", name, why, then)
    raise AssertionError("candidates() is never empty")


def _attach(name: str, plan: SteerPlan) -> Steering:
    steering: Steering
    if name == "bpfdev":
        from . import bpfdev

        steering = bpfdev.BpfDevSteering(plan)
        steering.attach()
    elif name == "xdp":
        from . import xdp

        steering = xdp.XdpSteering(plan)
        steering.attach()
        load_notrack(plan)
    else:
        from . import nft

        if plan.role == "server" and plan.syn_rate:
            LOG.warning("the nft backend cannot enforce syn_rate: under a SYN flood established sessions slow down "
                        "(docs/design.md, SYN admission)")
        steering = nft.NftSteering(plan)
        steering.attach()
    return steering


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
