"""The system service: the daemon's wiring, server workers, the control socket, sd_notify, the
configuration and the one status schema.  ``python -m rsockd.service`` is the daemon (entry.py)."""
