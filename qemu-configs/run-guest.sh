#!/bin/bash
# run-guest.sh: run the project's test guest (Debian kernel + the initramfs
# from build-initramfs.sh, /init = guest-init.sh) under the provisioned QEMU,
# with its virtio-balloon served by a vhost-user backend, or by QEMU's own
# device for a baseline, or with no balloon device at all (a control for the
# gigantic workload). The guest console goes to stdout; the guest powers
# itself off when its workload is done and QEMU exits.
#
# Usage:
#   run-guest.sh [options] SOCKET [extra QEMU args...]      vhost-user balloon at SOCKET
#   run-guest.sh [options] --builtin [extra QEMU args...]    QEMU's virtio-balloon-pci,free-page-reporting=on
#   run-guest.sh [options] --no-balloon [extra QEMU args...] no balloon device (a control for gigantic, offline, vmem, fill)
#
# Start the backend first, with its socket in a directory QEMU shares
# (CACHE/run, /tmp, or one listed in VHOST_BALLOON_SHARED_DIRS):
#   vhost-balloon serve --socket-path /var/cache/vhost-balloon/run/b.sock --trace /tmp/t.jsonl &
#   qemu-configs/run-guest.sh --rounds 2 --size 300 /var/cache/vhost-balloon/run/b.sock
#   qemu-configs/run-guest.sh --workload gigantic --duration 30 --mem 2560M \
#       --append "nokaslr init_on_alloc=0" /var/cache/vhost-balloon/run/b.sock
#
# Options (environment variable in brackets):
#   --workload W      the guest's workload (fill) [VB_WORKLOAD]: fill = fill/free
#                     rounds; gigantic = allocate and free one 1 GiB hugetlb page
#                     in a loop (give it --mem 2560M and --append "nokaslr
#                     init_on_alloc=0"; `vhost-balloon launch` does); offline =
#                     offline and online ZONE_MOVABLE memory blocks in a loop
#                     (add movablecore=1536M to that --append); balloon =
#                     classic ballooning driven by the host; pattern = write,
#                     free and check 1 MiB patterns under reporting
#   --rounds N        fill: fill/free rounds in the guest (2) [VB_ROUNDS]
#   --size MIB        fill: MiB filled and freed per round (300) [VB_SIZE]
#   --pause S         fill: seconds the guest waits after each free (5) [VB_PAUSE]
#   --settle S        fill: extra seconds before the final checks (0); gigantic:
#                     seconds before the attempt loop (20) [VB_SETTLE]
#   --duration S      gigantic: length of the attempt loop (30) [VB_DURATION]
#   --mem SIZE        guest RAM, a shared memfd (512M) [VB_MEM]
#   --num-vqs N       queues of the vhost-user device (3) [VB_NUM_VQS]: must be
#                     what the guest driver creates for the features the
#                     backend offers (inflate, deflate, + stats / free-page /
#                     reporting when offered); `vhost-balloon launch` derives it
#   --accel A         auto | tcg | kvm (auto) [VB_ACCEL]; auto probes KVM once
#                     (boots the kernel under KVM for a few seconds, result
#                     cached) and falls back to TCG saying why
#   --append STR      more kernel command line [VB_APPEND]
#   --timeout S       kill QEMU after S seconds (900) [VB_TIMEOUT]
#   --mem-log FILE    sample QEMU's RssShmem and the memfd's allocated KiB
#                     every second into FILE [VB_MEM_LOG]
#   --timestamps      prefix each console line with the host's uptime
#   --no-build        use CACHE/initramfs.cpio.gz as it is
#   --kernel FILE     boot this kernel instead of the provisioned one [VB_KERNEL]
#   --initrd FILE     use this initrd instead of building the project's [VB_INITRD]
#   --mem-path DIR    guest RAM is a file in DIR (memory-backend-file, e.g. a
#                     hugetlbfs mount) instead of a memfd [VB_MEM_PATH]
#   --virtio-mem MIB  also a virtio-mem-pci device (id vm0) of MIB MiB, backed by a
#                     shared memfd the backend maps too, none of it plugged
#                     (requested-size=0: plug and unplug through QMP qom-set
#                     /machine/peripheral/vm0 requested-size); -m gets
#                     maxmem=MEM+MIB [VB_VIRTIO_MEM]
#   --share on|off    share= of the RAM backend (on); off only to see QEMU's
#                     error when vhost-user cannot map guest RAM [VB_SHARE]
#   --qemu BIN        run this QEMU instead of the provisioned one [VB_QEMU]
#   --listen          QEMU listens at SOCKET (server=on,wait=on) and the backend
#                     connects (`vhost-balloon serve --connect SOCKET`): QEMU
#                     waits for it before the guest starts [VB_LISTEN]
# Exit status: QEMU's (0 after the guest's poweroff), 124 on timeout.
# Host-side notes go to stderr, prefixed "run-guest:".
# shellcheck disable=SC2054  # QEMU options are comma-separated by design
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VHOST_BALLOON_CACHE:-/var/cache/vhost-balloon}
ROUNDS=${VB_ROUNDS:-2} SIZE=${VB_SIZE:-300} PAUSE=${VB_PAUSE:-5} SETTLE=${VB_SETTLE:-}
WORKLOAD=${VB_WORKLOAD:-fill} DURATION=${VB_DURATION:-30}
NUM_VQS=${VB_NUM_VQS:-3}
MEM=${VB_MEM:-512M} ACCEL=${VB_ACCEL:-auto} APPEND=${VB_APPEND:-} TIMEOUT=${VB_TIMEOUT:-900}
MEM_LOG=${VB_MEM_LOG:-} TIMESTAMPS=0 BUILD=1
USER_KERNEL=${VB_KERNEL:-} USER_INITRD=${VB_INITRD:-} MEM_PATH=${VB_MEM_PATH:-}
SHARE=${VB_SHARE:-on} USER_QEMU=${VB_QEMU:-} LISTEN=${VB_LISTEN:-0}
VIRTIO_MEM=${VB_VIRTIO_MEM:-}
SOCK='' BUILTIN=0 NO_BALLOON=0

