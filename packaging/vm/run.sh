#!/usr/bin/env bash
# Boot the test image under a real systemd, install DEB_PATH there and run checks.sh.
#
#   sudo packaging/vm/run.sh DEB_PATH
#
# Exit status: the checks' (0 when none failed); 124 when the run timed out; 1 when the VM
# produced no result.  Prints the checks' log and the timings.
#
# Environment:
#   RSOCKD_VM_IMAGE          an image directory from build-image.sh (default: build or reuse one)
#   RSOCKD_VM_TIMEOUT        seconds for the whole VM run before qemu is killed (default 1200)
#   RSOCKD_VM_WORK           work directory (default build/vm/run): console.log, results/
#   RSOCKD_VM_DAEMON_CHECKS  1 to run the daemon checks in checks.sh (default 0: SKIP lines)
#   RSOCKD_VM_KEEP           1 to keep the per-run disk overlay for a look afterwards
#
# The VM: qemu under TCG (this host's KVM does not boot stock kernels), no network device, the
# image's kernel booted directly, a throw-away qcow2 overlay over the cached image (cache=unsafe:
# nothing in it outlives the run, and dpkg's fsyncs cost seconds under TCG), and a 9p
# share (mount tag "rsockd") holding the .deb, checks.sh, standin.py, checksum-samples.txt and
# results/.  systemd.unit=rsockd-vmtest.target brings the system up, then rsockd-vmtest.service
# runs checks.sh and powers off.
set -euo pipefail
[ $# = 1 ] && [ -f "$1" ] || { echo "usage: $0 DEB_PATH" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run: must run as root" >&2; exit 1; }
deb=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
timeout=${RSOCKD_VM_TIMEOUT:-1200}
work=${RSOCKD_VM_WORK:-$top/build/vm/run}

t_start=$(date +%s)
image=${RSOCKD_VM_IMAGE:-$("$here/build-image.sh" | tail -n 1)}
t_image=$(date +%s)
[ -f "$image/base.qcow2" ] || { echo "run: no image in $image" >&2; exit 1; }

rm -rf "$work"
share="$work/share"
mkdir -p "$share/results"
cp "$deb" "$here/checks.sh" "$here/standin.py" "$top/packaging/checksum-samples.txt" "$share/"
echo "RSOCKD_VM_DAEMON_CHECKS=${RSOCKD_VM_DAEMON_CHECKS:-0}" > "$share/checks.env"
qemu-img create -q -f qcow2 -b "$image/base.qcow2" -F qcow2 "$work/overlay.qcow2"

qemu_pid=""
cleanup() {
  # Only the qemu this script started, by its PID.
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    sleep 2
    kill -9 "$qemu_pid" 2>/dev/null || true
  fi
  [ "${RSOCKD_VM_KEEP:-0}" = 1 ] || rm -f "$work/overlay.qcow2"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# quiet + loglevel=4 keep the kernel's chatter out; systemd's status lines and the checks'
# output (StandardOutput=journal+console) still reach console.log.
qemu-system-x86_64 -accel tcg -cpu qemu64 -m 2048 -smp 2 -nographic -no-reboot -nic none \
  -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 quiet loglevel=4 panic=1 systemd.unit=rsockd-vmtest.target" \
  -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2,cache=unsafe" \
  -virtfs "local,path=$share,mount_tag=rsockd,security_model=none,id=share" \
  -serial "file:$work/console.log" -monitor none \
  </dev/null >"$work/qemu.log" 2>&1 &
qemu_pid=$!
echo "run: qemu pid $qemu_pid (timeout ${timeout} s); console: $work/console.log"

t_boot=$(date +%s) t_started="" t_done="" timed_out=0
while kill -0 "$qemu_pid" 2>/dev/null; do
  now=$(date +%s)
  [ -z "$t_started" ] && [ -f "$share/results/started" ] && t_started=$now
  [ -z "$t_done" ] && [ -f "$share/results/status" ] && t_done=$now
  if [ $((now - t_boot)) -ge "$timeout" ]; then
    echo "run: timed out after ${timeout} s; killing qemu $qemu_pid" >&2
    timed_out=1
    kill "$qemu_pid" 2>/dev/null || true
    break
  fi
  sleep 1
done
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=""
t_end=$(date +%s)
: "${t_started:=$t_end}" "${t_done:=$t_end}"

echo "== checks.sh (in the VM)"
if [ -f "$share/results/checks.log" ]; then
  cat "$share/results/checks.log"
else
  echo "(no log: checks.sh did not start)"
fi
if [ -f "$share/results/status" ]; then
  status=$(cat "$share/results/status")
else
  echo "== last 60 lines of the serial console ($work/console.log)"
  tail -n 60 "$work/console.log" 2>/dev/null || true
  status=1
fi
[ $timed_out = 1 ] && status=124

echo "== timings"
printf '  image (build or reuse): %4d s\n' $((t_image - t_start))
printf '  boot to checks.sh:      %4d s\n' $((t_started - t_boot))
printf '  checks:                 %4d s\n' $((t_done - t_started))
printf '  power-off:              %4d s\n' $((t_end - t_done))
printf '  VM total:               %4d s\n' $((t_end - t_boot))
echo "run: exit status $status"
exit "$status"
