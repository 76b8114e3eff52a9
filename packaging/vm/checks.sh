#!/bin/bash
# The rsockd package checks.  Runs INSIDE the test VM as root, started by rsockd-vmtest.service
# from the 9p share (packaging/vm/run.sh puts this file, the .deb, standin.py,
# checksum-samples.txt and checks.env there):
#
#   checks.sh SHARE      writes SHARE/results/checks.log, SHARE/results/started and, last,
#                        SHARE/results/status (the exit status: 0 when no check failed)
#
# Each check is a function that returns 0 (PASS), 1 (FAIL) or 77 (SKIP, with the reason as its
# last line).  They run in order and share state: the package is installed by the first and
# purged by the last but one.  The daemon checks (daemon_*) need the real rsockd and are skipped
# unless RSOCKD_VM_DAEMON_CHECKS=1 (set it on the host; run.sh passes it in checks.env).
set -uo pipefail
share=${1:-/mnt/share}
results=$share/results
mkdir -p "$results"
exec > >(tee "$results/checks.log") 2>&1
tee_pid=$!
date -u +%FT%TZ > "$results/started"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0
RSOCKD_VM_DAEMON_CHECKS=0
# shellcheck source=/dev/null
[ -f "$share/checks.env" ] && . "$share/checks.env"

# Each check runs in a subshell (its output is collected): state passes through the system only.
work=/root/rsockd-vmtest
mkdir -p "$work"
deb=$(ls "$share"/rsockd_*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] && cp "$deb" "$work/" && deb="$work/$(basename "$deb")"
standin=/usr/local/lib/rsockd-vmtest/standin.py
dropins=/run/systemd/system

