#!/bin/sh
# vhost-balloon guest workload: the initramfs's /init (busybox sh).
#
# Loads virtio_balloon, prints the features the guest accepted, traces every
# free page report with ftrace function_graph, keeps an integrity region it
# never frees, runs its workload, verifies the integrity region, prints the
# report durations and powers off. Workloads:
#   fill      fill and free memory in rounds so that reports happen
#   gigantic  after boot-time reporting settles, allocate and free one 1 GiB
#             hugetlb page in a loop for a fixed time, counting attempts and
#             failures, with the tracepoint page_isolation:test_pages_isolated
#             (the first busy pfn of a failed isolation test) traced beside
#             the reports, so that a failure can be matched with the report
#             that held that page. Needs 1 GiB pages (pdpe1gb: -cpu max) and a
#             1 GiB-aligned range that is all RAM (-m 2560M), and is meant for
#             `nokaslr init_on_alloc=0` (docs/qemu.md says why). Runs without
#             a balloon device too (the no-balloon control).
#   offline   offline_pages() on ZONE_MOVABLE: after reporting settles, take
#             each online movable memory block offline and online again
#             (online_movable), in turn, for vb.duration s, with the same
#             markers and test_pages_isolated events as gigantic: each
#             offline is an attempt, each failed isolation test one of
#             offline_pages()'s internal retries. Needs movable memory
#             (movablecore=, which launch sets for it).
#   vmem      virtio-mem beside free page reporting, driven by the host:
#             after reporting settles the guest waits vb.duration s with
#             test_pages_isolated traced, while the host plugs and unplugs
#             the virtio-mem device's memory through QMP (launch
#             --workload vmem); hotplugged memory is onlined movable
#             (memhp_default_state=online_movable, which launch sets).
#   balloon   classic ballooning, driven by the host: populate vb.size MiB
#             and free it, say "ready", wait for the balloon to take
#             vb.balloon MiB (MemFree falls), optionally fill past what is
#             free so that deflate-on-oom must give pages back (vb.oom MiB),
#             wait for the host to deflate (MemFree comes back), then fill
#             vb.size MiB again: the deflated memory is the guest's again.
#   pattern   the integrity check under reporting: vb.size 1 MiB files in
#             tmpfs, each a pattern naming its round. Each round frees
#             one half of them (its pages are reported), waits vb.pause s,
#             checks the files it kept against their pattern page by page,
#             and writes the freed ones anew; for vb.duration s, then every
#             file is checked once more.
#
# Parameters, from the kernel command line (/proc/cmdline):
#   vb.workload=W   fill (default) or gigantic
#   vb.rounds=N     fill: fill/free rounds (default 2)
#   vb.size=MIB     fill: MiB written into a tmpfs file per round (default 300)
#   vb.pause=S      fill: seconds to wait after each free, so reporting (2 s
#                   delay) runs (default 5)
#   vb.settle=S     fill: extra seconds before the final checks (default 0);
#                   gigantic: seconds to wait before the loop, so that the
#                   driver's boot-time reports of all free memory are over
#                   (default 20: a 2560 MiB guest's are done ~12 s after the
#                   driver loads under TCG, see docs/qemu.md)
#   vb.duration=S   gigantic: length of the attempt loop (default 30);
#                   balloon: how long to wait for each host step (default 30)
#   vb.balloon=MIB  balloon: the MiB the host will inflate (default 0)
#   vb.oom=MIB      balloon: after inflating, fill this much more than is
#                   free (default 0: no OOM step)
#   vb.movable_gigantic=1  set vm.movable_gigantic_pages=1 where the kernel
#                   has it (gigantic pages from ZONE_MOVABLE; not in 6.12)
#   vb.keep=MIB     size of the integrity region (default 16)
#   vb.trace=0      do not set up ftrace (no report lines, no events)
#   vb.shell=1      start a shell on the console at the end instead of
#                   powering off
#
# Output: console lines starting with "VB " are machine-readable, one event a
# line, space-separated key=value pairs; t= is seconds since boot
# (/proc/uptime), t_mono= is CLOCK_MONOTONIC seconds (ftrace's "mono"), pfns
# are hexadecimal (0x...) guest page frame numbers of 4 KiB.
#   VB init t=...                              /init started
#   VB params workload=W rounds=... settle_s=... duration_s=...
#   VB modules loaded=virtio_balloon,button,evdev t=...
#   VB acpid t=...                              the power button is handled
#   VB power_button t=...                       it was pressed (QMP system_powerdown): powering off
#   VB features=0x... bits=5,32 reporting=1 poison=0 device=virtio1 driver=virtio_balloon page_reporting_order=9
#   VB balloon=none t=...                      no balloon device (a control), carrying on
#   VB ftrace=on function=virtballoon_free_page_report clock=mono
#   VB keep mib=16 md5=...
#   VB round=1 filled_mib=300 t=... memfree_kib=...                 (fill)
#   VB round=1 freed t=... memfree_kib=...                          (fill)
#   VB round=1 paused t=... memfree_kib=...                         (fill)
#   VB gigantic_trace=on event=page_isolation:test_pages_isolated  (gigantic; or
#                                              =unavailable reason=...)
#   VB gigantic_zones block_mib=128 DMA32=0,1,.. Normal=.. Movable=..
#                                              the zone of every online memory block
#                                              (gigantic; before the loop)
#   VB offline_blocks usable=8,9,.. refused=19   offline: the movable blocks the
#                                              loop uses, and those that would not
#                                              go offline at all (left out)
#   VB gigantic_loop=start t=... settle_s=20 duration_s=30 memfree_kib=... [op=offline]
#   VB gigantic_loop=end t=... attempts=N failures=F
#   VB integrity=ok|bad
#   VB report_us=D t_start_mono=S cpu=C        one per traced report
#   VB reports=N report_us_total=... report_us_max=...
#   VB fill_round=R fill_us=U                  fill: round R's allocate-and-touch (ftrace clock)
#   VB gigantic_attempt i=N t_mono=S t_end_mono=S ok=0|1 test=success|fail|none
#                                              one per attempt (gigantic; from
#                                              trace markers written around
#                                              it): test= is the isolation
#                                              test's verdict, none when the
#                                              attempt never reached it
#   VB gigantic_event t_mono=S start_pfn=0x... end_pfn=0x... fin_pfn=0x... ret=fail|success attempt=N
#                                              one per test_pages_isolated
#                                              event; fin_pfn is the first
#                                              busy pfn when ret=fail
#   VB gigantic attempts=N failures=F isolation_failures=I events=E t_start_mono=S t_end_mono=S
#                                              totals (attempts and failures
#                                              counted by the loop itself)
#   VB balloon_phase=P t=... memfree_kib=... [mib=... ok=0|1]
#                                              balloon: P = populated, ready,
#                                              inflated, oom_filled,
#                                              deflated, refilled
#   VB pattern_round=R freed_mib=F checked_mib=C corrupted_pages=P t=... memfree_kib=...
#                                              pattern: one per round
#   VB pattern rounds=R files=N checked_mib=C corrupted_pages=P
#                                              pattern: totals, after the
#                                              last check of every file
#   VB ftrace_overrun=N                        events lost (0 expected)
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
WORKLOAD=fill ROUNDS=2 SIZE=300 PAUSE=5 SETTLE='' DURATION=30 KEEP=16 TRACE=1 SHELL_AT_END=0
BALLOON=0 OOM=0 MOVABLE_GIGANTIC=0
for arg in $(cat /proc/cmdline); do
    case $arg in
        vb.workload=*) WORKLOAD=${arg#*=} ;;
        vb.rounds=*) ROUNDS=${arg#*=} ;;
        vb.size=*) SIZE=${arg#*=} ;;
        vb.pause=*) PAUSE=${arg#*=} ;;
        vb.settle=*) SETTLE=${arg#*=} ;;
        vb.duration=*) DURATION=${arg#*=} ;;
        vb.keep=*) KEEP=${arg#*=} ;;
        vb.trace=*) TRACE=${arg#*=} ;;
        vb.shell=*) SHELL_AT_END=${arg#*=} ;;
        vb.balloon=*) BALLOON=${arg#*=} ;;
        vb.oom=*) OOM=${arg#*=} ;;
        vb.movable_gigantic=*) MOVABLE_GIGANTIC=${arg#*=} ;;
    esac
done
case $WORKLOAD in
    fill|balloon|pattern) SETTLE=${SETTLE:-0} ;;
    gigantic|offline|vmem) SETTLE=${SETTLE:-20} ;;
    *) die bad-workload "vb.workload=$WORKLOAD: expected fill, gigantic, offline, vmem, balloon or pattern" ;;
