"""The pf side of the macOS backend: the anchor's rules (golden text), pfctl's output, and the
exact pfctl sequences of attach, detach, update and stale clean-up.

pf does not exist on Linux, so the sequences run against a recording stand-in: a ``pfctl``
script on disk (``FAKE_PFCTL``) that appends its argv and stdin to a log and keeps a little
state (anchors, enable references, the main ruleset) so that what it prints follows what was
done.  Its messages are Apple pfctl's own: ``pf enabled`` / ``Token : <n>`` on stderr for -E
(network_cmds pfctl.c ``pfctl_enable``), ``disable request successful. N more pf enable
reference(s) remaining, pf still enabled.`` or ``pf disabled`` for -X, the ALTQ and "-f"
warnings, and label lines ``label evaluations packets bytes in_pkts in_bytes out_pkts out_bytes``.
The BPF devices are ``FakeBpf`` (test_bpfdev_records) over plain files.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from rsockd.errors import SteerError
from rsockd.steer import SteerPlan, bpfdev
from rsockd.steer.bpfdev import DLT_EN10MB, BpfDevSteering, pf_anchor_rules
from tests.unit.test_bpfdev_records import FakeBpf

# ---------------------------------------------------------------------------------------------
# Golden anchor text

SERVER = SteerPlan("east", "server", ("en0",), frozenset({443, *range(10001, 10011)}))
CLIENT4 = SteerPlan("west", "client", ("en0",), frozenset(range(10001, 10011)), frozenset({40000, 40001}),
                    frozenset({"203.0.113.7"}))
CLIENT6 = SteerPlan("west", "client", ("en1",), frozenset({10001}), frozenset({51000}),
                    frozenset({"2001:db8::7"}))
CLIENT46 = SteerPlan("west", "client", ("en0", "en7"), frozenset({80, 443}), frozenset({40000}),
                     frozenset({"2001:db8::7", "203.0.113.9", "203.0.113.7"}))

GOLDEN = {
    "server": (SERVER, """\
# com.apple/100.rsockd.east: rsockd server instance east; written by rsockd at start, flushed at stop (do not edit)
block drop in quick on en0 inet proto tcp from any to any port { 443, 10001:10010 } label "steered_v4"
block drop in quick on en0 inet6 proto tcp from any to any port { 443, 10001:10010 } label "steered_v6"
pass out quick proto tcp from any port { 443, 10001:10010 } to any no state
"""),
    "client-v4": (CLIENT4, """\
# com.apple/100.rsockd.west: rsockd client instance west; written by rsockd at start, flushed at stop (do not edit)
block drop in quick on en0 inet proto tcp from 203.0.113.7 port 10001:10010 to any port 40000:40001 label "steered_v4"
pass out quick inet proto tcp from any port 40000:40001 to 203.0.113.7 port 10001:10010 no state
"""),
    "client-v6": (CLIENT6, """\
# com.apple/100.rsockd.west: rsockd client instance west; written by rsockd at start, flushed at stop (do not edit)
block drop in quick on en1 inet6 proto tcp from 2001:db8::7 port 10001 to any port 51000 label "steered_v6"
pass out quick inet6 proto tcp from any port 51000 to 2001:db8::7 port 10001 no state
"""),
    "client-v4v6": (CLIENT46, """\
