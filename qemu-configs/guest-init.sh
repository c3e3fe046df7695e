#!/bin/sh
# vhost-balloon guest workload: the initramfs's /init (busybox sh).
#
# Loads virtio_balloon, prints the features the guest accepted, traces every
# free page report with ftrace function_graph, keeps an integrity region it
# never frees, fills and frees memory in rounds so that reports happen,
# verifies the integrity region, prints the report durations and powers off.
#
# Parameters, from the kernel command line (/proc/cmdline):
#   vb.rounds=N     fill/free rounds (default 2)
#   vb.size=MIB     MiB written into a tmpfs file per round (default 300)
#   vb.pause=S      seconds to wait after each free, so reporting (2 s delay)
#                   runs (default 5)
#   vb.settle=S     extra seconds before the final checks (default 0)
#   vb.keep=MIB     size of the integrity region (default 16)
#   vb.trace=0      do not set up ftrace
#   vb.shell=1      start a shell on the console at the end instead of
#                   powering off
#
# Output: console lines starting with "VB " are machine-readable, one event a
# line, space-separated key=value pairs; t= is seconds since boot
# (/proc/uptime), t_mono= is CLOCK_MONOTONIC seconds (ftrace's "mono").
#   VB init t=...                              /init started
#   VB modules loaded=virtio_balloon t=...
#   VB features=0x... bits=5,32 reporting=1 poison=0 device=virtio1 driver=virtio_balloon page_reporting_order=9
#   VB ftrace=on function=virtballoon_free_page_report clock=mono
#   VB keep mib=16 md5=...
#   VB round=1 filled_mib=300 t=... memfree_kib=...
#   VB round=1 freed t=... memfree_kib=...
#   VB round=1 paused t=... memfree_kib=...
#   VB integrity=ok|bad
#   VB report_us=D t_start_mono=S cpu=C        one per traced report
#   VB reports=N report_us_total=... report_us_max=...
#   VB done t=...
#   VB error=WHAT ...                          something failed (then poweroff)

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