SKIP=77
skip() { echo "$*"; return $SKIP; }
# `expect WHAT CMD...`: run CMD; when it fails, print its output indented and fail with WHAT.
expect() {
  local what=$1 out rc
  shift
  out=$("$@" 2>&1); rc=$?
  [ $rc = 0 ] && return 0
  [ -n "$out" ] && sed 's/^/    /' <<<"$out"
  echo "  not so: $what (exit $rc: $*)"
  return 1
}
# apt without the progress lines of dpkg.
apt_get() { apt-get -y -q -o Dpkg::Use-Pty=0 "$@"; }
# `absent PATH...`: fail naming every PATH that exists.
absent() {
  local p bad=0
  for p in "$@"; do
    if [ -e "$p" ] || [ -L "$p" ]; then echo "  still there: $p"; bad=1; fi
  done
  return $bad
}
has_module() { python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# A drop-in (runtime, under /run) that turns rsockd@NAME into the stand-in daemon.  Only
# ExecStart changes: Type=notify, the watchdog, ExecReload and the whole sandbox stay.
standin_instance() {
  local name=$1 args=$2
  mkdir -p "$dropins/rsockd@$name.service.d"
  printf '[Service]\nExecStart=\nExecStart=/usr/bin/python3 %s %s %s\n' "$standin" "$name" "$args" \
    > "$dropins/rsockd@$name.service.d/standin.conf"
  systemctl daemon-reload
}
unit_prop() { systemctl show -p "$2" --value "$1"; }

# --------------------------------------------------------------------------------------------
# Today's checks: the package itself.

check_install_offline() {
  local new
  [ -n "$deb" ] || { echo "  no rsockd_*.deb on the share"; return 1; }
  echo "  network interfaces: $(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
  ip -o link show | grep -qv ': lo:' && { echo "  the VM has a network device: this would not prove offline"; return 1; }
  # All dependencies (and the Recommends) must be in the image already: apt installs rsockd only.
  new=$(cd "$work" && apt-get install -s "./$(basename "$deb")" 2>&1 | awk '/^Inst /{print $2}' | tr '\n' ' ')
  echo "  apt would install: ${new:-nothing}"
  [ "$new" = "rsockd " ] || { echo "  expected rsockd alone"; return 1; }
  (cd "$work" && expect "apt-get install ./$(basename "$deb") offline" apt_get install "./$(basename "$deb")") || return 1
  [ "$(dpkg-query -W -f='${Status}' rsockd)" = "install ok installed" ]
}

check_units_installed_disabled() {
  local bad=0 u state
  for u in rsockd.service rsockd@.service; do
    [ -f "/lib/systemd/system/$u" ] || { echo "  /lib/systemd/system/$u missing"; bad=1; }
    state=$(systemctl is-enabled "$u" 2>&1)
    echo "  $u: is-enabled: $state"
    [ "$state" = disabled ] || bad=1
  done
  state=$(systemctl is-active rsockd.service)
  echo "  rsockd.service: is-active: $state"
  [ "$state" = inactive ] || bad=1
  if pgrep -af '/usr/bin/rsockd'; then echo "  an rsockd process is running"; bad=1; fi
  if find /etc/systemd/system \( -name rsockd.service -o -name 'rsockd@*' \) | grep .; then
    echo "  enablement symlinks exist"; bad=1
  fi
  return $bad
}

check_units_verify() {
  # --man=no: the image has no man-db; check_man_pages looks at the pages themselves.
  local out rc
  out=$(systemd-analyze verify --man=no /lib/systemd/system/rsockd.service \
        /lib/systemd/system/rsockd@.service 2>&1); rc=$?
  [ -n "$out" ] && sed 's/^/    /' <<<"$out"
  [ $rc = 0 ] && [ -z "$out" ]
}

check_man_pages() {
  local pages p bad=0
  pages=$(dpkg -L rsockd | grep '^/usr/share/man/')
  [ -n "$pages" ] || { skip "no man pages in the package yet (docs/man/ is not written)"; return; }
  for p in man8/rsockd.8.gz man8/rsockctl.8.gz man5/rsockd.toml.5.gz; do
    grep -q "/usr/share/man/$p\$" <<<"$pages" || { echo "  missing /usr/share/man/$p (a unit's Documentation=)"; bad=1; }
  done
  return $bad
}

check_version() {
  has_module rsockd.service.daemon || { skip "daemon not ready: rsockd.service.daemon is not in the package yet"; return; }
  local want out
  want=$(dpkg-query -W -f='${Version}' rsockd)
  out=$(rsockd --version 2>&1) || { echo "  rsockd --version failed: $out"; return 1; }
  echo "  rsockd --version: $out"
  grep -qF "$want" <<<"$out" || { echo "  does not show the package version $want"; return 1; }
}

# The .deb builds the C extension (the compiled reader and writer of the tunnel and application
# sockets) though its core stays interpreted; the installed daemon must load it.
check_compiled_reader() {
  has_module rsockd.dataplane._datapath || { echo "  rsockd.dataplane._datapath is not in the package"; return 1; }
  expect "the relay loads the compiled reader and writer" python3 -c \
    'from rsockd.dataplane import relay; io = relay._compiled_io(); io.Reader(); io.Writer(); print("ok")'
}

check_verify_checksum() {
  has_module rsockd.cli.ctl || { skip "rsockctl not ready: rsockd.cli.ctl is not in the package yet"; return; }
  local dir=$work/checksum-samples want got rc
  # checksum-samples.txt → tcp_addrs_N.txt / tcp_data_N.dat, and the expected PASS/FAIL lines.
  want=$(python3 - "$share/checksum-samples.txt" "$dir" <<'PY'
import pathlib, sys
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
samples = [line.split() for line in src.read_text().splitlines() if line and not line.startswith("#")]
for n, (addrs, data, expected) in enumerate(samples, 1):
    (out / f"tcp_addrs_{n}.txt").write_text(addrs.replace(",", " ") + "\n")
    (out / f"tcp_data_{n}.dat").write_bytes(bytes.fromhex(data))
    print(expected)
PY
)
  [ -n "$want" ] || { echo "  no samples"; return 1; }
  got=$(rsockctl verify-checksum "$dir" 2>&1); rc=$?
  echo "  rsockctl verify-checksum DIR ($(wc -l <<<"$want") pairs): $(tr '\n' ' ' <<<"$got")(exit $rc)"
  [ "$got" = "$want" ] || { echo "  expected: $(tr '\n' ' ' <<<"$want")"; return 1; }
  # Exit 1 when any pair fails (the samples hold both kinds).
  [ $rc = 1 ] || { echo "  expected exit status 1 (some pairs FAIL)"; return 1; }
  # The ADDRS DATA form, on the first pair (a PASS): exit 0.
  got=$(rsockctl verify-checksum "$dir/tcp_addrs_1.txt" "$dir/tcp_data_1.dat" 2>&1); rc=$?
  echo "  rsockctl verify-checksum ADDRS DATA: $got (exit $rc)"
  [ "$got" = "$(head -n 1 <<<"$want")" ] && [ $rc = 0 ]
}

# The packaged unit's sandbox really allows bcc, XDP, TC, pins, prog-by-id, nft and raw sockets,
# and its notify / reload / stop plumbing works: the stand-in runs under rsockd@bpfprobe.
check_unit_sandbox_allows_bpf() {
  local bad=0 t0 t1 id1
  mkdir -p "$(dirname "$standin")" && cp "$share/standin.py" "$standin"
  ip link add rsprobe0 type veth peer name rsprobe1 && ip link set rsprobe0 up && ip link set rsprobe1 up \
    || { echo "  cannot make the veth pair"; return 1; }
  standin_instance bpfprobe "--bpf rsprobe0"
  t0=$(date +%s)
  expect "systemctl start rsockd@bpfprobe (READY within TimeoutStartSec)" systemctl start rsockd@bpfprobe || bad=1
  t1=$(date +%s)
  echo "  started (READY=1) after $((t1 - t0)) s"
  if [ $bad = 0 ]; then
    echo "  status: $(unit_prop rsockd@bpfprobe StatusText)"
    systemctl status --no-pager rsockd@bpfprobe | grep -q 'Status: "stand-in bpfprobe: ready' \
      || { echo "  systemctl status shows no STATUS line"; bad=1; }
    ip -d link show rsprobe0 | grep -q 'prog/xdp' || { echo "  no XDP program on rsprobe0"; bad=1; }
    tc filter show dev rsprobe0 egress | grep -q rsockd_probe_tc || { echo "  no TC program on rsprobe0 egress"; bad=1; }
    nft list table inet rsockd_bpfprobe >/dev/null 2>&1 || { echo "  no nft table inet rsockd_bpfprobe"; bad=1; }
    [ -e /sys/fs/bpf/rsockd/bpfprobe/hits ] || { echo "  no pin /sys/fs/bpf/rsockd/bpfprobe/hits"; bad=1; }
    [ "$(stat -c %a /run/rsockd/bpfprobe 2>/dev/null)" = 750 ] || { echo "  /run/rsockd/bpfprobe is not a 0750 directory"; bad=1; }
    id1=$(unit_prop rsockd@bpfprobe InvocationID)
    expect "systemctl reload rsockd@bpfprobe" systemctl reload rsockd@bpfprobe || bad=1
    sleep 2
    [ "$(unit_prop rsockd@bpfprobe InvocationID)" = "$id1" ] && systemctl -q is-active rsockd@bpfprobe \
      || { echo "  reload restarted or stopped the service"; bad=1; }
    unit_prop rsockd@bpfprobe StatusText | grep -q 'reloaded 1' || { echo "  no STATUS after reload"; bad=1; }
    # A second instance: stopping one must leave the other's runtime directory alone.
    standin_instance sleeper ""
    expect "systemctl start rsockd@sleeper" systemctl start rsockd@sleeper || bad=1
  fi
  expect "systemctl stop rsockd@bpfprobe" systemctl stop rsockd@bpfprobe || bad=1
  [ "$(unit_prop rsockd@bpfprobe Result)" = success ] || { echo "  Result=$(unit_prop rsockd@bpfprobe Result)"; bad=1; }
  journalctl -q -o cat -u rsockd@bpfprobe | sed 's/^/    journal: /'
  ip -d link show rsprobe0 | grep -q 'prog/xdp' && { echo "  XDP left attached"; bad=1; }
  [ -z "$(tc filter show dev rsprobe0 egress)" ] || { echo "  TC filter left"; bad=1; }
  nft list tables | grep -q rsockd && { echo "  nft table left"; bad=1; }
  absent /sys/fs/bpf/rsockd/bpfprobe /run/rsockd/bpfprobe || bad=1
  if [ -n "$(unit_prop rsockd@sleeper InvocationID)" ] && systemctl -q is-active rsockd@sleeper; then
    [ -d /run/rsockd/sleeper ] || { echo "  stopping rsockd@bpfprobe removed /run/rsockd/sleeper"; bad=1; }
  fi
  rm -rf "$dropins/rsockd@bpfprobe.service.d"
  ip link del rsprobe0
  systemctl daemon-reload
  return $bad
}

# --------------------------------------------------------------------------------------------
# The daemon checks: a server and a client rsockd in two network namespaces, each run by its
# rsockd@ unit inside its namespace (NetworkNamespacePath= drop-in).  UDP from the client
# namespace reaches an echo service in the server namespace through the tunnel.

ns_s=rsv-server ns_c=rsv-client
addr_s=192.0.2.1 addr_c=192.0.2.2
echo_port=7777 listen_port=30000 tunnel_ports=10001-10004

daemon_gate() {
  [ "${RSOCKD_VM_DAEMON_CHECKS:-0}" = 1 ] || { skip "daemon not ready (set RSOCKD_VM_DAEMON_CHECKS=1 to run)"; return; }
}

# Send one datagram from the client namespace to the client's listen address; expect the echo.
udp_roundtrip() {
  ip netns exec "$ns_c" python3 - "$listen_port" "$1" <<'PY'
import socket, sys, time
port, text = int(sys.argv[1]), sys.argv[2].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
deadline = time.monotonic() + 30  # the tunnel may still be connecting
while time.monotonic() < deadline:
    s.sendto(text, ("127.0.0.1", port))
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    if data == text:
        print(f"echo of {len(text)} bytes through the tunnel")
        sys.exit(0)
sys.exit("no echo through the tunnel within 30 s")
PY
}

check_daemon_setup() {
  daemon_gate || return
  ip netns add "$ns_s" && ip netns add "$ns_c" || return 1
  ip link add rsv-s netns "$ns_s" type veth peer name rsv-c netns "$ns_c" || return 1
  ip -n "$ns_s" addr add "$addr_s/24" dev rsv-s && ip -n "$ns_s" link set rsv-s up && ip -n "$ns_s" link set lo up
  ip -n "$ns_c" addr add "$addr_c/24" dev rsv-c && ip -n "$ns_c" link set rsv-c up && ip -n "$ns_c" link set lo up
  cat > /etc/rsockd/server.toml <<EOF
role = "server"
dev = "rsv-s"
target = "127.0.0.1:$echo_port"
ports = "$tunnel_ports"
key = "rsockd vm test secret"
EOF
  cat > /etc/rsockd/client.toml <<EOF
role = "client"
dev = "rsv-c"
server = "$addr_s"
listen = "127.0.0.1:$listen_port"
ports = "$tunnel_ports"
key = "rsockd vm test secret"
EOF
  local inst ns
  for inst in server client; do
    ns=$ns_s; [ $inst = client ] && ns=$ns_c
    mkdir -p "$dropins/rsockd@$inst.service.d"
    printf '[Service]\nNetworkNamespacePath=/run/netns/%s\n' "$ns" \
      > "$dropins/rsockd@$inst.service.d/netns.conf"
  done
  systemctl daemon-reload
  expect "UDP echo service in $ns_s" systemd-run --unit=rsv-echo -p NetworkNamespacePath=/run/netns/$ns_s \
    /usr/bin/python3 -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('127.0.0.1', $echo_port))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)"
}