note() { echo "run-guest: $*" >&2; }
fail() { echo "run-guest: FAILED: $*" >&2; exit 1; }
# A value inside a QEMU option string: QEMU reads ',' as the next option's
# start, and ',,' as a literal comma.
qemu_opt() { printf '%s' "${1//,/,,}"; }
usage() { sed -n '2,/^set -u/p' "$0" | sed '/shellcheck/d; $d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --pause) PAUSE=$2; shift 2 ;;
        --settle) SETTLE=$2; shift 2 ;;
        --workload) WORKLOAD=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --num-vqs) NUM_VQS=$2; shift 2 ;;
        --accel) ACCEL=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --mem-log) MEM_LOG=$2; shift 2 ;;
        --timestamps) TIMESTAMPS=1; shift ;;
        --no-build) BUILD=0; shift ;;
        --kernel) USER_KERNEL=$2; shift 2 ;;
        --initrd) USER_INITRD=$2; shift 2 ;;
        --mem-path) MEM_PATH=$2; shift 2 ;;
        --share) SHARE=$2; shift 2 ;;
        --virtio-mem) VIRTIO_MEM=$2; shift 2 ;;
        --qemu) USER_QEMU=$2; shift 2 ;;
        --listen) LISTEN=1; shift ;;
        --builtin) BUILTIN=1; shift; break ;;
        --no-balloon) NO_BALLOON=1; shift; break ;;
        -h|--help) usage; exit 0 ;;
        -*) fail "unknown option '$1' (see --help)" ;;
        *) SOCK=$1; shift; break ;;
    esac
done
[ "$BUILTIN" = 1 ] || [ "$NO_BALLOON" = 1 ] || [ -n "$SOCK" ] || { usage >&2; exit 2; }
for v in "$ROUNDS" "$SIZE" "$PAUSE" "${SETTLE:-0}" "$DURATION" "$TIMEOUT"; do
    case $v in ''|*[!0-9]*) fail "--rounds, --size, --pause, --settle, --duration and --timeout take whole numbers, not '$v'" ;; esac
done
case $WORKLOAD in fill|gigantic|offline|vmem|balloon|pattern) ;; *) fail "--workload must be fill, gigantic, offline, vmem, balloon or pattern, not '$WORKLOAD'" ;; esac
case $NO_BALLOON:$WORKLOAD in 0:*|1:gigantic|1:offline|1:vmem|1:fill) ;;
    *) fail "--no-balloon is a control for --workload gigantic, offline, vmem or fill (the $WORKLOAD workload needs a balloon device)" ;;
esac
case $ACCEL in auto|tcg|kvm) ;; *) fail "--accel must be auto, tcg or kvm, not '$ACCEL'" ;; esac
case $SHARE in on|off) ;; *) fail "--share must be on or off, not '$SHARE'" ;; esac
case $MEM in ''|*[!0-9.KMGTPEkmgtpeBb]*) fail "--mem must be a size such as 512M, not '$MEM'" ;; esac