# com.apple/100.rsockd.west: rsockd client instance west; written by rsockd at start, flushed at stop (do not edit)
block drop in quick on { en0, en7 } inet proto tcp from { 203.0.113.7, 203.0.113.9 } port { 80, 443 } \
to any port 40000 label "steered_v4"
block drop in quick on { en0, en7 } inet6 proto tcp from 2001:db8::7 port { 80, 443 } to any port 40000 \
label "steered_v6"
pass out quick inet proto tcp from any port 40000 to { 203.0.113.7, 203.0.113.9 } port { 80, 443 } no state
pass out quick inet6 proto tcp from any port 40000 to 2001:db8::7 port { 80, 443 } no state
"""),
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_anchor_rules_golden(case: str) -> None:
    plan, text = GOLDEN[case]
    assert pf_anchor_rules(plan) == text


def test_anchor_rules_with_nothing_to_steer() -> None:
    no_local = SteerPlan("w", "client", ("en0",), frozenset({10001}), frozenset(), frozenset({"203.0.113.7"}))
    no_ports = SteerPlan("e", "server", ("en0",), frozenset())
    for plan in (no_local, no_ports):
        assert pf_anchor_rules(plan).count("\n") == 1 and pf_anchor_rules(plan).startswith("# ")


@pytest.mark.parametrize(("plan", "match"), [
    (SteerPlan("e", "server", ("en0; pass in all",), frozenset({1})), "not an interface name"),
    (SteerPlan("w", "client", ("en0",), frozenset({1}), frozenset({2}), frozenset({"example.com"})),
     "not an IP address"),
    (SteerPlan("a/b", "server", ("en0",), frozenset({1})), "cannot name a pf anchor"),
    (SteerPlan(".x", "server", ("en0",), frozenset({1})), "cannot name a pf anchor"),
    (SteerPlan("e", "server", ("en0",), frozenset({70000})), "out of range"),
])
def test_anchor_rules_refuse_what_pf_cannot_say(plan: SteerPlan, match: str) -> None:
    with pytest.raises(SteerError, match=match):
        pf_anchor_rules(plan)


def test_anchor_name() -> None:
    assert bpfdev.anchor_name("rsockd") == "com.apple/100.rsockd.rsockd"
    # Apple's own children are 200.AirDrop and 250.ApplicationFirewall: ours sorts first.
    assert sorted(["com.apple/250.ApplicationFirewall", "com.apple/200.AirDrop",
                   bpfdev.anchor_name("zz")])[0] == bpfdev.anchor_name("zz")


# ---------------------------------------------------------------------------------------------
# pfctl's output

APPLE_MAIN_RULES = """\
scrub-anchor "com.apple/*" all fragment reassemble
anchor "com.apple/*" all
"""


def test_parse_token() -> None:
    out = "No ALTQ support in kernel\nALTQ related functions disabled\npf enabled\nToken : 13079836479932440064\n"
    assert bpfdev.parse_token(out) == "13079836479932440064"
    assert bpfdev.parse_token("pf enabled\n") is None
    assert bpfdev.parse_token("Token : abc\n") is None


def test_anchor_point() -> None:
    assert bpfdev.has_anchor_point(APPLE_MAIN_RULES)
    assert bpfdev.has_anchor_point('block drop in all\n  anchor "com.apple/*"\n')
    assert not bpfdev.has_anchor_point('scrub-anchor "com.apple/*" all fragment reassemble\n')
    assert not bpfdev.has_anchor_point('anchor "com.apple/250.ApplicationFirewall" all\n')
    assert not bpfdev.has_anchor_point("")


def test_parse_labels() -> None:
    out = ("No ALTQ support in kernel\nALTQ related functions disabled\n"
           "steered_v4 120 17 2210 17 2210 0 0\n"
           "steered_v6 120 5 640 5 640 0 0\n"
           "steered_v4 3 2 80 2 80 0 0\n")
    assert bpfdev.parse_labels(out) == {"steered_v4": 19, "steered_v6": 5}
    assert bpfdev.parse_labels("") == {}


def test_available() -> None:
    assert "macOS" in (bpfdev.bpfdev_available(platform="linux") or "")
    assert "not found" in (bpfdev.bpfdev_available(pfctl="/nonexistent/pfctl", platform="darwin") or "")
    assert "no BPF device" in (bpfdev.bpfdev_available(pfctl=sys.executable, dev_glob="/nonexistent/bpf*",
                                                       platform="darwin") or "")
    assert bpfdev.bpfdev_available(pfctl=sys.executable, dev_glob="/dev/null*", platform="darwin") == (
        None if os.geteuid() == 0 else "bpfdev: BPF devices and pf need root")


# ---------------------------------------------------------------------------------------------
# The recording stand-in for pfctl

FAKE_PFCTL = r'''#!{python}
"""Recording stand-in for macOS pfctl (see test_bpfdev_pf.py)."""
import json, os, sys

HERE = os.path.dirname(os.path.abspath(__file__))
argv = sys.argv[1:]
stdin = sys.stdin.read() if "-f" in argv and argv[argv.index("-f") + 1] == "-" else None
with open(os.path.join(HERE, "log.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": argv, "stdin": stdin}}) + "\n")

def load(name, default):
    try:
        with open(os.path.join(HERE, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return default

def save(name, value):
    with open(os.path.join(HERE, name), "w") as f:
        json.dump(value, f)

ALTQ = "No ALTQ support in kernel\nALTQ related functions disabled\n"
for pattern, (rc, msg) in load("fail.json", {{}}).items():
    if " ".join(argv) == pattern:
        sys.stderr.write(ALTQ + msg + "\n")
        sys.exit(rc)
anchors = load("anchors.json", {{}})
tokens = load("tokens.json", [])
anchor = argv[argv.index("-a") + 1] if "-a" in argv else None
sys.stderr.write(ALTQ)
if argv == ["-s", "rules"]:
    with open(os.path.join(HERE, "main.rules")) as f:
        sys.stdout.write(f.read())
elif anchor and argv[2:] == ["-s", "rules"]:
    if anchor not in anchors:
        sys.stderr.write("pfctl: DIOCGETRULES: Invalid argument\n")
        sys.exit(1)
    for line in anchors[anchor]:
        sys.stdout.write(line + "\n")
elif anchor and argv[2:] == ["-s", "labels"]:
    for n, line in enumerate(anchors.get(anchor, [])):
        if 'label "' in line:
            label = line.split('label "')[1].split('"')[0]
            sys.stdout.write("%s %d %d %d %d %d 0 0\n" % (label, 50, 7 + n, 700, 7 + n, 700))
elif anchor and argv[2:] == ["-f", "-"]:
    sys.stderr.write("pfctl: Use of -f option, could result in flushing of rules\n"
                     "present in the main ruleset added by the system at startup.\n"
                     "See /etc/pf.conf for further details.\n")
    anchors[anchor] = [l for l in stdin.splitlines() if l.strip() and not l.startswith("#")]
    save("anchors.json", anchors)
elif anchor and argv[2:] == ["-F", "rules"]:
    anchors.pop(anchor, None)
    save("anchors.json", anchors)
    sys.stderr.write("rules cleared\n")
elif argv == ["-E"]:
    token = str(13079836479932440064 + len(load("issued.json", [])))
    save("issued.json", load("issued.json", []) + [token])
    save("tokens.json", tokens + [token])
    sys.stderr.write("pf enabled\nToken : %s\n" % token)
elif len(argv) == 2 and argv[0] == "-X":
    if argv[1] not in tokens:
        sys.stderr.write("pfctl: DIOCSTOPREF: No such file or directory\n")
        sys.exit(1)
    tokens.remove(argv[1])
    save("tokens.json", tokens)
    if tokens:
        sys.stderr.write("disable request successful. %d more pf enable reference(s) remaining, "
                         "pf still enabled.\n" % len(tokens))
    else:
        sys.stderr.write("pf disabled\n")
else:
    sys.stderr.write("fake pfctl: unexpected arguments %r\n" % (argv,))
    sys.exit(2)
'''


class Pf:
    """The stand-in's directory: its script, log and state."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.path = root / "pfctl"
        self.path.write_text(FAKE_PFCTL.format(python=sys.executable))
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR)
        (root / "main.rules").write_text(APPLE_MAIN_RULES)

    def log(self) -> list[list[str]]:
        return [e["argv"] for e in self._entries()]

    def stdin(self, n: int) -> str | None:
        return self._entries()[n]["stdin"]  # type: ignore[no-any-return]

    def _entries(self) -> list[dict[str, Any]]:
        p = self.root / "log.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def clear_log(self) -> None:
        (self.root / "log.jsonl").unlink(missing_ok=True)

    def state(self, name: str) -> Any:
        p = self.root / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else ({} if name == "anchors" else [])

    def fail(self, argv: str, rc: int = 1, msg: str = "pfctl: syntax error") -> None:
        fails = json.loads((self.root / "fail.json").read_text()) if (self.root / "fail.json").exists() else {}
        fails[argv] = [rc, msg]
        (self.root / "fail.json").write_text(json.dumps(fails))


