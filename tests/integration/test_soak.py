"""The short soak (issue 8, item 6): 150 s of mixed traffic with reloads and forced reconnects.

``bench.soak`` runs a real pair with bulk (both ways, large and small datagrams), paced, ping and
flow-churn traffic; every 15 s, in turn, both daemons reload (the key, then the keepalive, changed
in their files) or a connection is reset by an RST at exactly its expected sequence number (at
the client, then at the server).  RSS and open descriptors of both daemons are sampled every 5 s;
after a 30 s warm-up neither may grow.  The 30-minute version is ``sudo .venv/bin/python -m
bench.soak`` (see its docstring).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import Options, Sample, Soak, render, verdict


def _samples(rss: list[float], fds: list[int]) -> list[Sample]:
    return [Sample(t=10.0 * i, rss_mb={"server": r, "client": 40.0}, fds={"server": f, "client": 20}, conns_up=4,
                   flows={"server": 1, "client": 1}, streams={}) for i, (r, f) in enumerate(zip(rss, fds, strict=True))]


def test_the_verdict_tolerates_noise_and_catches_growth() -> None:
    flat = verdict(_samples([40, 45, 41.0, 41.5, 40.8, 41.2, 41.9, 41.1, 40.9, 41.4], [30, 31, 33, 30, 32, 31, 30,
                                                                                        33, 31, 32]), warmup=15)
    assert flat.ok, flat.reasons  # the warm-up's 45 MB is not judged; +-1 MB and +-3 fds are noise
    leak = verdict(_samples([40 + i for i in range(10)], [30] * 10), warmup=15)
    assert not leak.ok and leak.reasons == ["server.rss_mb grew by 6.0 after the warm-up (tolerance 3.0)"]
    assert leak.slope_per_min["server.rss_mb"] == 6.0
    fd_leak = verdict(_samples([40] * 10, [30 + 2 * i for i in range(10)]), warmup=15)
    assert not fd_leak.ok and "server.fds" in fd_leak.reasons[0]
    assert not verdict(_samples([40, 40], [30, 30]), warmup=0).ok  # too few samples proves nothing


@pytest.mark.root
@pytest.mark.slow
def test_short_soak_memory_and_descriptors_do_not_grow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    o = Options(minutes=2.5, event_every=15.0, sample_every=5.0, warmup=30.0, backend="xdp")
    result = Soak(tmp_path, o).run()
    with capsys.disabled():  # the figures belong in the suite's output, passing or not
        print("\n== short soak, xdp backend, 150 s\n" + render(result), flush=True)
    assert len(result.events) >= 6, result.events  # reloads and reconnects both happened, more than once
    assert sum("reconnect" in w for _t, w in result.events) >= 3
    assert result.ok, result.verdict.reasons + result.problems
