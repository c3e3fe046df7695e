#!/bin/bash
# provision.sh: make a QEMU >= 10.2 with vhost-user-test-device-pci, a Debian
# guest kernel (+ modules) and busybox-static available, cached under one
# directory. Idempotent: a second run reuses everything (stamp files).
#
# Usage: provision.sh [--refresh] [--help]
#   --refresh   forget the stamps and redo every step (the cache is reused
#               where apt/debootstrap can reuse it)
#
# Environment:
#   VHOST_BALLOON_CACHE   cache directory (default /var/cache/vhost-balloon)
#   VB_DEBIAN_MIRROR      Debian mirror (default http://deb.debian.org/debian)
#   VB_QEMU_SOURCE        force the QEMU source: auto (default), system,
#                         backports (Debian 13 host), chroot (trixie root)
#
# How QEMU is obtained (first that applies, unless VB_QEMU_SOURCE says):
#   system     qemu-system-x86_64 on PATH lists vhost-user-test-device-pci
#   backports  Debian 13 (trixie) host: qemu-system-x86 from trixie-backports
#   chroot     otherwise (Debian 12): debootstrap --variant=minbase trixie into
#              CACHE/trixie-root, qemu-system-x86 from trixie-backports inside;
#              QEMU then runs through CACHE/bin/qemu-system-x86_64, which
#              enters the root in a private mount namespace (unshare -m) with
#              /dev, /proc, /sys and the shared directories bind-mounted.
#
# Writes CACHE/env.sh (shell variables: QEMU, QEMU_VERSION, QEMU_MODE,
# KERNEL, MODULES, BUSYBOX, GUEST_KERNEL_VERSION, VB_RUN_DIR, ...).
set -u -o pipefail