@pytest.fixture
def pf(tmp_path: Path) -> Pf:
    return Pf(tmp_path / "pf")


@pytest.fixture
def devglob(tmp_path: Path) -> str:
    d = tmp_path / "dev"
    d.mkdir()
    for n in range(4):
        (d / f"bpf{n}").write_bytes(b"")
    return str(d / "bpf*")


def steering(plan: SteerPlan, pf: Pf, devglob: str, state_dir: Path, fake: FakeBpf) -> BpfDevSteering:
    return BpfDevSteering(plan, pfctl=str(pf.path), dev_glob=devglob, state_dir=str(state_dir), ioctl=fake)


A_EAST = "com.apple/100.rsockd.east"
TOKEN0 = "13079836479932440064"


def fds_closed(fds: list[int]) -> bool:
    for fd in fds:
        try:
            os.fstat(fd)
            return False
        except OSError as e:
            assert e.errno == errno.EBADF
    return True


def test_attach_and_detach_sequence(pf: Pf, devglob: str, tmp_path: Path) -> None:
    plan = SteerPlan("east", "server", ("en0", "en1"), frozenset({443, *range(10001, 10011)}))
    fake = FakeBpf(DLT_EN10MB)
    st = steering(plan, pf, devglob, tmp_path / "run", fake)
    st.attach()
    assert pf.log() == [["-s", "rules"], ["-a", A_EAST, "-f", "-"], ["-E"]]
    assert pf.stdin(1) == pf_anchor_rules(plan)
    assert pf.state("tokens") == [TOKEN0]
    assert (tmp_path / "run" / "east.pf-token").read_text() == TOKEN0 + "\n"
    assert len(pf.state("anchors")[A_EAST]) == 3
    rx = st.receivers()
    assert [getattr(r, "interface", None) for r in rx] == ["en0", "en1"]
    fds = [r.fileno() for r in rx]
    assert sorted(fake.programs) == sorted(fds)
    assert [d["interface"] for d in st.describe()] == ["en0", "en1"]
    assert st.describe()[0]["anchor"] == A_EAST and st.describe()[0]["mode"] == "bpfdev"

    pf.clear_log()
    counters = st.counters()
    assert pf.log() == [["-a", A_EAST, "-s", "labels"]]
    assert (counters["steered_v4"], counters["steered_v6"], counters["receiver_dropped"]) == (7, 8, 0)

    pf.clear_log()
    st.detach()
    assert pf.log() == [["-a", A_EAST, "-F", "rules"], ["-X", TOKEN0]]
    assert pf.state("tokens") == [] and pf.state("anchors") == {}
    assert not (tmp_path / "run" / "east.pf-token").exists()
    assert fds_closed(fds) and st.receivers() == []

    pf.clear_log()
    st.detach()  # idempotent: flushing an empty anchor is harmless, there is no reference left
    assert pf.log() == [["-a", A_EAST, "-F", "rules"]]