check_daemon_enable_now_blocks_until_ready() {
  daemon_gate || return
  local inst bad=0 t0
  for inst in server client; do
    t0=$(date +%s)
    # enable --now returns when the start job is done: for Type=notify, at READY=1.
    expect "systemctl enable --now rsockd@$inst" systemctl enable --now "rsockd@$inst" || bad=1
    echo "  rsockd@$inst ready after $(( $(date +%s) - t0 )) s"
    [ "$(unit_prop "rsockd@$inst" ActiveState)" = active ] || { echo "  rsockd@$inst not active"; bad=1; }
    [ -S "/run/rsockd/$inst/control.sock" ] || { echo "  no /run/rsockd/$inst/control.sock at READY"; bad=1; }
    # The start-up log says which backend attached, and why not the other.
    journalctl -q -o cat -u "rsockd@$inst" | tail -n 15 | sed 's/^/    journal: /'
  done
  return $bad
}

check_daemon_status_line() {
  daemon_gate || return
  local inst bad=0
  for inst in server client; do
    systemctl status --no-pager "rsockd@$inst" | sed 's/^/    /' | head -n 12
    systemctl status --no-pager "rsockd@$inst" | grep -q 'Status: "' || { echo "  no STATUS= line for $inst"; bad=1; }
  done
  return $bad
}

