"""The protocol, pure: packets, records, the fake-TCP connection, sessions and the endpoint.

Bytes in, bytes and events out, ``now`` passed in.  Nothing here opens a socket, reads a clock or
imports anything outside ``rsockd.core`` but ``rsockd.errors`` (tests/unit/test_layers.py).
"""