def test_another_reference_keeps_pf_enabled(pf: Pf, devglob: str, tmp_path: Path) -> None:
    """Two instances: each holds its own reference and anchor; stopping one leaves the other."""
    east = steering(SERVER, pf, devglob, tmp_path / "run", FakeBpf())
    west = steering(CLIENT4, pf, devglob, tmp_path / "run", FakeBpf())
    east.attach()
    west.attach()
    assert sorted(pf.state("anchors")) == [A_EAST, "com.apple/100.rsockd.west"]
    assert len(pf.state("tokens")) == 2
    east.detach()
    assert list(pf.state("anchors")) == ["com.apple/100.rsockd.west"]
    assert pf.state("tokens") == [(tmp_path / "run" / "west.pf-token").read_text().strip()]
    west.detach()
    assert pf.state("tokens") == [] and pf.state("anchors") == {}


def test_stale_cleanup_at_start(pf: Pf, devglob: str, tmp_path: Path) -> None:
    """A daemon killed while attached leaves its anchor and its reference; the next start
    removes both (the token file tells which reference was its own)."""
    dead = steering(SERVER, pf, devglob, tmp_path / "run", FakeBpf())
    dead.attach()
    for r in dead.receivers():
        os.close(r.fileno())  # what the kernel does when the process dies; no detach
    pf.clear_log()
    removed = bpfdev.cleanup_stale("east", pfctl=str(pf.path), state_dir=str(tmp_path / "run"))
    assert pf.log() == [["-a", A_EAST, "-s", "rules"], ["-a", A_EAST, "-F", "rules"], ["-X", TOKEN0]]
    assert removed == [f"pf anchor {A_EAST}", f"pf enable reference {TOKEN0}"]
    assert pf.state("anchors") == {} and pf.state("tokens") == []
    assert not (tmp_path / "run" / "east.pf-token").exists()

    pf.clear_log()
    assert bpfdev.cleanup_stale("east", pfctl=str(pf.path), state_dir=str(tmp_path / "run")) == []
    assert pf.log() == [["-a", A_EAST, "-s", "rules"]]