# The image has the kernel headers and the unit lets bcc work (unit_sandbox_allows_bpf), so
# backend = "auto" must end on xdp, not on the nft fallback.
check_daemon_steers_with_xdp() {
  daemon_gate || return
  local inst bad=0 status
  for inst in server client; do
    status=$(unit_prop "rsockd@$inst" StatusText)
    echo "  rsockd@$inst: $status"
    grep -qw xdp <<<"$status" || bad=1
  done
  [ $bad = 0 ] || journalctl -q -o cat -u rsockd@server | grep -i -m 5 -e 'xdp backend' -e 'refused' -e 'not allowed' \
    | sed 's/^/    journal: /'
  return $bad
}

check_daemon_rsockctl_shows_connections() {
  daemon_gate || return
  local inst bad=0 out
  for inst in server client; do
    expect "rsockctl --instance $inst status" rsockctl --instance "$inst" status || bad=1
    # The tunnel connects in the background after READY: give it a few seconds.
    for _ in $(seq 1 20); do
      out=$(rsockctl --instance "$inst" ports 2>&1)
      grep -qi established <<<"$out" && break
      sleep 1
    done
    sed 's/^/    /' <<<"$out"
    grep -qi established <<<"$out" || { echo "  rsockctl --instance $inst ports shows no established connection"; bad=1; }
  done
  return $bad
}