esac
for v in "$ROUNDS" "$SIZE" "$PAUSE" "$SETTLE" "$DURATION" "$KEEP" "$BALLOON" "$OOM"; do
    case $v in ''|*[!0-9]*) die bad-parameter "vb.rounds, vb.size, vb.pause, vb.settle, vb.duration, vb.keep, vb.balloon and vb.oom take whole numbers, not '$v'" ;; esac
done
echo "VB params workload=$WORKLOAD rounds=$ROUNDS size_mib=$SIZE pause_s=$PAUSE settle_s=$SETTLE duration_s=$DURATION keep_mib=$KEEP trace=$TRACE"

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

# ------------------------------------------------------ the power button
# QMP system_powerdown (launch's graceful stop) presses the ACPI power
# button; busybox acpid runs /etc/acpi/PWRF/00000080 for it, which says so
# and powers the guest off.
if [ -d /sys/module/button ] && [ -d /sys/module/evdev ]; then
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\nread -r up _ < /proc/uptime\necho "VB power_button t=$up" > /dev/console\npoweroff -f\n' \
        > /etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    acpid -c /etc/acpi -l /dev/null 2>/dev/null && echo "VB acpid t=$(vbt)"
fi

# ------------------------------------------------- the balloon's features
# print_features DEV: one VB features= line for the virtio device DEV.
print_features() {
    driver=none
    [ -e "$1/driver" ] && driver=$(basename "$(readlink "$1/driver")")
    order=absent
    [ -r /sys/module/page_reporting/parameters/page_reporting_order ] &&
        order=$(cat /sys/module/page_reporting/parameters/page_reporting_order)
    # features: one '0'/'1' character per bit, bit 0 first.
    awk -v dev="${1##*/}" -v driver="$driver" -v order="$order" '
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
    }' "$1/features"
}
dev=
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] && { dev=$d; break; }
done
if [ -n "$dev" ]; then
    print_features "$dev"
