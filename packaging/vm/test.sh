#!/usr/bin/env bash
# The packaging stage of CI: build the .deb, build or reuse the VM image, boot it under a real
# systemd and run checks.sh there.  Exits non-zero when any check failed (or the run timed out).
#
#   sudo packaging/vm/test.sh
#
# Environment: see run.sh and build-image.sh (RSOCKD_VM_DAEMON_CHECKS=1 turns on the daemon
# checks; RSOCKD_VM_CACHE moves the image cache).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "packaging/vm/test.sh: must run as root" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

t0=$(date +%s)
echo "== build the .deb"
deb=$("$top/packaging/build-deb.sh" "$top/build/deb" | tail -n 1)
t1=$(date +%s)
echo "== VM image"
image=$("$here/build-image.sh" | tail -n 1)
t2=$(date +%s)
echo "== VM run"
status=0
RSOCKD_VM_IMAGE=$image "$here/run.sh" "$deb" || status=$?
t3=$(date +%s)
echo "== packaging stage: .deb $((t1 - t0)) s, image $((t2 - t1)) s, VM run $((t3 - t2)) s, total $((t3 - t0)) s"
exit "$status"