CACHE=${VHOST_BALLOON_CACHE:-/var/cache/vhost-balloon}
MIRROR=${VB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${VB_DEBIAN_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
QEMU_SOURCE=${VB_QEMU_SOURCE:-auto}
SUITE=trixie
ROOT=$CACHE/trixie-root
STAMPS=$CACHE/stamps
LOGS=$CACHE/logs
GUEST=$CACHE/guest
REFRESH=0

for arg in "$@"; do
    case $arg in
        --refresh) REFRESH=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "provision: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

T0=$(date +%s.%N)
CURRENT_STEP=preflight
STEP_T0=$T0

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "provision: $*"; }
step() {
    CURRENT_STEP=$1; shift
    STEP_T0=$(date +%s.%N)
    say "[$CURRENT_STEP] $*"
}
step_done() { say "[$CURRENT_STEP] done in $(elapsed "$STEP_T0") s${1:+ ($1)}"; }
# fail WHY: print which step failed and why, and the tail of its log if any.
fail() {
    echo "provision: FAILED at step '$CURRENT_STEP': $1" >&2
    local log=$LOGS/$CURRENT_STEP.log
    if [ -s "$log" ]; then
        echo "provision: last lines of $log:" >&2
        tail -n 15 "$log" | sed 's/^/    /' >&2
    fi
    exit 1
}
# why_from_log LOG: a one-line diagnosis of a failed download/install.
why_from_log() {
    if grep -qiE "Temporary failure (in name )?resolving|Could not resolve|Network is unreachable|Connection (refused|timed out)|Failed to fetch|Couldn't download|unable to resolve|Could not connect" "$1" 2>/dev/null; then
        echo "no network access to the Debian mirror ($MIRROR)"
    elif grep -qiE "NO_PUBKEY|not signed|signature" "$1" 2>/dev/null; then
        echo "the mirror's Release signature could not be verified (debian-archive-keyring too old?)"
    elif grep -qiE "No space left" "$1" 2>/dev/null; then
        echo "no space left on the device holding $CACHE"
    else
        echo "see the log below"
    fi
}
stamp_ok() { [ "$REFRESH" = 0 ] && [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$STAMPS/$1"; }

# Run a command inside the trixie root, in a private mount namespace so the
# bind mounts disappear with the process.
in_root() {
    unshare --mount --propagation private /bin/sh -c '
        root=$1; shift
        mount --rbind /dev "$root/dev" && mount --rbind /proc "$root/proc" &&
        mount --rbind /sys "$root/sys" || exit 97
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 HOME=/root "$@"
    ' sh "$ROOT" "$@"
}

network_ok=unknown
check_network() {
    [ "$network_ok" = yes ] && return 0
    say "[$CURRENT_STEP] checking network access to $MIRROR"
    local tmp
    tmp=$(mktemp)
    if timeout 30 /usr/lib/apt/apt-helper download-file "$MIRROR/dists/$SUITE/InRelease" "$tmp" >"$LOGS/network.log" 2>&1; then
        network_ok=yes; rm -f "$tmp"; return 0
    fi
    rm -f "$tmp"
    CURRENT_STEP="$CURRENT_STEP (network check)"
    fail "no network access to the Debian mirror: could not download $MIRROR/dists/$SUITE/InRelease ($(grep -v '^E: Download Failed' "$LOGS/network.log" | tail -n 1 | cut -c1-200))"
}

# ---------------------------------------------------------------- preflight
step preflight "checking user, host and cache directory $CACHE"
[ "$(id -u)" = 0 ] || fail "not root: installing packages, debootstrap and chroot need root (run as root or with sudo)"
[ -r /etc/os-release ] && . /etc/os-release
HOST_CODENAME=${VERSION_CODENAME:-unknown}
HOST_DEBIAN=$(cat /etc/debian_version 2>/dev/null || echo none)
mkdir -p "$CACHE" "$STAMPS" "$LOGS" "$GUEST" "$CACHE/bin" "$CACHE/run" || fail "cannot create $CACHE"
exec 9>"$CACHE/.lock"
flock -n 9 || { say "[$CURRENT_STEP] another provision.sh holds $CACHE/.lock, waiting"; flock 9; }
command -v apt-get >/dev/null || fail "apt-get not found: this script supports Debian hosts only (host: ${PRETTY_NAME:-unknown})"
say "[$CURRENT_STEP] host: ${PRETTY_NAME:-unknown} (debian_version $HOST_DEBIAN, codename $HOST_CODENAME), arch $(uname -m)"
[ "$(uname -m)" = x86_64 ] || fail "host is $(uname -m): the guest kernel and QEMU chosen here are x86_64"
step_done

# ----------------------------------------------------------------- host tools
# apt_host_install PKG...: install missing packages on the host.
apt_host_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    check_network
    say "[$CURRENT_STEP] apt-get install ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >>"$LOGS/$CURRENT_STEP.log" 2>&1; then
        say "[$CURRENT_STEP] install failed; running apt-get update and retrying"
        apt-get update >>"$LOGS/$CURRENT_STEP.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >>"$LOGS/$CURRENT_STEP.log" 2>&1 ||
            fail "apt-get install ${missing[*]} failed: $(why_from_log "$LOGS/$CURRENT_STEP.log")"
    fi
}

step host-tools "making sure the host has xz-utils, cpio, kmod (depmod), util-linux (unshare) and, for a chroot, debootstrap"
: > "$LOGS/host-tools.log"
apt_host_install xz-utils cpio kmod
command -v unshare >/dev/null || fail "unshare (util-linux) not found"
step_done

# ------------------------------------------------------------- QEMU decision
version_ge() { dpkg --compare-versions "$1" ge "$2"; }
qemu_has_device() { "$1" -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"'; }

step qemu-source "deciding where QEMU >= 10.2 with vhost-user-test-device-pci comes from"
MODE=$QEMU_SOURCE
if [ "$MODE" = auto ]; then
    if command -v qemu-system-x86_64 >/dev/null && qemu_has_device "$(command -v qemu-system-x86_64)"; then
        MODE=system
        say "[$CURRENT_STEP] the system QEMU ($(command -v qemu-system-x86_64)) lists vhost-user-test-device-pci"
    elif [ "$HOST_CODENAME" = trixie ]; then
        MODE=backports
        say "[$CURRENT_STEP] Debian 13 host: qemu-system-x86 from trixie-backports, installed on the host"
    else
        MODE=chroot
        if command -v qemu-system-x86_64 >/dev/null; then
            say "[$CURRENT_STEP] the system QEMU ($(qemu-system-x86_64 --version | head -n 1)) lacks vhost-user-test-device-pci"
        fi
        say "[$CURRENT_STEP] host is $HOST_CODENAME: QEMU from trixie-backports inside a debootstrapped trixie root ($ROOT)"
    fi
fi
case $MODE in system|backports|chroot) ;; *) fail "VB_QEMU_SOURCE must be auto, system, backports or chroot, not '$MODE'" ;; esac
step_done "$MODE"