elif [ "$WORKLOAD" != balloon ] && [ "$WORKLOAD" != pattern ]; then
    echo "VB balloon=none t=$(vbt)"   # the no-balloon control: carry on
else
    die no-balloon-device "no virtio device with id 0x0005 under /sys/bus/virtio/devices"
fi

# ---------------------------------------------------------------- ftrace
T=/sys/kernel/tracing
FN=virtballoon_free_page_report
EVENT=page_isolation/test_pages_isolated
MARK=/dev/null   # the loops' trace markers go here
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
        [ -w $T/trace_marker ] && MARK=$T/trace_marker
        if [ "$WORKLOAD" = gigantic ] || [ "$WORKLOAD" = offline ] || [ "$WORKLOAD" = vmem ]; then
            # Events share the ring buffer with the function_graph tracer (it
            # prints them, and trace_marker writes, as /* ... */ comments),
            # so reports, isolation tests and attempts are on one clock.
            if [ -w "$T/events/$EVENT/enable" ] && [ -w $T/trace_marker ]; then
                echo 1 > "$T/events/$EVENT/enable"
                echo "VB gigantic_trace=on event=${EVENT%%/*}:${EVENT#*/}"
            else
                echo "VB gigantic_trace=unavailable reason=no-$EVENT-event"
            fi
        fi
        : > $T/trace
        echo 1 > $T/tracing_on
        echo "VB ftrace=on function=$FN clock=mono tracer=$(cat $T/current_tracer)"
    fi