[ -r "$CACHE/env.sh" ] || fail "$CACHE/env.sh not found: run qemu-configs/provision.sh first"
. "$CACHE/env.sh"
if [ -n "$USER_QEMU" ]; then
    QEMU=$(command -v "$USER_QEMU") || fail "QEMU $USER_QEMU not found"
    QEMU_VERSION=$("$QEMU" --version 2>/dev/null | sed -n '1s/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p')
    QEMU_VERSION_FULL=$("$QEMU" --version 2>/dev/null | head -n 1)
    QEMU_MODE=user
fi
[ -x "$QEMU" ] || fail "$QEMU not found: run qemu-configs/provision.sh"
if [ -n "$USER_KERNEL" ]; then
    [ -f "$USER_KERNEL" ] || fail "kernel $USER_KERNEL not found"
    KERNEL=$(cd "$(dirname "$USER_KERNEL")" && pwd -P)/$(basename "$USER_KERNEL")
    GUEST_KERNEL_VERSION="$(basename "$KERNEL") (user's)"
fi
[ -f "$KERNEL" ] || fail "guest kernel $KERNEL not found: run qemu-configs/provision.sh --refresh"

# under_shared PATH: is PATH (resolved) visible to QEMU at the same path?
under_shared() {
    local p=$1 d
    [ "$QEMU_MODE" = chroot ] || return 0
    local IFS=:
    for d in $QEMU_SHARED_DIRS ${VHOST_BALLOON_SHARED_DIRS:-}; do
        [ -d "$d" ] || continue
        d=$(cd "$d" && pwd -P)
        case $p/ in "$d"/*) return 0 ;; esac
    done
    return 1
}

if [ "$BUILTIN" = 0 ] && [ "$NO_BALLOON" = 0 ] && [ "$LISTEN" = 1 ]; then
    # QEMU makes the socket: only its directory must exist and be shared.
    [ -n "$SOCK" ] || fail "--listen needs a SOCKET path for QEMU to listen on"
    [ -e "$SOCK" ] && fail "$SOCK exists: QEMU must create the socket it listens on (remove it first)"
    [ -d "$(dirname "$SOCK")" ] || fail "directory $(dirname "$SOCK") does not exist"
    SOCK=$(cd "$(dirname "$SOCK")" && pwd -P)/$(basename "$SOCK")
    under_shared "$SOCK" || fail "socket $SOCK is outside the directories QEMU shares with the host ($QEMU_SHARED_DIRS): put it in $VB_RUN_DIR or /tmp, or set VHOST_BALLOON_SHARED_DIRS=$(dirname "$SOCK")"
elif [ "$BUILTIN" = 0 ] && [ "$NO_BALLOON" = 0 ]; then
    [ -e "$SOCK" ] || fail "socket $SOCK does not exist: start the backend first (vhost-balloon serve --socket-path $SOCK)"
    [ -S "$SOCK" ] || fail "$SOCK is not a unix socket"
    SOCK=$(cd "$(dirname "$SOCK")" && pwd -P)/$(basename "$SOCK")
    under_shared "$SOCK" || fail "socket $SOCK is outside the directories QEMU shares with the host ($QEMU_SHARED_DIRS): put it in $VB_RUN_DIR or /tmp, or set VHOST_BALLOON_SHARED_DIRS=$(dirname "$SOCK")"
fi

if [ -n "$USER_INITRD" ]; then
    [ -f "$USER_INITRD" ] || fail "initrd $USER_INITRD not found"
    INITRD=$(cd "$(dirname "$USER_INITRD")" && pwd -P)/$(basename "$USER_INITRD")
elif [ "$BUILD" = 1 ]; then
    INITRD=$("$HERE/build-initramfs.sh" | tail -n 1) || fail "build-initramfs.sh failed"
else
    INITRD=$(readlink -f "$CACHE/initramfs.cpio.gz")
fi
[ -s "$INITRD" ] || fail "initramfs $INITRD not found"
for f in "$KERNEL" "$INITRD" ${MEM_PATH:+"$MEM_PATH"}; do
    under_shared "$(cd "$(dirname "$f")" && pwd -P)/$(basename "$f")" ||
        fail "$f is outside the directories QEMU shares with the host ($QEMU_SHARED_DIRS): move it or set VHOST_BALLOON_SHARED_DIRS=$(dirname "$f")"
done
if [ -n "$MEM_PATH" ]; then
    [ -d "$MEM_PATH" ] || fail "--mem-path $MEM_PATH is not a directory"
    MEM_PATH=$(cd "$MEM_PATH" && pwd -P)
fi

# ----------------------------------------------------------------- accel
# probe_kvm: boot the guest kernel under KVM without an initrd; reaching the
# "Unable to mount root fs" panic means KVM ran the kernel through its whole
# boot. Cached per host kernel, QEMU and guest kernel.
probe_kvm() {
    PROBE_WHY=
    if [ ! -e /dev/kvm ]; then PROBE_WHY="no /dev/kvm"; return 1; fi
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then PROBE_WHY="/dev/kvm is not read/writable"; return 1; fi
    local key cachef out pid i verdict=
    key=$(echo "$(uname -r) $(cut -d' ' -f1 /proc/modules 2>/dev/null | grep '^kvm' | sort | tr '\n' ' ') $QEMU_VERSION_FULL $KERNEL" | sha256sum | cut -c1-16)
    cachef=$CACHE/kvm-probe-$key
    if [ -s "$cachef" ]; then
        read -r verdict PROBE_WHY < "$cachef"
        PROBE_WHY="$PROBE_WHY (cached probe result, $cachef)"
        [ "$verdict" = ok ]; return
    fi
    note "probing KVM: booting the guest kernel under -accel kvm for at most 20 s"
    out=$VB_RUN_DIR/kvm-probe.$$.log
    "$QEMU" -accel kvm -cpu max -m 256M -machine q35 -nographic -no-reboot -nic none -vga none \
        -kernel "$KERNEL" -append "console=ttyS0 panic=-1" </dev/null >"$out" 2>&1 &
    pid=$!
    for ((i = 0; i < 100; i++)); do
        sleep 0.2
        if grep -q "Unable to mount root fs" "$out"; then verdict=ok; PROBE_WHY="the guest kernel booted under KVM"; break; fi
        if grep -qE "KVM internal error|emulation failure|failed to initialize kvm|Could not access KVM" "$out"; then
            verdict=no; PROBE_WHY="KVM cannot run the guest kernel: $(tr -d '\r' < "$out" | grep -m1 -oE "(KVM internal error|emulation failure|failed to initialize kvm|Could not access KVM).*")"
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            verdict=no; PROBE_WHY="QEMU under KVM exited before the kernel booted: $(tail -n 1 "$out" | tr -d '\r')"; break
        fi
    done
    if [ -z "$verdict" ]; then
        verdict=no; PROBE_WHY="the guest kernel did not finish booting under KVM within 20 s"
    fi
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    rm -f "$out"
    echo "$verdict $PROBE_WHY" > "$cachef"
    [ "$verdict" = ok ]
}

case $ACCEL in
    tcg) CPU=max; note "accelerator: tcg (asked for)" ;;
    kvm) CPU=max; note "accelerator: kvm (asked for, not probed)" ;;
    auto)
        if probe_kvm; then ACCEL=kvm; note "accelerator: kvm ($PROBE_WHY)"
        else ACCEL=tcg; note "accelerator: tcg, because $PROBE_WHY"; fi
        CPU=max ;;
esac

# ----------------------------------------------------------- command line
KAPPEND="console=ttyS0 panic=-1 vb.workload=$WORKLOAD vb.rounds=$ROUNDS vb.size=$SIZE vb.pause=$PAUSE${SETTLE:+ vb.settle=$SETTLE} vb.duration=$DURATION${APPEND:+ $APPEND}"
ARGS=(
    -name vhost-balloon-guest
    -machine q35,memory-backend=mem
    -accel "$ACCEL" -cpu "$CPU"
    -m "$MEM"
)
if [ -n "$VIRTIO_MEM" ]; then
    case $VIRTIO_MEM in ''|*[!0-9]*) fail "--virtio-mem takes MiB, not '$VIRTIO_MEM'" ;; esac
    case $MEM in
        *[0-9]M) mem_mib=${MEM%M} ;;
        *[0-9]G) mem_mib=$(( ${MEM%G} * 1024 )) ;;
        *) fail "--virtio-mem needs --mem in whole M or G, not '$MEM'" ;;
    esac
    case $mem_mib in ''|*[!0-9]*) fail "--virtio-mem needs --mem in whole M or G, not '$MEM'" ;; esac
    ARGS[${#ARGS[@]}-1]="$MEM,maxmem=$(( mem_mib + VIRTIO_MEM ))M"
    ARGS+=(
        -object "memory-backend-memfd,id=vmem0,size=${VIRTIO_MEM}M,share=$SHARE"
        -device "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0"
    )
fi
if [ -n "$MEM_PATH" ]; then
    # A file in MEM_PATH (hugetlbfs: huge pages), unlinked by QEMU once open.
    ARGS+=(-object "memory-backend-file,id=mem,size=$MEM,mem-path=$(qemu_opt "$MEM_PATH"),share=$SHARE")
else
    ARGS+=(-object "memory-backend-memfd,id=mem,size=$MEM,share=$SHARE")
fi
if [ "$NO_BALLOON" = 1 ]; then
    WHAT="no balloon device"
elif [ "$BUILTIN" = 1 ]; then
    ARGS+=(-device virtio-balloon-pci,id=balloon0,free-page-reporting=on)
    WHAT="QEMU's built-in virtio-balloon-pci,free-page-reporting=on"
else
    ARGS+=(
        -chardev "socket,id=vub,path=$(qemu_opt "$SOCK")$([ "$LISTEN" = 1 ] && echo ,server=on,wait=on)"
        -device "vhost-user-test-device-pci,chardev=vub,virtio-id=5,num_vqs=$NUM_VQS,config_size=16,vq_size=64"
    )
    WHAT="vhost-user balloon at $SOCK"
fi
ARGS+=(
    -nic none -vga none -nographic -no-reboot
    -kernel "$KERNEL" -initrd "$INITRD" -append "$KAPPEND"
    "$@"
)
note "QEMU $QEMU_VERSION ($QEMU_MODE), guest kernel $GUEST_KERNEL_VERSION, $WHAT"
note "initramfs $INITRD"
note "$QEMU ${ARGS[*]}"

# ------------------------------------------------------------------- run
uptime_s() { read -r u _ < /proc/uptime; echo "$u"; }
T_START=$(uptime_s)
if [ "$TIMESTAMPS" = 1 ]; then
    "$QEMU" "${ARGS[@]}" < /dev/null > >(while IFS= read -r line; do read -r u _ < /proc/uptime; printf '[%s] %s\n' "$u" "$line"; done) &
else
    "$QEMU" "${ARGS[@]}" < /dev/null &
fi
QPID=$!
note "qemu pid $QPID started at host uptime $T_START s"
trap 'note "interrupted: stopping QEMU (pid $QPID)"; kill "$QPID" 2>/dev/null' INT TERM

SAMPLER=
if [ -n "$MEM_LOG" ]; then
    (
        echo "# t_uptime_s rss_shmem_kib memfd_alloc_kib (QEMU pid $QPID)"
        while kill -0 "$QPID" 2>/dev/null; do
            rss=$(awk '/^RssShmem:/ { print $2 }' "/proc/$QPID/status" 2>/dev/null)
            alloc=
            for fd in /proc/$QPID/fd/*; do
                case $(readlink "$fd" 2>/dev/null) in
                    /memfd:mem*|"$MEM_PATH"/qemu_back_mem.*) alloc=$(( $(stat -L -c '%b * %B' "$fd" 2>/dev/null || echo 0) / 1024 )); break ;;
                esac
            done
            [ -n "$rss" ] && echo "$(uptime_s) $rss ${alloc:-?}"
            sleep 1
        done
    ) > "$MEM_LOG" &
    SAMPLER=$!
fi

TIMED_OUT=$(mktemp)
(
    i=0
    while kill -0 "$QPID" 2>/dev/null; do
        sleep 1; i=$((i + 1))
        if [ "$i" -ge "$TIMEOUT" ]; then
            echo yes > "$TIMED_OUT"
            note "timeout after $TIMEOUT s: killing QEMU (pid $QPID)"
            kill "$QPID" 2>/dev/null
            for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.5; done
            kill -9 "$QPID" 2>/dev/null
            break
        fi
    done
) &
WATCHDOG=$!
wait "$QPID"; RC=$?
while kill -0 "$QPID" 2>/dev/null; do wait "$QPID"; RC=$?; done   # wait returns early on a trapped signal
wait "$WATCHDOG" 2>/dev/null
[ -n "$SAMPLER" ] && wait "$SAMPLER" 2>/dev/null
[ -s "$TIMED_OUT" ] && RC=124
rm -f "$TIMED_OUT"
note "QEMU exited with status $RC after $(awk -v a="$T_START" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }') s"
exit "$RC"