def test_attach_releases_a_stale_reference_itself(pf: Pf, devglob: str, tmp_path: Path) -> None:
    dead = steering(SERVER, pf, devglob, tmp_path / "run", FakeBpf())
    dead.attach()
    for r in dead.receivers():
        os.close(r.fileno())
    pf.clear_log()
    st = steering(SERVER, pf, devglob, tmp_path / "run", FakeBpf())
    st.attach()
    new = str(int(TOKEN0) + 1)
    assert pf.log() == [["-X", TOKEN0], ["-s", "rules"], ["-a", A_EAST, "-f", "-"], ["-E"]]
    assert pf.state("tokens") == [new]
    assert (tmp_path / "run" / "east.pf-token").read_text().strip() == new
    st.detach()


def test_failure_after_enable_undoes_everything(pf: Pf, devglob: str, tmp_path: Path) -> None:
    """The reference cannot be recorded (the state dir is under a file): the rules are flushed
    and the reference released before the error goes up."""
    (tmp_path / "file").write_text("")
    fake = FakeBpf()
    st = steering(SERVER, pf, devglob, tmp_path / "file" / "run", fake)
    with pytest.raises(SteerError, match="cannot record the pf reference"):
        st.attach()
    assert pf.log() == [["-s", "rules"], ["-a", A_EAST, "-f", "-"], ["-E"], ["-a", A_EAST, "-F", "rules"],
                        ["-X", TOKEN0]]
    assert pf.state("tokens") == [] and pf.state("anchors") == {}
    assert fds_closed(list(fake.programs)) and st.receivers() == []
    pf.clear_log()
    st.detach()  # still safe after a failed attach
    assert pf.log() == [["-a", A_EAST, "-F", "rules"]]


def test_failure_of_enable_flushes_the_rules(pf: Pf, devglob: str, tmp_path: Path) -> None:
    pf.fail("-E", 1, "pfctl: DIOCSTARTREF: Operation not permitted")
    fake = FakeBpf()
    st = steering(SERVER, pf, devglob, tmp_path / "run", fake)
    with pytest.raises(SteerError, match="pfctl -E: pfctl: DIOCSTARTREF: Operation not permitted"):
        st.attach()
    assert pf.log() == [["-s", "rules"], ["-a", A_EAST, "-f", "-"], ["-E"], ["-a", A_EAST, "-F", "rules"]]
    assert pf.state("anchors") == {} and fds_closed(list(fake.programs))


def test_failure_of_load(pf: Pf, devglob: str, tmp_path: Path) -> None:
    pf.fail(f"-a {A_EAST} -f -", 1, "stdin:2: syntax error")
    st = steering(SERVER, pf, devglob, tmp_path / "run", FakeBpf())
    with pytest.raises(SteerError, match="stdin:2: syntax error"):
        st.attach()
    assert pf.log() == [["-s", "rules"], ["-a", A_EAST, "-f", "-"], ["-a", A_EAST, "-F", "rules"]]


def test_missing_anchor_point(pf: Pf, devglob: str, tmp_path: Path) -> None:
    """Someone flushed the main ruleset: our anchor would never be evaluated.  Say so, touch
    nothing."""
    (pf.root / "main.rules").write_text("")
    fake = FakeBpf()
    st = steering(SERVER, pf, devglob, tmp_path / "run", fake)
    with pytest.raises(SteerError, match=r'no anchor "com\.apple/\*".*sudo pfctl -f /etc/pf.conf'):
        st.attach()
    assert pf.log() == [["-s", "rules"]]
    assert fds_closed(list(fake.programs))


def test_device_failure_touches_no_pf(pf: Pf, devglob: str, tmp_path: Path) -> None:
    fake = FakeBpf(missing=["en1"])
    plan = SteerPlan("east", "server", ("en0", "en1"), frozenset({10001}))
    st = steering(plan, pf, devglob, tmp_path / "run", fake)
    with pytest.raises(SteerError, match="interface en1 does not exist"):
        st.attach()
    assert pf.log() == []
    assert fds_closed(list(fake.programs))


