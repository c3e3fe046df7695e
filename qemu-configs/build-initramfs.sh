#!/bin/bash
# build-initramfs.sh: build the guest initramfs from busybox-static,
# qemu-configs/guest-init.sh (as /init) and the kernel modules the workload
# needs (virtio_balloon and whatever modules.dep says it depends on,
# decompressed so busybox insmod can load them).
#
# Usage: build-initramfs.sh [--force]
# Prints the initramfs path as its last line of stdout:
#   CACHE/initramfs-<hash>.cpio.gz
# where <hash> covers every input (this script, guest-init.sh, busybox, the
# kernel version and the modules), so an unchanged build is reused at once.
#
# Environment:
#   VHOST_BALLOON_CACHE   cache directory (default /var/cache/vhost-balloon);
#                         provision.sh must have run (CACHE/env.sh)
#   VB_GUEST_MODULES      modules to include and load at boot, in order
#                         (default: virtio_balloon virtio_mem button evdev)
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VHOST_BALLOON_CACHE:-/var/cache/vhost-balloon}
# button and evdev: the ACPI power button (QMP system_powerdown) reaches busybox acpid.
# virtio_mem: the virtio-mem workload's device (harmless without one).
WANT=${VB_GUEST_MODULES:-virtio_balloon virtio_mem button evdev}
FORCE=0
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-initramfs: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done
log() { echo "build-initramfs: $*" >&2; }
fail() { echo "build-initramfs: FAILED: $*" >&2; exit 1; }

[ -r "$CACHE/env.sh" ] || fail "$CACHE/env.sh not found: run qemu-configs/provision.sh first"
. "$CACHE/env.sh"
[ -f "$MODULES/modules.dep" ] || fail "$MODULES/modules.dep not found (re-run provision.sh --refresh)"
[ -x "$BUSYBOX" ] || fail "busybox not found at $BUSYBOX (re-run provision.sh --refresh)"
INIT=$HERE/guest-init.sh
[ -r "$INIT" ] || fail "$INIT not found"
for tool in xz cpio gzip; do
    command -v $tool >/dev/null || {
        pkg=$tool; [ $tool = xz ] && pkg=xz-utils
        log "installing $pkg (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkg >&2 || fail "$tool is missing and apt-get install $pkg failed"
    }
done

# ---- resolve modules and their dependencies from modules.dep (deps first)
declare -A seen=()
ORDER=()
add_module() {   # add_module RELPATH (as in modules.dep)
    local rel=$1 line deps i
    [ -n "${seen[$rel]:-}" ] && return 0
    seen[$rel]=1
    line=$(grep -m1 "^$rel:" "$MODULES/modules.dep") || fail "$rel is not in modules.dep"
    read -r -a deps <<< "${line#*:}"
    # modules.dep lists a module's dependencies so that the last one loads
    # first (modprobe walks it backwards).
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add_module "${deps[i]}"; done
    ORDER+=("$rel")
}
for m in $WANT; do
    m=${m//-/_}
    if grep -qE "/${m//_/[-_]}\.ko$" "$MODULES/modules.builtin"; then
        log "$m is built into the kernel: nothing to load"
        continue
    fi
    rel=$(grep -oE "^[^:]*/${m//_/[-_]}\.ko(\.xz|\.zst|\.gz)?:" "$MODULES/modules.dep" | head -n 1)
    [ -n "$rel" ] || fail "module $m not found in $MODULES/modules.dep"
    add_module "${rel%:}"
done

# ---- the input hash
HASH=$(
    {
        sha256sum "$0" "$INIT" "$BUSYBOX" | cut -d' ' -f1
        echo "$GUEST_KERNEL_VERSION"
        for rel in "${ORDER[@]}"; do echo "$rel"; sha256sum "$MODULES/$rel" | cut -d' ' -f1; done
    } | sha256sum | cut -c1-16
)
OUT=$CACHE/initramfs-$HASH.cpio.gz
if [ "$FORCE" = 0 ] && [ -s "$OUT" ]; then
    log "up to date: $OUT"
    echo "$OUT"
    exit 0
fi

# ---- stage and pack
log "building $OUT (modules: ${ORDER[*]:-none})"
STAGE=$(mktemp -d "$CACHE/initramfs-stage.XXXXXX") || fail "mktemp failed"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,lib/modules/$GUEST_KERNEL_VERSION}
cp "$BUSYBOX" "$STAGE/bin/busybox"
# /init's stdout is /dev/console: make sure the node exists before devtmpfs.
mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || log "cannot mknod dev/console (not root?): relying on the kernel's built-in one"
# One symlink per applet (busybox-static is a static x86-64 binary: it runs here).
"$BUSYBOX" --list-full | while read -r applet; do
    [ -L "$STAGE/$applet" ] || [ -e "$STAGE/$applet" ] || ln -s /bin/busybox "$STAGE/$applet"
done
[ -L "$STAGE/bin/sh" ] || fail "busybox has no sh applet"
install -m 755 "$INIT" "$STAGE/init"
: > "$STAGE/etc/vb-modules"
for rel in "${ORDER[@]}"; do
    src=$MODULES/$rel
    dst=$STAGE/lib/modules/$GUEST_KERNEL_VERSION/${rel%.*}
    case $rel in *.ko) dst=$STAGE/lib/modules/$GUEST_KERNEL_VERSION/$rel ;; esac
    mkdir -p "$(dirname "$dst")"
    case $rel in
        *.ko.xz) xz -dc "$src" > "$dst" ;;
        *.ko.zst) zstd -dc "$src" > "$dst" ;;
        *.ko.gz) gzip -dc "$src" > "$dst" ;;
        *.ko) cp "$src" "$dst" ;;
    esac || fail "cannot decompress $src"
    echo "/lib/modules/$GUEST_KERNEL_VERSION/${dst#"$STAGE/lib/modules/$GUEST_KERNEL_VERSION/"}" >> "$STAGE/etc/vb-modules"
done
echo "$GUEST_KERNEL_VERSION" > "$STAGE/etc/vb-kernel-version"
# Reproducible archive: fixed mtimes, sorted names, no gzip timestamp.
find "$STAGE" -exec touch -h -d @0 {} +
( cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --reproducible --owner=0:0 --quiet ) |
    gzip -n -6 > "$OUT.tmp" || fail "cpio/gzip failed"
mv "$OUT.tmp" "$OUT"
# Older builds are of no use any more (a running QEMU has already read its own).
for old in "$CACHE"/initramfs-*.cpio.gz; do [ "$old" = "$OUT" ] || rm -f "$old"; done
ln -sfn "$(basename "$OUT")" "$CACHE/initramfs.cpio.gz"
log "wrote $OUT ($(du -k "$OUT" | cut -f1) KiB)"
echo "$OUT"