check_daemon_udp_through_tunnel() {
  daemon_gate || return
  expect "UDP round trip" udp_roundtrip "rsockd vm test datagram"
}

check_daemon_reload_keeps_connections() {
  daemon_gate || return
  local inst bad=0 pid
  for inst in server client; do
    pid=$(unit_prop "rsockd@$inst" MainPID)
    expect "systemctl reload rsockd@$inst" systemctl reload "rsockd@$inst" || bad=1
    sleep 2
    [ "$(unit_prop "rsockd@$inst" MainPID)" = "$pid" ] && systemctl -q is-active "rsockd@$inst" \
      || { echo "  rsockd@$inst restarted or stopped on reload"; bad=1; }
    rsockctl --instance "$inst" ports 2>&1 | grep -qi established \
      || { echo "  no established connection after reloading $inst"; bad=1; }
  done
  expect "UDP round trip after reload" udp_roundtrip "after reload" || bad=1
  [ $bad = 0 ] || journalctl -q -o cat -u rsockd@server -u rsockd@client | tail -n 20 | sed 's/^/    journal: /'
  return $bad
}

# Server workers under systemd: a reload to workers = 2 replaces the relay with two processes in
# the unit's cgroup (MainPID unchanged), traffic flows, and the stop that follows (SIGTERM to the
# whole cgroup) must still end in Result=success (check_daemon_stop_leaves_no_state).
check_daemon_workers_under_systemd() {
  daemon_gate || return
  local bad=0 pid cg procs workers
  pid=$(unit_prop rsockd@server MainPID)
  echo "workers = 2" >> /etc/rsockd/server.toml
  expect "systemctl reload rsockd@server (workers = 2)" systemctl reload rsockd@server || bad=1
  [ "$(unit_prop rsockd@server MainPID)" = "$pid" ] || { echo "  MainPID changed on reload"; bad=1; }
  # The reload re-attaches (a bcc compile): wait for the rebuilt relay to report its workers.
  for _ in $(seq 1 60); do
    workers=$(rsockctl --instance server --json status 2>/dev/null | python3 -c \
      'import json, sys; print(" ".join(str(w["pid"]) for w in json.load(sys.stdin)["status"].get("by_worker", [])))' \
      2>/dev/null)
    [ "$(wc -w <<<"$workers")" = 2 ] && break
    sleep 1
  done
  echo "  worker pids: $workers"
  [ "$(wc -w <<<"$workers")" = 2 ] || { echo "  rsockctl status shows no 2 workers"; bad=1; }
  cg=$(unit_prop rsockd@server ControlGroup)
  procs=$(sort -n "/sys/fs/cgroup$cg/cgroup.procs" | tr '\n' ' ')
  echo "  processes in $cg: $procs"
  for p in $workers; do
    grep -qw "$p" <<<"$procs" || { echo "  worker $p is not in the unit's cgroup"; bad=1; }
  done
  # The workers report before steering is attached again (the compile takes 30-60 s in this VM);
  # meanwhile the client's segments meet the server kernel's RST and it reconnects with backoff.
  # Wait until the new relay holds all 4 connections, then ask for traffic.
  local up=0
  for _ in $(seq 1 150); do
    up=$(rsockctl --instance server --json status 2>/dev/null | python3 -c \
      'import json, sys; print(json.load(sys.stdin)["status"]["connections"]["by_state"].get("established", 0))' \
      2>/dev/null)
    [ "$up" = 4 ] && break
    sleep 1
  done
  echo "  connections up through the workers: ${up:-0}/4"
  expect "UDP round trip through two workers" udp_roundtrip "through workers" || bad=1
  [ $bad = 0 ] || journalctl -q -o cat -u rsockd@server | tail -n 20 | sed 's/^/    journal: /'
  return $bad
}