def test_bad_plan_fails_before_anything(pf: Pf, devglob: str, tmp_path: Path) -> None:
    fake = FakeBpf()
    for plan, match in ((SteerPlan("east", "server", (), frozenset({1})), "no interface"),
                        (SteerPlan("east", "client", ("en0",), frozenset({1}), frozenset({2}), frozenset({"x"})),
                         "not an IP address")):
        with pytest.raises(SteerError, match=match):
            steering(plan, pf, devglob, tmp_path / "run", fake).attach()
    assert pf.log() == [] and fake.calls == []


def test_pfctl_missing(devglob: str, tmp_path: Path) -> None:
    st = BpfDevSteering(SERVER, pfctl=str(tmp_path / "nope"), dev_glob=devglob, state_dir=str(tmp_path / "run"),
                        ioctl=FakeBpf())
    with pytest.raises(SteerError, match="not found"):
        st.attach()
    assert st.receivers() == []


def test_update(pf: Pf, devglob: str, tmp_path: Path) -> None:
    fake = FakeBpf({"en0": DLT_EN10MB, "en1": DLT_EN10MB, "lo0": bpfdev.DLT_NULL})
    st = steering(CLIENT4, pf, devglob, tmp_path / "run", fake)
    st.attach()
    en0 = st.receivers()[0].fileno()
    pf.clear_log()
    new = SteerPlan("west", "client", ("en0", "lo0"), CLIENT4.tunnel_ports, frozenset({40000, 40002}),
                    frozenset({"203.0.113.7", "2001:db8::7"}))
    st.update(new)
    anchor = "com.apple/100.rsockd.west"
    assert pf.log() == [["-a", anchor, "-f", "-"]]
    assert pf.stdin(0) == pf_anchor_rules(new)
    assert fake.programs[en0][-1] == bpfdev.receiver_filter(new, DLT_EN10MB)
    lo0 = next(r for r in st.receivers() if getattr(r, "interface", "") == "lo0").fileno()
    assert fake.programs[lo0] == [bpfdev.receiver_filter(new, bpfdev.DLT_NULL)]

    pf.clear_log()
    st.update(SteerPlan("west", "client", ("lo0",), new.tunnel_ports, new.local_ports, new.peers))
    assert fds_closed([en0]) and [r.fileno() for r in st.receivers()] == [lo0]
    st.detach()
    assert pf.state("anchors") == {} and pf.state("tokens") == []


def test_update_to_another_instance_moves_anchor_and_reference(pf: Pf, devglob: str, tmp_path: Path) -> None:
    st = steering(SERVER, pf, devglob, tmp_path / "run", FakeBpf())
    st.attach()
    pf.clear_log()
    renamed = SteerPlan("north", "server", SERVER.interfaces, SERVER.tunnel_ports)
    st.update(renamed)
    assert pf.log() == [["-a", "com.apple/100.rsockd.north", "-f", "-"], ["-a", A_EAST, "-F", "rules"]]
    assert list(pf.state("anchors")) == ["com.apple/100.rsockd.north"]
    assert (tmp_path / "run" / "north.pf-token").read_text().strip() == TOKEN0
    assert not (tmp_path / "run" / "east.pf-token").exists()
    st.detach()
    assert pf.state("anchors") == {} and pf.state("tokens") == []


def test_update_before_attach_only_records_the_plan(pf: Pf, devglob: str, tmp_path: Path) -> None:
    st = steering(SERVER, pf, devglob, tmp_path / "run", FakeBpf())
    st.update(CLIENT4)
    assert st.plan == CLIENT4 and pf.log() == []


def test_failed_update_keeps_the_running_state(pf: Pf, devglob: str, tmp_path: Path) -> None:
    fake = FakeBpf(missing=["en9"])
    st = steering(SERVER, pf, devglob, tmp_path / "run", fake)
    st.attach()
    before = pf.state("anchors")
    with pytest.raises(SteerError, match="en9 does not exist"):
        st.update(SteerPlan("east", "server", ("en0", "en9"), frozenset({1})))
    assert pf.state("anchors") == before and st.plan == SERVER
    assert len(st.receivers()) == 1
    st.detach()
