"""Moves bytes between sockets and the pure endpoint, in batches: the asyncio relay, the send
paths (raw sockets, packet sockets), host facts (routes, addresses, MTUs).  Knows sockets, not
policy.  ``platform.py`` is the one place that picks the Linux or macOS implementations."""