# ---------------------------------------------------------- QEMU: chroot mode
if [ "$MODE" = chroot ]; then
    step debootstrap "debootstrap --variant=minbase $SUITE $ROOT"
    key="$SUITE $MIRROR minbase"
    if stamp_ok debootstrap "$key" && [ -x "$ROOT/usr/bin/apt-get" ]; then
        step_done "cached"
    else
        : > "$LOGS/debootstrap.log"
        apt_host_install debootstrap
        [ -f /usr/share/debootstrap/scripts/$SUITE ] || fail "this debootstrap ($(dpkg-query -W -f='${Version}' debootstrap)) does not know $SUITE"
        if grep -qs " $ROOT" /proc/mounts || grep -qs " $ROOT.partial" /proc/mounts; then
            fail "something is mounted under $ROOT (see /proc/mounts); unmount it first"
        fi
        check_network
        rm -rf "$ROOT.partial"
        say "[$CURRENT_STEP] downloading and unpacking a minimal trixie (about 30 s; log: $LOGS/debootstrap.log)"
        debootstrap --variant=minbase "$SUITE" "$ROOT.partial" "$MIRROR" >>"$LOGS/debootstrap.log" 2>&1 || {
            cat "$ROOT.partial/debootstrap/debootstrap.log" >>"$LOGS/debootstrap.log" 2>/dev/null
            fail "debootstrap failed: $(why_from_log "$LOGS/debootstrap.log")"
        }
        rm -rf "$ROOT"
        mv "$ROOT.partial" "$ROOT" || fail "cannot move $ROOT.partial to $ROOT"
        stamp_set debootstrap "$key"
        rm -f "$STAMPS/root-qemu"
        step_done
    fi

    step root-qemu "inside the root: enable $SUITE-backports, apt-get install -t $SUITE-backports --no-install-recommends qemu-system-x86"
    key="$SUITE-backports qemu-system-x86 $MIRROR"
    if stamp_ok root-qemu "$key" && [ -x "$ROOT/usr/bin/qemu-system-x86_64" ]; then
        step_done "cached"
    else
        : > "$LOGS/root-qemu.log"
        check_network
        cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
deb $MIRROR $SUITE-backports main
EOF
        # No service may start inside the root.
        printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod 755 "$ROOT/usr/sbin/policy-rc.d"
        say "[$CURRENT_STEP] apt-get update (inside the root)"
        in_root apt-get update >>"$LOGS/root-qemu.log" 2>&1 || fail "apt-get update inside the root failed: $(why_from_log "$LOGS/root-qemu.log")"
        say "[$CURRENT_STEP] apt-get install -t $SUITE-backports --no-install-recommends qemu-system-x86 (inside the root)"
        in_root apt-get install -y -t "$SUITE-backports" --no-install-recommends qemu-system-x86 >>"$LOGS/root-qemu.log" 2>&1 ||
            fail "installing qemu-system-x86 inside the root failed: $(why_from_log "$LOGS/root-qemu.log")"
        in_root apt-get clean >>"$LOGS/root-qemu.log" 2>&1
        stamp_set root-qemu "$key"
        step_done
    fi
fi

# ------------------------------------------------------- QEMU: backports mode
if [ "$MODE" = backports ]; then
    step host-qemu "enable $SUITE-backports on the host and apt-get install -t $SUITE-backports qemu-system-x86"
    key="$SUITE-backports qemu-system-x86"
    if stamp_ok host-qemu "$key" && qemu_has_device /usr/bin/qemu-system-x86_64; then
        step_done "cached"
    else
        : > "$LOGS/host-qemu.log"
        check_network
        if ! grep -rqs "$SUITE-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "deb $MIRROR $SUITE-backports main" > /etc/apt/sources.list.d/vhost-balloon-$SUITE-backports.list
            say "[$CURRENT_STEP] added /etc/apt/sources.list.d/vhost-balloon-$SUITE-backports.list"
        fi
        apt-get update >>"$LOGS/host-qemu.log" 2>&1 || fail "apt-get update failed: $(why_from_log "$LOGS/host-qemu.log")"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -t "$SUITE-backports" --no-install-recommends qemu-system-x86 >>"$LOGS/host-qemu.log" 2>&1 ||
            fail "apt-get install qemu-system-x86 from $SUITE-backports failed: $(why_from_log "$LOGS/host-qemu.log")"
        stamp_set host-qemu "$key"
        step_done
    fi