vbt() { read -r up _ < /proc/uptime; echo "$up"; }
memfree() { awk '/^MemFree:/ { print $2 }' /proc/meminfo; }
finish() {
    if [ "$SHELL_AT_END" = 1 ]; then
        echo "VB shell t=$(vbt)"
        setsid cttyhack sh 2>/dev/null || sh
    fi
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}
die() { echo "VB error=$1${2:+ detail=\"$2\"} t=$(vbt)"; finish; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "VB init t=$(vbt) kernel=$(uname -r)"

# ------------------------------------------------------------ parameters
ROUNDS=2 SIZE=300 PAUSE=5 SETTLE=0 KEEP=16 TRACE=1 SHELL_AT_END=0
for arg in $(cat /proc/cmdline); do
    case $arg in
        vb.rounds=*) ROUNDS=${arg#*=} ;;
        vb.size=*) SIZE=${arg#*=} ;;
        vb.pause=*) PAUSE=${arg#*=} ;;
        vb.settle=*) SETTLE=${arg#*=} ;;
        vb.keep=*) KEEP=${arg#*=} ;;
        vb.trace=*) TRACE=${arg#*=} ;;
        vb.shell=*) SHELL_AT_END=${arg#*=} ;;
    esac
done
echo "VB params rounds=$ROUNDS size_mib=$SIZE pause_s=$PAUSE settle_s=$SETTLE keep_mib=$KEEP trace=$TRACE"

# --------------------------------------------------------------- modules
# /etc/vb-modules lists the .ko files in load order (dependencies first);
# written by build-initramfs.sh from modules.dep.
loaded=
while read -r ko; do
    [ -n "$ko" ] || continue
    name=${ko##*/}; name=${name%.ko}
    if [ -d "/sys/module/$(echo "$name" | tr - _)" ]; then
        continue
    fi
    out=$(insmod "$ko" 2>&1) || die insmod "$name: $out"
    loaded="$loaded${loaded:+,}$name"
done < /etc/vb-modules
echo "VB modules loaded=${loaded:-none} t=$(vbt)"

# ------------------------------------------------- the balloon's features
dev=
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] && { dev=$d; break; }
done
[ -n "$dev" ] || die no-balloon-device "no virtio device with id 0x0005 under /sys/bus/virtio/devices"
driver=none
[ -e "$dev/driver" ] && driver=$(basename "$(readlink "$dev/driver")")
order=absent
[ -r /sys/module/page_reporting/parameters/page_reporting_order ] &&
    order=$(cat /sys/module/page_reporting/parameters/page_reporting_order)
# features: one '0'/'1' character per bit, bit 0 first.
awk -v dev="${dev##*/}" -v driver="$driver" -v order="$order" '
{
    bits = ""; hex = ""
    for (i = 1; i <= length($0); i++)
        if (substr($0, i, 1) == "1") bits = bits (bits == "" ? "" : ",") (i - 1)
    for (n = 15; n >= 0; n--) {
        v = 0
        for (b = 3; b >= 0; b--) v = v * 2 + (substr($0, n * 4 + b + 1, 1) == "1")
        hex = hex substr("0123456789abcdef", v + 1, 1)
    }
    printf "VB features=0x%s bits=%s reporting=%d poison=%d device=%s driver=%s page_reporting_order=%s\n",
        hex, bits, substr($0, 6, 1) == "1", substr($0, 5, 1) == "1", dev, driver, order
}' "$dev/features"

# ---------------------------------------------------------------- ftrace
T=/sys/kernel/tracing
FN=virtballoon_free_page_report
if [ "$TRACE" = 1 ]; then
    mount -t tracefs tracefs $T 2>/dev/null
    if [ ! -w $T/set_ftrace_filter ]; then
        echo "VB ftrace=unavailable reason=no-tracefs"; TRACE=0
    elif ! grep -qE "^$FN( |\$)" $T/available_filter_functions; then
        echo "VB ftrace=unavailable reason=$FN-not-traceable"; TRACE=0
    else
        echo 0 > $T/tracing_on
        echo mono > $T/trace_clock
        echo $FN > $T/set_ftrace_filter
        echo function_graph > $T/current_tracer
        echo 1 > $T/options/funcgraph-abstime
        echo 1 > $T/options/funcgraph-tail
        echo 1 > $T/options/sleep-time 2>/dev/null   # count time asleep in wait_event
        : > $T/trace
        echo 1 > $T/tracing_on
        echo "VB ftrace=on function=$FN clock=mono tracer=$(cat $T/current_tracer)"
    fi
fi

# ------------------------------------------------------- integrity region
mkdir -p /keep /fill
mount -t tmpfs -o size=$((KEEP + 4))m tmpfs /keep || die mount-keep
mount -t tmpfs -o size=$((SIZE + 8))m tmpfs /fill || die mount-fill
dd if=/dev/urandom of=/keep/data bs=1M count="$KEEP" 2>/dev/null || die keep-write
keep_md5=$(md5sum /keep/data | cut -d' ' -f1)
echo "VB keep mib=$KEEP md5=$keep_md5 t=$(vbt)"

# ------------------------------------------------------ fill/free rounds
r=1
while [ "$r" -le "$ROUNDS" ]; do
    echo "VB round=$r fill_start t=$(vbt) memfree_kib=$(memfree)"
    out=$(dd if=/dev/zero of=/fill/data bs=1M count="$SIZE" 2>&1) || die fill "round $r: $out"
    echo "VB round=$r filled_mib=$SIZE t=$(vbt) memfree_kib=$(memfree)"
    rm -f /fill/data
    echo "VB round=$r freed t=$(vbt) memfree_kib=$(memfree)"
    sleep "$PAUSE"
    echo "VB round=$r paused t=$(vbt) memfree_kib=$(memfree)"
    r=$((r + 1))
done
[ "$SETTLE" != 0 ] && sleep "$SETTLE"

# -------------------------------------------------------------- results
now_md5=$(md5sum /keep/data | cut -d' ' -f1)
if [ "$now_md5" = "$keep_md5" ]; then
    echo "VB integrity=ok md5=$now_md5"
else
    echo "VB integrity=bad md5=$now_md5 expected=$keep_md5"
fi

if [ "$TRACE" = 1 ]; then
    echo 0 > $T/tracing_on
    # function_graph lines, e.g. (abstime | cpu) duration | function):
    #   123.456789 |   0) ! 1234.567 us |  virtballoon_free_page_report();
    #   123.456789 |   0)               |  virtballoon_free_page_report() {
    #   125.456789 |   0) $ 2000123 us  |  } /* virtballoon_free_page_report */
    # Only that function is traced, so every line with a duration is one
    # report: a leaf line is stamped at entry, a closing brace at return.
    awk '
    /^#/ { next }
    {
        n = split($0, f, "|")
        if (n < 3) next
        if (!match(f[2], /[0-9]+(\.[0-9]+)? us/)) next
        d = substr(f[2], RSTART, RLENGTH - 3) + 0
        t = f[1] + 0
        cpu = f[2]; sub(/\).*/, "", cpu); gsub(/ /, "", cpu)
        if (f[3] ~ /}/) t = t - d / 1e6
        printf "VB report_us=%.3f t_start_mono=%.6f cpu=%s\n", d, t, cpu
        count++; total += d; if (d > max) max = d
    }
    END { printf "VB reports=%d report_us_total=%.3f report_us_max=%.3f\n", count, total, max }
    ' $T/trace
    overrun=$(cat $T/per_cpu/cpu*/stats 2>/dev/null | awk '/^overrun:/ { s += $2 } END { print s + 0 }')
    echo "VB ftrace_overrun=$overrun"
fi

echo "VB done t=$(vbt)"
finish