# The packet send path under the shipped unit's sandbox (RestrictAddressFamilies=, the capability
# bounding set, the system call filter): a reload to send_path = "packet" moves the client's
# connections to packet sockets (once the kernel has resolved the server's MAC), and traffic flows.
check_daemon_packet_send_path_under_systemd() {
  daemon_gate || return
  local bad=0 paths
  echo 'send_path = "packet"' >> /etc/rsockd/client.toml
  expect "systemctl reload rsockd@client (send_path = \"packet\")" systemctl reload rsockd@client || bad=1
  # The reload re-attaches steering (a bcc compile of 30-60 s in this VM) and systemctl returns
  # before it is done: wait until the rebuilt relay holds all 4 connections on packet sockets.
  local up=0
  for _ in $(seq 1 150); do
    read -r up paths < <(rsockctl --instance client --json ports 2>/dev/null | python3 -c \
      'import json, sys; c = json.load(sys.stdin)["ports"]["connections"]; print(sum(x["state"] == "established" for x in c), " ".join(sorted({x["send_path"] for x in c})))' \
      2>/dev/null)
    [ "$paths" = packet ] && [ "$up" = 4 ] && break
    sleep 1
  done
  echo "  client send paths: $paths; connections established: ${up:-0}/4"
  [ "$paths" = packet ] || { echo "  the client's connections are not on the packet send path"; bad=1; }
  expect "UDP round trip on the packet send path" udp_roundtrip "through packet sockets" || bad=1
  journalctl -q -o cat -u rsockd@client | grep -q "cannot open a packet socket" \
    && { echo "  the sandbox refused the packet socket"; bad=1; }
  [ $bad = 0 ] || journalctl -q -o cat -u rsockd@client | tail -n 20 | sed 's/^/    journal: /'
  return $bad
}

check_daemon_stop_leaves_no_state() {
  daemon_gate || return
  local inst ns dev bad=0
  for inst in server client; do
    ns=$ns_s dev=rsv-s; [ $inst = client ] && ns=$ns_c dev=rsv-c
    expect "systemctl stop rsockd@$inst" systemctl stop "rsockd@$inst" || bad=1
    [ "$(unit_prop "rsockd@$inst" Result)" = success ] || { echo "  rsockd@$inst Result=$(unit_prop "rsockd@$inst" Result)"; bad=1; }
    ip -n "$ns" -d link show "$dev" | grep -q 'prog/xdp' && { echo "  XDP left on $dev in $ns"; bad=1; }
    [ -z "$(tc -n "$ns" filter show dev "$dev" egress 2>/dev/null)" ] || { echo "  TC filter left on $dev in $ns"; bad=1; }
    ip netns exec "$ns" nft list tables | grep -q rsockd && { echo "  nft table left in $ns"; bad=1; }
    absent "/sys/fs/bpf/rsockd/$inst" "/run/rsockd/$inst" || bad=1
  done
  return $bad
}

check_daemon_teardown() {
  daemon_gate || return
  systemctl disable -q rsockd@server rsockd@client
  systemctl stop rsv-echo
  rm -rf "$dropins/rsockd@server.service.d" "$dropins/rsockd@client.service.d" /etc/rsockd/server.toml /etc/rsockd/client.toml
  systemctl daemon-reload
  ip netns del "$ns_s"; ip netns del "$ns_c"
  find /etc/systemd/system -name 'rsockd@*' | grep . && { echo "  enablement symlinks left"; return 1; }
  return 0
}

# --------------------------------------------------------------------------------------------
# Upgrade and removal.