fi

# ------------------------------------------------------------ QEMU wrapper
step qemu-wrapper "writing $CACHE/bin/qemu-system-x86_64 and checking that QEMU lists vhost-user-test-device-pci"
WRAPPER=$CACHE/bin/qemu-system-x86_64
if [ "$MODE" = chroot ]; then
    # Two files: the wrapper (enters a private mount namespace, keeps the PID:
    # exec all the way down) and the script run inside that namespace.
    cat > "$CACHE/bin/qemu-in-root.sh.new" <<'EOF'
#!/bin/sh
# Generated by qemu-configs/provision.sh. Runs inside a private mount
# namespace (see qemu-system-x86_64 beside it): bind-mounts /dev, /proc, /sys
# and the shared directories into the root, then execs QEMU there.
root=$1; shared=$2; shift 2
mount --rbind /dev "$root/dev" && mount --rbind /proc "$root/proc" &&
    mount --rbind /sys "$root/sys" ||
    { echo "qemu wrapper: bind-mounting /dev, /proc, /sys into $root failed" >&2; exit 1; }
cwd=$(pwd -P); incwd=/
IFS=:
for d in $shared; do
    [ -d "$d" ] || continue
    d=$(cd "$d" && pwd -P)
    case $cwd/ in "$d"/*) incwd=$cwd ;; esac
    mkdir -p "$root$d" && mount --rbind "$d" "$root$d" ||
        { echo "qemu wrapper: bind-mounting $d into $root failed" >&2; exit 1; }
done
unset IFS
# chroot(1) changes to /; the inner shell returns to the shared working dir.
exec chroot "$root" /bin/sh -c 'cd "$0" 2>/dev/null || cd /; exec /usr/bin/qemu-system-x86_64 "$@"' "$incwd" "$@"
EOF
    cat > "$WRAPPER.new" <<'EOF'
#!/bin/sh
# Generated by qemu-configs/provision.sh: runs the trixie-backports QEMU
# inside @ROOT@, in a private mount namespace (unshare -m: the bind mounts
# vanish with the process). QEMU keeps this process's PID.
# Shared at the same path inside and outside: @CACHE@, /tmp and every
# directory listed (colon-separated) in $VHOST_BALLOON_SHARED_DIRS, so socket,
# kernel and initrd paths under them work unchanged; the working directory is
# kept when it is under one of them (relative paths then work too).
if [ "$(id -u)" != 0 ]; then
    echo "qemu-system-x86_64 (vhost-balloon wrapper): must run as root (unshare -m, chroot into @ROOT@)" >&2
    exit 1
fi
exec unshare --mount --propagation private /bin/sh @CACHE@/bin/qemu-in-root.sh \
    @ROOT@ "@CACHE@:/tmp${VHOST_BALLOON_SHARED_DIRS:+:$VHOST_BALLOON_SHARED_DIRS}" "$@"
EOF
    sed -i "s|@ROOT@|$ROOT|g; s|@CACHE@|$CACHE|g" "$WRAPPER.new"
    chmod 755 "$CACHE/bin/qemu-in-root.sh.new" && mv "$CACHE/bin/qemu-in-root.sh.new" "$CACHE/bin/qemu-in-root.sh" ||
        fail "cannot write $CACHE/bin/qemu-in-root.sh"
else
    cat > "$WRAPPER.new" <<EOF
#!/bin/sh
# Generated by qemu-configs/provision.sh: the host's own QEMU ($MODE).
exec /usr/bin/qemu-system-x86_64 "\$@"
EOF
fi
chmod 755 "$WRAPPER.new" && mv "$WRAPPER.new" "$WRAPPER" || fail "cannot write $WRAPPER"
"$WRAPPER" --version > "$LOGS/qemu-wrapper.log" 2>&1 || fail "$WRAPPER --version failed"
QEMU_VERSION_FULL=$(head -n 1 "$LOGS/qemu-wrapper.log")
QEMU_VERSION=$(echo "$QEMU_VERSION_FULL" | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p')
[ -n "$QEMU_VERSION" ] || fail "cannot parse the QEMU version from '$QEMU_VERSION_FULL'"
version_ge "$QEMU_VERSION" 10.2 || fail "QEMU $QEMU_VERSION is older than 10.2"
qemu_has_device "$WRAPPER" || fail "QEMU $QEMU_VERSION ($MODE) does not list vhost-user-test-device-pci in -device help"
step_done "$QEMU_VERSION_FULL"

# ------------------------------------------------ guest kernel and busybox
# Downloaded with apt (inside the root in chroot mode, so a trixie kernel) and
# unpacked with dpkg-deb -x into CACHE/guest/root: nothing runs, no initramfs
# is generated, the host's /boot is untouched.
apt_guest() { if [ "$MODE" = chroot ]; then in_root "$@"; else "$@"; fi; }

step guest-packages "getting Debian's linux-image-amd64 (kernel + modules) and busybox-static for the guest"
key="linux-image-amd64 busybox-static $MODE $MIRROR"
if stamp_ok guest-packages "$key" && [ -f "$GUEST/kernel-version" ] && [ -x "$GUEST/root/bin/busybox" ]; then
    step_done "cached"
else
    : > "$LOGS/guest-packages.log"
    check_network
    if [ "$MODE" = chroot ]; then
        DL=$ROOT/var/cache/vb-guest-debs; DL_IN=/var/cache/vb-guest-debs
    else
        DL=$GUEST/debs; DL_IN=$DL
    fi
    # The download folder is root's alone (0700, like every folder above it
    # not writable by others): what is unpacked below, as root, must be what
    # apt fetched. apt downloads as root here (APT::Sandbox::User=root), so
    # its sandbox user needs no write access either.
    rm -rf "$DL"; install -d -m 0700 -o root -g root "$DL" || fail "cannot create $DL"
    KPKG=$(apt_guest apt-cache depends linux-image-amd64 2>>"$LOGS/guest-packages.log" | awk '/Depends: linux-image-/ { print $2; exit }')
    [ -n "$KPKG" ] || fail "cannot resolve linux-image-amd64 to a kernel package: $(why_from_log "$LOGS/guest-packages.log")"
    say "[$CURRENT_STEP] apt-get download $KPKG busybox-static"
    apt_guest /bin/sh -c "cd '$DL_IN' && apt-get -o APT::Sandbox::User=root download '$KPKG' busybox-static" >>"$LOGS/guest-packages.log" 2>&1 ||
        fail "apt-get download $KPKG busybox-static failed: $(why_from_log "$LOGS/guest-packages.log")"
    # Unpack exactly the two packages asked for, each a regular file whose
    # SHA256 is the one apt's signed index gives for the candidate version.
    debs=()
    for pkg in "$KPKG" busybox-static; do
        found=( "$DL/${pkg}"_*.deb )
        [ "${#found[@]}" -eq 1 ] && [ -f "${found[0]}" ] && [ ! -L "${found[0]}" ] ||
            fail "expected one regular file ${pkg}_*.deb in $DL, found: ${found[*]}"
        want=$(apt_guest apt-cache show --no-all-versions "$pkg" 2>>"$LOGS/guest-packages.log" | awk '/^SHA256:/ { print $2; exit }')
        got=$(sha256sum "${found[0]}" | cut -d' ' -f1)
        [ -n "$want" ] && [ "$want" = "$got" ] ||
            fail "$(basename "${found[0]}"): SHA256 $got is not apt's ${want:-(none)} for $pkg"
        debs+=( "${found[0]}" )
    done
    others=$(find "$DL" -mindepth 1 -maxdepth 1 ! -name "${KPKG}_*.deb" ! -name 'busybox-static_*.deb' | head -n 3)
    [ -z "$others" ] || fail "unexpected files in the download folder $DL: $others"
    rm -rf "$GUEST/root.new"; mkdir -p "$GUEST/root.new"
    for deb in "${debs[@]}"; do
        say "[$CURRENT_STEP] unpacking $(basename "$deb")"
        dpkg-deb -x "$deb" "$GUEST/root.new" >>"$LOGS/guest-packages.log" 2>&1 || fail "dpkg-deb -x $deb failed"
    done
    # Debian 13 packages are merged-/usr (usr/lib/modules, usr/bin/busybox):
    # give the unpacked tree the usual /lib and /bin links.
    for d in lib bin sbin; do
        [ -e "$GUEST/root.new/$d" ] || [ ! -d "$GUEST/root.new/usr/$d" ] || ln -s "usr/$d" "$GUEST/root.new/$d"
    done
    KVER=$(ls "$GUEST/root.new/lib/modules" 2>/dev/null | head -n 1)
    [ -n "$KVER" ] && [ -f "$GUEST/root.new/boot/vmlinuz-$KVER" ] || fail "no kernel found in $KPKG"
    [ -x "$GUEST/root.new/bin/busybox" ] || fail "no /bin/busybox in busybox-static"
    # modules.dep is generated by depmod at install time, not shipped: make it
    # (with the host's depmod, which only reads the module files).
    if [ ! -f "$GUEST/root.new/lib/modules/$KVER/modules.dep" ]; then
        say "[$CURRENT_STEP] depmod for $KVER (modules.dep is not shipped in the package)"
        depmod -b "$GUEST/root.new" "$KVER" >>"$LOGS/guest-packages.log" 2>&1 || fail "depmod -b $GUEST/root.new $KVER failed"
    fi
    echo "$KVER" > "$GUEST/root.new/kernel-version"
    rm -rf "$GUEST/root" && mv "$GUEST/root.new" "$GUEST/root" && mv "$GUEST/root/kernel-version" "$GUEST/kernel-version" ||
        fail "cannot move $GUEST/root.new into place"
    rm -rf "$DL"
    stamp_set guest-packages "$key"
    step_done "kernel $KVER"
fi
GUEST_KERNEL_VERSION=$(cat "$GUEST/kernel-version")
KERNEL=$GUEST/root/boot/vmlinuz-$GUEST_KERNEL_VERSION
MODULES=$GUEST/root/lib/modules/$GUEST_KERNEL_VERSION
BUSYBOX=$GUEST/root/bin/busybox

# ------------------------------------------------------------- ownership
# What root runs from this cache (QEMU, busybox in build-initramfs.sh, the
# guest kernel) must be root's: the chroot (whose /tmp and apt folders are
# writable by others or owned by _apt, as in any Debian root) is closed to
# other users, and nothing else that others can reach may be writable by
# them or owned by anyone but root.
step ownership "checking that nothing in $CACHE that others can reach is theirs to write"
[ ! -d "$ROOT" ] || chmod 0700 "$ROOT" || fail "cannot close $ROOT to other users"
chmod go-w "$CACHE" || fail "cannot make $CACHE writable by root only"
bad=$(find "$CACHE" -xdev \( ! -type l ! -type c ! -type b \( -perm -o+w -o ! -user root \) -print \) \
    -o \( -type d ! -perm -o+x -prune \) 2>&1 | head -n 5)
[ -z "$bad" ] || fail "other users can write or own what root runs from $CACHE: $(echo "$bad" | tr '\n' ' ')"
step_done

# ------------------------------------------------------------------ env.sh
step env "writing $CACHE/env.sh"
cat > "$CACHE/env.sh.new" <<EOF
# Generated by qemu-configs/provision.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); source it.
VB_CACHE='$CACHE'
# How QEMU is run: system | backports | chroot (QEMU inside QEMU_ROOT via the wrapper)
QEMU_MODE='$MODE'
QEMU='$WRAPPER'
QEMU_ROOT='$( [ "$MODE" = chroot ] && echo "$ROOT" )'
QEMU_VERSION='$QEMU_VERSION'
QEMU_VERSION_FULL='$QEMU_VERSION_FULL'
# Paths that are the same for QEMU and the host (chroot mode: bind-mounted;
# add more with VHOST_BALLOON_SHARED_DIRS=dir1:dir2 when running QEMU).
QEMU_SHARED_DIRS='$( [ "$MODE" = chroot ] && echo "$CACHE:/tmp" || echo / )'
# A directory for sockets and run files, visible to QEMU at the same path.
VB_RUN_DIR='$CACHE/run'
GUEST_KERNEL_VERSION='$GUEST_KERNEL_VERSION'
KERNEL='$KERNEL'
MODULES='$MODULES'
BUSYBOX='$BUSYBOX'
EOF
mv "$CACHE/env.sh.new" "$CACHE/env.sh" || fail "cannot write $CACHE/env.sh"
step_done
say "QEMU $QEMU_VERSION ($MODE): $WRAPPER"
say "guest kernel $GUEST_KERNEL_VERSION: $KERNEL"
say "all done in $(elapsed "$T0") s; source $CACHE/env.sh"
