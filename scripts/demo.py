"""The demo behind ``sudo ./scripts/demo``: see that script.  Everything is torn down on exit,
Ctrl-C or failure (the rig deletes the namespaces, which takes the veth and all steering with it,
after stopping both daemons)."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.rig import ECHO_PORT, LISTEN_PORT, Rig, nstat

BULK = str(Path(__file__).resolve().parents[1] / "bench" / "udpbulk.py")


def ms(x: float) -> str:
    return f"{x * 1000:.3f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description="rsockd end to end in two network namespaces")
    ap.add_argument("--backend", default="auto", choices=["auto", "xdp", "nft"])
    ap.add_argument("--type", default="tcp", choices=["tcp", "udp", "all"])
    ap.add_argument("--echo", type=int, default=200, help="echo round trips")
    ap.add_argument("--bulk", type=int, default=20000, help="datagrams in the bulk run")
    ap.add_argument("--rate", type=int, default=10000, help="bulk datagrams per second")
    args = ap.parse_args()

    def stop(*_: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)

    tmp = Path(tempfile.mkdtemp(prefix="rsockd-demo-"))  # the daemons' logs and notify sockets
    print("== starting a server and a client rsockd in two network namespaces joined by a veth pair")
    t0 = time.monotonic()
    done = False
    try:
        with Rig(tmp, backend=args.backend, transport=args.type) as rig:
            net = rig.net
            assert rig.server is not None
            up = time.monotonic() - t0
            print(f"   server: netns {net.ns['s']} {net.srv4}, ports {rig.ports}, "
                  f"target 127.0.0.1:{ECHO_PORT} (UDP echo)")
            print(f"   client: netns {net.ns['c']} {net.cli4}, listening on 127.0.0.1:{LISTEN_PORT}")
            print(f"   both ready and {rig.conns_per_client()} connections up after {up:.1f} s")
            base = {s: nstat(net, s, "TcpOutRsts", "TcpOutSegs") for s in "cs"}

            print(f"\n== echo: {args.echo} datagrams of 200 bytes, one at a time, through the tunnel")
            res = rig.echo_run(args.echo, size=200)
            rtt = sorted(res.rtts)
            print(f"   received {res.received}/{res.sent} (loss {res.loss:.1%})")
            if rtt:
                print(f"   RTT p50 {ms(statistics.median(rtt))}, p99 {ms(rtt[int(len(rtt) * 0.99) - 1])}, "
                      f"max {ms(rtt[-1])}")

            print(f"\n== bulk: {args.bulk} datagrams of 1200 bytes at {args.rate}/s, client -> server")
            rig.echo.close()  # type: ignore[union-attr]  # the sink takes the target port
            rig.echo = None
            sink = net.popen("s", [sys.executable, BULK, "sink", "127.0.0.1", str(ECHO_PORT)], stdout=subprocess.PIPE)
            assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            net.run("c", [sys.executable, BULK, "send", "127.0.0.1", str(LISTEN_PORT), str(args.bulk), "1200",
                          str(args.rate)], timeout=600)
            got = json.loads(sink.communicate(timeout=60)[0].strip().splitlines()[-1])
            print(f"   received {got['distinct']}/{args.bulk} (loss {1 - got['distinct'] / args.bulk:.2%}), "
                  f"{got['mbit_s']:.0f} Mbit/s over {got['seconds']:.1f} s")

            after = {s: nstat(net, s, "TcpOutRsts", "TcpOutSegs") for s in "cs"}
            print("\n== the kernels stayed silent on the tunnel ports:")
            for s, name in (("s", "server"), ("c", "client")):
                d = {k: after[s][k] - base[s][k] for k in base[s]}
                print(f"   {name}: TcpOutRsts +{d['TcpOutRsts']}, TcpOutSegs +{d['TcpOutSegs']}")
            for d in (rig.server, rig.client):
                print(f"\n== rsockctl status ({d.name})")
                print(d.ctl("status").stdout, end="")
            print("\n== rsockctl ports (client)")
            print(rig.client.ctl("ports").stdout, end="")
            print("\n== stopping and tearing down")
        done = True
    except KeyboardInterrupt:
        print("\ninterrupted: torn down", file=sys.stderr)
        return 130
    finally:
        if done:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"the daemons' logs are kept in {tmp}", file=sys.stderr)
    print("done: namespaces, veth, XDP/TC programs, nft tables and the logs are gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