elif [ "$WORKLOAD" = gigantic ] || [ "$WORKLOAD" = offline ] || [ "$WORKLOAD" = vmem ]; then
    echo "VB gigantic_trace=unavailable reason=vb.trace=0"
fi

# ------------------------------------------------------- integrity region
mkdir -p /keep /fill
mount -t tmpfs -o size=$((KEEP + 4))m tmpfs /keep || die mount-keep
dd if=/dev/urandom of=/keep/data bs=1M count="$KEEP" 2>/dev/null || die keep-write
keep_md5=$(md5sum /keep/data | cut -d' ' -f1)
echo "VB keep mib=$KEEP md5=$keep_md5 t=$(vbt)"

# ------------------------------------------------------ fill/free rounds
fill_rounds() {
    mount -t tmpfs -o size=$((SIZE + 8))m tmpfs /fill || die mount-fill
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        echo "VB round=$r fill_start t=$(vbt) memfree_kib=$(memfree)"
        # The markers time the allocate-and-touch on ftrace's clock: the
        # price of reporting is how much longer it takes once the host has
        # dropped the pages the last round freed.
        echo "vb_fill=$r start" > $MARK
        out=$(dd if=/dev/zero of=/fill/data bs=1M count="$SIZE" 2>&1) || die fill "round $r: $out"
        echo "vb_fill=$r end" > $MARK
        echo "VB round=$r filled_mib=$SIZE t=$(vbt) memfree_kib=$(memfree)"
        rm -f /fill/data
        echo "VB round=$r freed t=$(vbt) memfree_kib=$(memfree)"
        sleep "$PAUSE"
        echo "VB round=$r paused t=$(vbt) memfree_kib=$(memfree)"
        r=$((r + 1))
    done
    [ "$SETTLE" != 0 ] && sleep "$SETTLE"
}

