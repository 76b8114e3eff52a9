#!/usr/bin/env bash
# Build (or reuse) the Debian bookworm image that packaging/vm/run.sh boots under a real systemd.
#
#   sudo packaging/vm/build-image.sh          prints the image directory as its last line
#
# The image holds systemd, a Debian kernel with its matching headers (bcc compiles against
# them), every runtime dependency of rsockd_*.deb (so the .deb installs with no network), and a
# unit, rsockd-vmtest.service, that runs checks.sh from a 9p share and powers off.  It is cached
# under $RSOCKD_VM_CACHE (default /var/cache/rsockd-vm) in a directory named after a hash of the
# package list, the mirrors and this script: a second run reuses it, and changing any of these
# builds a new one (older images are then removed).  The directory holds:
#   base.qcow2   the root file system (ext4, no partition table: root=/dev/vda)
#   vmlinuz, initrd.img   for direct -kernel/-initrd boot; the initrd has virtio_blk, ext4 and
#                9p/9pnet_virtio (virtio_pci) so it can mount the root disk and the share
#   packages.txt what is installed, with versions
# Needs root (mmdebstrap's root mode, mkfs.ext4 -d) and the network to Debian's mirror.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "build-image: must run as root" >&2; exit 1; }
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
cache=${RSOCKD_VM_CACHE:-/var/cache/rsockd-vm}
mirror=${RSOCKD_VM_MIRROR:-http://deb.debian.org/debian}
security=${RSOCKD_VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
size=${RSOCKD_VM_DISK_SIZE:-4G}

# The .deb's Depends and Recommends (python3-bpfcc … iproute2, linux-headers-amd64), a systemd
# that boots (udev for devices, dbus for logind, kmod so the kernel can load nf_tables and
# friends), and what checks.sh uses.
packages=(
  systemd systemd-sysv udev dbus kmod procps
  linux-image-amd64 linux-headers-amd64 initramfs-tools
  python3 python3-bpfcc python3-nftables python3-pyroute2 python3-sdnotify nftables iproute2
  iputils-ping
)

key=$( { printf '%s\n' "${packages[@]}" "$mirror" "$security" "$size"; cat "$0"; } | sha256sum | cut -c1-16)
dir="$cache/image-$key"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9   # one build at a time; a waiting run then finds the image made

# run.sh needs qemu even when the image is reused.
need=()
for tool in mmdebstrap:mmdebstrap qemu-img:qemu-utils qemu-system-x86_64:qemu-system-x86 mkfs.ext4:e2fsprogs; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "build-image: installing ${need[*]}" >&2
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >&2; }
fi

if [ -f "$dir/complete" ]; then
  echo "build-image: reusing $dir (built $(cat "$dir/complete"))" >&2
  echo "$dir"
  exit 0
fi

start=$(date +%s)
tmp="$dir.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
rootfs="$tmp/rootfs"

# Files copied into the image (mmdebstrap's sync-in).  rsockd-vmtest.target is what the kernel
# command line boots into (systemd.unit=): the whole multi-user system, then the test.
overlay="$tmp/overlay"
mkdir -p "$overlay/etc/systemd/system" "$overlay/etc/initramfs-tools" "$overlay/mnt/share"
echo rsockd-vm > "$overlay/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 rsockd-vm\n' > "$overlay/etc/hosts"
echo "rsockd /mnt/share 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0" > "$overlay/etc/fstab"
# initramfs-tools adds these to the initrd: the root disk, and the share (9p is built as modules).
printf '%s\n' virtio_pci virtio_blk ext4 9p 9pnet 9pnet_virtio > "$overlay/etc/initramfs-tools/modules"
cat > "$overlay/etc/systemd/system/rsockd-vmtest.target" <<'UNIT'
[Unit]
Description=rsockd VM test (multi-user system, then packaging/vm/checks.sh)
Requires=multi-user.target
After=multi-user.target
Wants=rsockd-vmtest.service
AllowIsolate=yes
UNIT
cat > "$overlay/etc/systemd/system/rsockd-vmtest.service" <<'UNIT'
[Unit]
Description=rsockd VM test: checks.sh from the 9p share, then power off
After=multi-user.target
RequiresMountsFor=/mnt/share
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
# checks.sh writes its log and results/status to the share itself; run.sh enforces the timeout.
ExecStart=/bin/bash /mnt/share/checks.sh /mnt/share
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
UNIT

echo "build-image: mmdebstrap bookworm (${#packages[@]} packages and their dependencies)" >&2
# Customize hooks run after every package is configured: the overlay replaces initramfs-tools'
# comment-only modules file, and the initrd is made again with those modules.
mmdebstrap --mode=root --variant=apt --format=directory \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --customize-hook="sync-in $overlay /" \
  --customize-hook='chroot "$1" systemd-machine-id-setup >/dev/null' \
  --customize-hook='chroot "$1" update-initramfs -u -k all' \
  --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" > "$1/root/packages.txt"' \
  bookworm "$rootfs" \
  "deb $mirror bookworm main" \
  "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main" >&2

kver=$(basename "$(ls -d "$rootfs"/lib/modules/* | sort -V | tail -n 1)")
[ -e "$rootfs/lib/modules/$kver/build/include/generated/autoconf.h" ] \
  || { echo "build-image: no kernel headers for $kver in the image" >&2; exit 1; }
cp "$rootfs/boot/vmlinuz-$kver" "$tmp/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$tmp/initrd.img"
initrd_files=$(chroot "$rootfs" lsinitramfs "/boot/initrd.img-$kver")
for m in virtio_pci virtio_blk ext4 9p 9pnet_virtio; do
  grep -q "/$m\.ko" <<<"$initrd_files" || { echo "build-image: $m.ko is not in the initrd" >&2; exit 1; }
done
mv "$rootfs/root/packages.txt" "$tmp/packages.txt"
echo "$kver" > "$tmp/kernel-version"

echo "build-image: ext4 file system ($size) from the tree" >&2
mkfs.ext4 -q -F -L rsockd-root -d "$rootfs" "$tmp/base.raw" "$size"
qemu-img convert -O qcow2 "$tmp/base.raw" "$tmp/base.qcow2"
rm -rf "$rootfs" "$overlay" "$tmp/base.raw"

# Keep one image: the previous ones are of no use once the key has changed.
find "$cache" -mindepth 1 -maxdepth 1 -name 'image-*' ! -name "image-$key" ! -name "image-$key.tmp" \
  -exec rm -rf {} +
echo "$(date -u +%FT%TZ), kernel $kver, in $(( $(date +%s) - start )) s" > "$tmp/complete"
mv "$tmp" "$dir"
echo "build-image: built $dir in $(( $(date +%s) - start )) s" >&2
echo "$dir"
