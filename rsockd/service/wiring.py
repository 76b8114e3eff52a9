"""From configuration to the running pieces: the endpoint's policy, and live reload."""

from __future__ import annotations

import logging
from typing import Any

from ..core.endpoint import Policy
from ..core.faketcp import Timing
from ..dataplane.relay import Relay, ServerRelay
from .config import Config


def timing_of(cfg: Config) -> Timing:
    return Timing(keepalive=cfg.keepalive, dead_timeout=cfg.dead_timeout, syn_timeout=cfg.syn_timeout,
                  reconnect_min=cfg.reconnect_min, reconnect_max=cfg.reconnect_max)


def policy_of(cfg: Config) -> Policy:
    """What the pure endpoint needs of ``cfg``."""
    return Policy(key=cfg.key, timing=timing_of(cfg), transports=cfg.transports, idle=cfg.duration,
                  max_flows=cfg.max_flows, backlog=cfg.backlog, max_sessions=cfg.max_sessions,
                  max_conns_per_client=cfg.max_conns_per_client, hello_skew=cfg.hello_skew)


def apply_live(relay: Relay[Any], new: Config, changed: set[str]) -> None:
    """Apply the ``LIVE_KEYS`` in ``changed`` to a running relay (the daemon's or a worker's)."""
    relay.cfg = new
    if "log_level" in changed:
        logging.getLogger().setLevel(new.log_level.upper())
    relay.endpoint.reconfigure(policy_of(new))
    if "target" in changed and new.target is not None and isinstance(relay, ServerRelay):
        relay.set_target(new.target)