# ------------------------------------------------- gigantic-page attempts
HUGE=/sys/kernel/mm/hugepages/hugepages-1048576kB
# Which zone each online memory block is in (movablecore= moves the top of
# memory into ZONE_MOVABLE): builtins only, one pass.
zones_line() {
    M=/sys/devices/system/memory
    read -r size < $M/block_size_bytes 2>/dev/null || return 0
    z_dma= z_dma32= z_normal= z_movable=
    for b in $M/memory*; do
        read -r on < "$b/online" 2>/dev/null || continue
        [ "$on" = 1 ] || continue
        read -r zone _ < "$b/valid_zones" 2>/dev/null || continue
        n=${b##*memory}
        case $zone in
            DMA) z_dma="$z_dma${z_dma:+,}$n" ;;
            DMA32) z_dma32="$z_dma32${z_dma32:+,}$n" ;;
            Normal) z_normal="$z_normal${z_normal:+,}$n" ;;
            Movable) z_movable="$z_movable${z_movable:+,}$n" ;;
        esac
    done
    MOVABLE_BLOCKS=$z_movable
    mg=absent
    if [ -w /proc/sys/vm/movable_gigantic_pages ]; then
        [ "$MOVABLE_GIGANTIC" = 1 ] && echo 1 > /proc/sys/vm/movable_gigantic_pages
        read -r mg < /proc/sys/vm/movable_gigantic_pages
    fi
    echo "VB gigantic_zones block_mib=$(( 0x$size >> 20 )) movable_gigantic_pages=$mg${z_dma:+ DMA=$z_dma}${z_dma32:+ DMA32=$z_dma32}${z_normal:+ Normal=$z_normal}${z_movable:+ Movable=$z_movable}"
}
# loop_begin [OP]: the loop's start line (the host's and guest's clocks
# meet on it), END (when the loop ends, in centiseconds of /proc/uptime)
# and the start marker on ftrace's clock.
loop_begin() {
    read -r up _ < /proc/uptime
    echo "VB gigantic_loop=start t=$up settle_s=$SETTLE duration_s=$DURATION memfree_kib=$(memfree)${1:+ op=$1}"
    read -r up _ < /proc/uptime
    END=$(( ${up%.*} * 100 + 1${up#*.} - 100 + DURATION * 100 ))
    echo "vb_loop=start" > $MARK
}
ATTEMPTS=0 FAILURES=0
gigantic_loop() {
    [ -d $HUGE ] || die no-gigantic-pages "$HUGE is missing: the guest CPU has no 1 GiB pages (pdpe1gb; use -cpu max)"
    nr=$HUGE/nr_hugepages
    echo 0 > $nr
    zones_line
    sleep "$SETTLE"
    # No fork inside the loop (a fork costs ~10 ms under TCG): builtins and
    # redirections only. /proc/uptime in centiseconds ends it; the markers
    # stamp each attempt on ftrace's mono clock, beside the events.
    loop_begin
    while :; do
        read -r up _ < /proc/uptime
        [ $(( ${up%.*} * 100 + 1${up#*.} - 100 )) -lt "$END" ] || break
        ATTEMPTS=$((ATTEMPTS + 1))
        echo "vb_try=$ATTEMPTS" > $MARK
        echo 1 > $nr   # never fails: the read-back tells
        read -r got < $nr
        echo "vb_got=$ATTEMPTS n=$got" > $MARK
        if [ "$got" = 1 ]; then
            echo 0 > $nr
        else
            FAILURES=$((FAILURES + 1))
        fi
    done
    echo "vb_loop=end" > $MARK
    echo 0 > $nr
    echo "VB gigantic_loop=end t=$(vbt) attempts=$ATTEMPTS failures=$FAILURES"
}

# offline_loop: the gigantic loop's shape, with offline_pages() as the
# attempt. Each movable block in turn: offline (timed by the markers; the
# write returns once offline_pages() is done, its retries inside), then
# online_movable again, outside the attempt.
offline_loop() {
    M=/sys/devices/system/memory
    zones_line
    [ -n "$MOVABLE_BLOCKS" ] || die no-movable-memory "no online block in ZONE_MOVABLE: boot with movablecore= (launch --movable SIZE)"
    # A block the kernel will not offline at all (one holding firmware-
    # reserved pages, as the top of RAM does) fails at once, without an
    # isolation test: tried once here, outside the loop, and left out.
    usable= refused=
    for b in $(echo "$MOVABLE_BLOCKS" | tr , ' '); do
        if echo offline > $M/memory$b/state 2>/dev/null; then
            echo online_movable > $M/memory$b/state 2>/dev/null ||
                die online-failed "memory block $b did not come back online"
            usable="$usable${usable:+,}$b"
        else
            refused="$refused${refused:+,}$b"
        fi
    done
    echo "VB offline_blocks usable=${usable:-none} refused=${refused:-none}"
    [ -n "$usable" ] || die no-offlinable-memory "no movable block could be offlined: ${refused}"
    sleep "$SETTLE"
    loop_begin offline
    blocks=$(echo "$usable" | tr , ' ')
    while :; do
        for b in $blocks; do
            read -r up _ < /proc/uptime
            [ $(( ${up%.*} * 100 + 1${up#*.} - 100 )) -lt "$END" ] || break 2
            ATTEMPTS=$((ATTEMPTS + 1))
            echo "vb_try=$ATTEMPTS block=$b" > $MARK
            if echo offline > $M/memory$b/state 2>/dev/null; then got=1; else got=0; fi
            echo "vb_got=$ATTEMPTS n=$got" > $MARK
            if [ "$got" = 1 ]; then
                echo online_movable > $M/memory$b/state 2>/dev/null ||
                    die online-failed "memory block $b did not come back online"
            else
                FAILURES=$((FAILURES + 1))
            fi
        done
    done
    echo "vb_loop=end" > $MARK
    echo "VB gigantic_loop=end t=$(vbt) attempts=$ATTEMPTS failures=$FAILURES"
}

# vmem_loop: the host plugs and unplugs (launch's vmem steps); the guest
# only keeps the loop's markers, so the isolation tests of virtio-mem's
# alloc_contig_range() calls land between them on ftrace's clock. The
# host maps its times onto the guest's through the loop's start line
# (/proc/uptime is CLOCK_BOOTTIME: the monotonic clock in a guest that
# never suspends).
vmem_loop() {
    zones_line
    sleep "$SETTLE"
    loop_begin vmem
    sleep "$DURATION"
    echo "vb_loop=end" > $MARK
    echo "VB gigantic_loop=end t=$(vbt) attempts=0 failures=0"
}

# ------------------------------------------------------ classic balloon
# wait_memfree CMP KIB: until MemFree is below (lt) or above (gt) KIB, for
# at most DURATION seconds; 1 on timeout.
wait_memfree() {
    waited=0
    while :; do
        free=$(memfree)
        if [ "$1" = lt ] && [ "$free" -lt "$2" ]; then return 0; fi
        if [ "$1" = gt ] && [ "$free" -gt "$2" ]; then return 0; fi
        [ "$waited" -ge $((DURATION * 4)) ] && return 1
        sleep 0.25
        waited=$((waited + 1))
    done
}
phase() { echo "VB balloon_phase=$1 t=$(vbt) memfree_kib=$(memfree)${2:+ $2}"; }
balloon_steps() {
    mount -t tmpfs -o size=$((SIZE + OOM + 1024))m tmpfs /fill || die mount-fill
    out=$(dd if=/dev/zero of=/fill/data bs=1M count="$SIZE" 2>&1) || die fill "$out"
    rm -f /fill/data
    phase populated "mib=$SIZE"
    sleep 1
    ready=$(memfree)
    phase ready "balloon_mib=$BALLOON oom_mib=$OOM"
    # The balloon takes its pages from the free lists: MemFree falls by them.
    wait_memfree lt $((ready - BALLOON * 1024 * 9 / 10)) ||
        die balloon-not-inflated "MemFree still $(memfree) KiB after ${DURATION}s (was $ready)"
    inflated=$(memfree)
    phase inflated
    if [ "$OOM" != 0 ]; then
        sleep "$PAUSE"   # the host measures its memory meanwhile
        want=$(( $(memfree) / 1024 + OOM ))
        if out=$(dd if=/dev/zero of=/fill/data bs=1M count="$want" 2>&1); then ok=1; else ok=0; fi
        phase oom_filled "mib=$want ok=$ok"
        rm -f /fill/data
    fi
    # Deflated: MemFree is back up by most of the balloon (the kernel's own
    # caches take some of what comes back, more in a bigger guest).
    wait_memfree gt $((inflated + BALLOON * 1024 * 3 / 4)) ||
        die balloon-not-deflated "MemFree still $(memfree) KiB after ${DURATION}s (inflated: $inflated)"
    phase deflated
    if out=$(dd if=/dev/zero of=/fill/data bs=1M count="$SIZE" 2>&1); then ok=1; else ok=0; fi
    rm -f /fill/data
    phase refilled "mib=$SIZE ok=$ok"
}

# ----------------------------------------------------- written patterns
# One 1 MiB pattern per round, naming the round, made once (/pat/pR) and
# copied into each file written in that round; a file is checked against
# the pattern of the round that wrote it, so a page that reads zero (a
# discard of memory that was not reported), or holds an earlier round's
# data, is counted. Files written in round R are kept through round R+1
# and freed in round R+2, so only two patterns are needed at a time.
uptime_s() { read -r up _ < /proc/uptime; echo "${up%.*}"; }
make_pattern() {
    yes "vb-pattern round=$1 ........................................................" |
        head -c 1048576 > /pat/p$1 || die pattern-write "round $1"
}
CHECKED=0 CORRUPTED=0
# check_file I: compare /fill/fI with the pattern of the round that wrote it.
check_file() {
    eval "gen=\$g$1"
    CHECKED=$((CHECKED + 1))
    cmp -s /pat/p$gen /fill/f$1 && return 0
    # Pages with any byte changed (a short file counts its missing pages).
    pages=$(cmp -l /pat/p$gen /fill/f$1 2>/dev/null |
        awk '{ k = int(($1 - 1) / 4096); if (!(k in seen)) { seen[k] = 1; n++ } } END { print n + 0 }')
    size=$(wc -c < /fill/f$1)
    missing=$(( (1048576 - size + 4095) / 4096 ))
    [ "$missing" -gt 0 ] || missing=0
    CORRUPTED=$((CORRUPTED + pages + missing))
    echo "VB pattern_bad file=$1 round=$gen pages=$((pages + missing))"
}
pattern_rounds() {
    mkdir -p /pat
    mount -t tmpfs -o size=$((SIZE + 8))m tmpfs /fill || die mount-fill
    mount -t tmpfs -o size=8m tmpfs /pat || die mount-pat
    make_pattern 0
    i=1
    while [ "$i" -le "$SIZE" ]; do
        cp /pat/p0 /fill/f$i || die pattern-write "file $i round 0"; eval "g$i=0"; i=$((i + 1))
    done
    end=$(( $(uptime_s) + DURATION ))
    r=0
    while [ "$r" -eq 0 ] || [ "$(uptime_s)" -lt "$end" ]; do
        r=$((r + 1))
        before=$CHECKED bad=$CORRUPTED
        make_pattern $r
        # Free one half: the second in odd rounds, the first in even rounds.
        # Halves, not every other file: files written one after another sit
        # side by side in memory, and only whole free 2 MiB blocks are reported.
        half=$(( SIZE / 2 ))
        if [ $((r % 2)) = 1 ]; then lo=$((half + 1)) hi=$SIZE klo=1 khi=$half
        else lo=1 hi=$half klo=$((half + 1)) khi=$SIZE; fi
        i=$lo; freed=0
        while [ "$i" -le "$hi" ]; do rm -f /fill/f$i; i=$((i + 1)); freed=$((freed + 1)); done
        sleep "$PAUSE"   # page_reporting's 2 s delay, then the reports
        i=$klo
        while [ "$i" -le "$khi" ]; do check_file $i; i=$((i + 1)); done
        i=$lo
        while [ "$i" -le "$hi" ]; do
            cp /pat/p$r /fill/f$i || die pattern-write "file $i round $r"; eval "g$i=$r"; i=$((i + 1))
        done
        rm -f /pat/p$((r - 2))
        echo "VB pattern_round=$r freed_mib=$freed checked_mib=$((CHECKED - before)) corrupted_pages=$((CORRUPTED - bad)) t=$(vbt) memfree_kib=$(memfree)"
    done
    sleep "$PAUSE"
    i=1
    while [ "$i" -le "$SIZE" ]; do check_file $i; i=$((i + 1)); done
    echo "VB pattern rounds=$r files=$SIZE checked_mib=$CHECKED corrupted_pages=$CORRUPTED"
}

case $WORKLOAD in
    fill) fill_rounds ;;
    gigantic) gigantic_loop ;;
    offline) offline_loop ;;
    vmem) vmem_loop ;;
    balloon) balloon_steps ;;
    pattern) pattern_rounds ;;
esac

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
    # Events and trace_marker writes come as comments, stamped when written:
    #   124.000001 |   0)               |  /* vb_try=7 */
    #   124.000002 |   0)               |  /* test_pages_isolated: start_pfn=0x40000 end_pfn=0x80000 fin_pfn=0x40400 ret=fail */
    awk -v workload="$WORKLOAD" -v attempts="$ATTEMPTS" -v failures="$FAILURES" '
    /^#/ { next }
    {
        n = split($0, f, "|")
        if (n < 3) next
        t = f[1] + 0
        if (match(f[2], /[0-9]+(\.[0-9]+)? us/)) {
            d = substr(f[2], RSTART, RLENGTH - 3) + 0
            cpu = f[2]; sub(/\).*/, "", cpu); gsub(/ /, "", cpu)
            if (f[3] ~ /}/) t = t - d / 1e6
            printf "VB report_us=%.3f t_start_mono=%.6f cpu=%s\n", d, t, cpu
            count++; total += d; if (d > max) max = d
            next
        }
        if (!match(f[3], /\/\* .* \*\//)) next
        text = substr(f[3], RSTART + 3, RLENGTH - 6)
        if (text ~ /^vb_loop=start/) t_start = t
        else if (text ~ /^vb_loop=end/) t_end = t
        else if (text ~ /^vb_try=/) {
            split(text, w, /[= ]/); i = w[2] + 0
            try_t[i] = t; last = i; if (i > tries) tries = i
            if (w[3] == "block") block[i] = w[4]
        }
        else if (text ~ /^vb_got=/) {
            split(text, w, /[= ]/); i = w[2] + 0
            got_t[i] = t; got[i] = w[4]
        } else if (text ~ /^vb_fill=/) {
            split(text, w, /[= ]/); r = w[2] + 0
            if (w[3] == "start") fill_start[r] = t; else fill_end[r] = t
            if (r > fills) fills = r
        } else if (text ~ /^test_pages_isolated: /) {
            events++
            ev[events] = sprintf("t_mono=%.6f %s attempt=%d", t, substr(text, 22), last)
            if (text ~ /ret=fail/) { isolation_failures++; test[last] = "fail"; fails[last]++ }
            else if (test[last] == "") test[last] = "success"
        }
    }
    END {
        printf "VB reports=%d report_us_total=%.3f report_us_max=%.3f\n", count, total, max
        for (r = 1; r <= fills; r++)
            if ((r in fill_start) && (r in fill_end))
                printf "VB fill_round=%d fill_us=%.1f\n", r, (fill_end[r] - fill_start[r]) * 1e6
        if (workload != "gigantic" && workload != "offline" && workload != "vmem") exit
        for (i = 1; i <= tries; i++)
            printf "VB gigantic_attempt i=%d t_mono=%.6f t_end_mono=%s ok=%s test=%s retries=%d%s\n", i, try_t[i],
                (i in got_t) ? sprintf("%.6f", got_t[i]) : "none", (got[i] == "1") ? 1 : 0,
                (test[i] == "") ? "none" : test[i], fails[i] + 0,
                (i in block) ? " block=" block[i] : ""
        for (e = 1; e <= events; e++) print "VB gigantic_event " ev[e]
        printf "VB gigantic attempts=%d failures=%d isolation_failures=%d events=%d t_start_mono=%.6f t_end_mono=%.6f\n",
            attempts, failures, isolation_failures, events, t_start, t_end
    }
    ' $T/trace
    overrun=$(cat $T/per_cpu/cpu*/stats 2>/dev/null | awk '/^overrun:/ { s += $2 } END { print s + 0 }')
    echo "VB ftrace_overrun=$overrun"
elif [ "$WORKLOAD" = gigantic ] || [ "$WORKLOAD" = offline ] || [ "$WORKLOAD" = vmem ]; then
    echo "VB gigantic attempts=$ATTEMPTS failures=$FAILURES"
fi

echo "VB done t=$(vbt)"
finish