check_reinstall_restarts_instances() {
  systemctl -q is-active rsockd@sleeper || { echo "  rsockd@sleeper (started by check_unit_sandbox_allows_bpf) is not running"; return 1; }
  local id1 id2
  id1=$(unit_prop rsockd@sleeper InvocationID)
  (cd "$work" && expect "apt-get install --reinstall" apt_get install --reinstall "./$(basename "$deb")") || return 1
  id2=$(unit_prop rsockd@sleeper InvocationID)
  echo "  rsockd@sleeper invocation $id1 -> $id2"
  systemctl -q is-active rsockd@sleeper && [ "$id1" != "$id2" ]
}

check_remove_stops_instances() {
  expect "apt-get remove rsockd" apt_get remove rsockd || return 1
  local state
  state=$(systemctl is-active rsockd@sleeper)
  echo "  rsockd@sleeper after removal: $state"
  rm -rf "$dropins/rsockd@sleeper.service.d"
  systemctl daemon-reload
  [ "$state" = inactive ]
}

check_purge_leaves_nothing() {
  expect "apt-get purge rsockd" apt_get purge rsockd || return 1
  local left
  dpkg-query -W -f='${Status}\n' rsockd 2>/dev/null | grep -q 'ok installed\|config-files' \
    && { echo "  dpkg still knows rsockd: $(dpkg-query -W -f='${Status}' rsockd)"; return 1; }
  absent /etc/rsockd /usr/lib/python3/dist-packages/rsockd /usr/lib/python3/dist-packages/rsockd-*.dist-info \
    /lib/systemd/system/rsockd.service /lib/systemd/system/rsockd@.service /usr/bin/rsockd /usr/bin/rsockctl \
    /var/lib/systemd/deb-systemd-helper-enabled/rsockd.service.dsh-also /sys/fs/bpf/rsockd || return 1
  # Anything else with the name, but the test's own files and the runtime tree of instances.
  left=$(find / -xdev \( -path /proc -o -path "$work" -o -path /usr/local/lib/rsockd-vmtest -o -path /mnt/share \) -prune \
         -o -name '*rsockd*' -print 2>/dev/null | grep -v -e '^/etc/systemd/system/rsockd-vmtest' -e '^/var/log/journal/')
  [ -z "$left" ] || { echo "  left behind:"; sed 's/^/    /' <<<"$left"; return 1; }
}

check_no_failed_units() {
  local failed
  failed=$(systemctl --failed --plain --no-legend)
  [ -z "$failed" ] || { echo "  failed units:"; sed 's/^/    /' <<<"$failed"; return 1; }
}

# --------------------------------------------------------------------------------------------

checks=(
  check_install_offline
  check_units_installed_disabled
  check_units_verify
  check_man_pages
  check_version
  check_compiled_reader
  check_verify_checksum
  check_unit_sandbox_allows_bpf
  check_daemon_setup
  check_daemon_enable_now_blocks_until_ready
  check_daemon_status_line
  check_daemon_steers_with_xdp
  check_daemon_rsockctl_shows_connections
  check_daemon_udp_through_tunnel
  check_daemon_reload_keeps_connections
  check_daemon_workers_under_systemd
  check_daemon_packet_send_path_under_systemd
  check_daemon_stop_leaves_no_state
  check_daemon_teardown
  check_reinstall_restarts_instances
  check_remove_stops_instances
  check_purge_leaves_nothing
  check_no_failed_units
)

echo "== rsockd VM checks on $(uname -r), $(systemctl --version | head -n 1)"
passed=0 failed=0 skipped=0
for c in "${checks[@]}"; do
  name=${c#check_}
  t0=$(date +%s)
  out=$("$c" 2>&1); rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in
    0)     echo "PASS $name (${dt}s)"; passed=$((passed + 1)); [ -n "$out" ] && printf '%s\n' "$out" ;;
    $SKIP) echo "SKIP $name: $(tail -n 1 <<<"$out")"; skipped=$((skipped + 1)) ;;
    *)     echo "FAIL $name (${dt}s)"; failed=$((failed + 1)); [ -n "$out" ] && printf '%s\n' "$out" ;;
  esac
done
echo "$passed passed, $failed failed, $skipped skipped"
# Let tee finish the log, then write the status run.sh waits for.
exec >&- 2>&-
wait "$tee_pid"
echo $(( failed > 0 )) > "$results/status.tmp" && sync && mv "$results/status.tmp" "$results/status"
sync
exit 0
