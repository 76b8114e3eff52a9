"""The benchmark's profile summary names the compiled daemon's own functions (py-spy --native)."""

from __future__ import annotations

from bench import pyspy

SO = "/work/rsockd/core/_native__mypyc.cpython-311-x86_64-linux-gnu.so"
RAW = "\n".join([
    f"<module> (rsockd:8);main (rsockd/service/daemon.py:450);CPyPy_relay___Relay____on_data ({SO});"
    f"CPyDef_relay___Relay____on_data ({SO});Writer_fill (rsockd/dataplane/_datapath.c:1610);"
    "sendmmsg (libc.so.6) 6",
    f"<module> (rsockd:8);main (rsockd/service/daemon.py:450);CPyDef_relay___Relay____on_data ({SO});"
    f"CPyDef_endpoint____whole ({SO}) 3",
    "<module> (rsockd:8);main (rsockd/service/daemon.py:450);_on_app (rsockd/dataplane/relay.py:733) 1",
])


def test_compiled_frames_are_named_as_their_source() -> None:
    r = pyspy.summarise(RAW, 1.0)
    assert r["samples"] == 10
    assert [(x["function"], x["samples"]) for x in r["self"]] == [
        ("libc.so.6:sendmmsg", 6), ("endpoint.py:_whole", 3), ("relay.py:_on_app", 1)]
    inclusive = {x["function"]: x["samples"] for x in r["inclusive"]}
    # the wrapper and the function are one name, counted once per stack; the entry frames are left out
    assert inclusive["relay.py:Relay._on_data"] == 9 and inclusive["_datapath.c:Writer_fill"] == 6
    assert not any(f.startswith(("rsockd:", "daemon.py:main")) for f in inclusive)
