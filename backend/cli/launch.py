"""`vhost-balloon launch` (the backend beside a real QEMU and Linux guest)
and `vhost-balloon setup-qemu` (provisioning what launch runs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from vhost_balloon.backend.cli.options import (
    UsageError,
    add_backend_options,
    add_latency_options,
    add_service_options,
    count,
    server_settings,
    size,
)
from vhost_balloon.backend.qemu import provisioning
from vhost_balloon.backend.qemu.command import (
    DEFAULT_VIRTIO_MEM_MIB,
    STUDY_WORKLOADS,
    WORKLOADS,
    LaunchOptions,
    check_qemu_option_values,
)
from vhost_balloon.backend.qemu.launch import Launch
from vhost_balloon.backend.qemu.provisioning import LaunchError
from vhost_balloon.backend.qemu.summary_table import format_launch_summary
from vhost_balloon.backend.server import ServerSettings
from vhost_balloon.backend.vhost.server import check_unix_path
from vhost_balloon.protocol.virtio import BALLOON_F_STATS_VQ

BALLOON_STATS_INTERVAL_S = 2.0


def add_parser(commands: Any) -> None:
    launch = commands.add_parser(
        "launch",
        help="the backend beside a real QEMU and Linux guest (qemu-configs/)",
        description="Start the backend and QEMU (through qemu-configs/run-guest.sh) with the "
        "project's test guest or your own kernel/initrd, stream the console with host "
        "timestamps, stop both when the guest powers off or on Ctrl-C, print a summary. "
        "Arguments after -- go to QEMU.",
    )
    launch.add_argument(
        "--json", action="store_true", help="print one JSON summary (console goes to stderr)"
    )
    add_backend_options(launch)
    add_latency_options(launch)
    add_service_options(launch)
    guest = launch.add_argument_group("guest and QEMU")
    guest.add_argument(
        "--workload",
        choices=WORKLOADS,
        help="fill: fill/free rounds; gigantic: allocate and free a 1 GiB page in a loop; "
        "offline: offline and online ZONE_MOVABLE memory blocks in a loop (--movable); "
        "balloon: inflate to --balloon SIZE and deflate back; pattern: --size 1 MiB files "
        "freed, checked page by page and written again for --duration s, with --pause s "
        "between (fill, or balloon with --balloon)",
    )
    guest.add_argument(
        "--balloon",
        type=size,
        metavar="SIZE",
        help="balloon workload: once the driver is up, set the guest's target memory size "
        "(as QMP balloon), wait for it, measure what QEMU gave back, then deflate",
    )
    guest.add_argument(
        "--balloon-oom",
        type=int,
        default=0,
        metavar="MIB",
        help="balloon workload: at the target, the guest fills MIB past its free memory, so "
        "deflate-on-oom must give pages back (0: no such step)",
    )
    guest.add_argument("--rounds", type=count, default=2, help="fill/free rounds (2)")
    guest.add_argument("--size", type=count, default=300, metavar="MIB", help="MiB/round (300)")
    guest.add_argument("--pause", type=int, default=5, metavar="S", help="wait after a free (5)")
    guest.add_argument(
        "--settle",
        type=int,
        metavar="S",
        help="fill: wait before the end (0); gigantic: wait before the loop (20)",
    )
    guest.add_argument(
        "--duration", type=count, default=30, metavar="S", help="gigantic: loop length (30)"
    )
    guest.add_argument("--mem", metavar="SIZE", help="guest RAM (fill 512M, gigantic 2560M)")
    guest.add_argument(
        "--movable",
        metavar="SIZE",
        help="boot with movablecore=SIZE: the top SIZE of guest RAM in ZONE_MOVABLE "
        "(offline: 1536M unless given; gigantic: the review's 'even on MOVABLE memory')",
    )
    guest.add_argument(
        "--virtio-mem",
        type=count,
        metavar="MIB",
        help="also a virtio-mem-pci device of MIB MiB, shared memfd, none plugged (vmem: 1024)",
    )
    guest.add_argument(
        "--vmem-size",
        type=size,
        metavar="SIZE",
        help="vmem: what each cycle plugs and then unplugs through QMP (default: the whole device)",
    )
    guest.add_argument(
        "--vmem-pause",
        type=float,
        default=2.5,
        metavar="S",
        help="vmem: from a plug's end to the unplug request (2.5: inside the next reporting pass)",
    )
    guest.add_argument("--kernel", type=Path, metavar="FILE", help="your own guest kernel")
    guest.add_argument("--initrd", type=Path, metavar="FILE", help="your own initrd")
    guest.add_argument(
        "--append",
        metavar="STR",
        help="more kernel command line (gigantic: 'nokaslr init_on_alloc=0' unless given)",
    )
    guest.add_argument(
        "--baseline",
        action="store_true",
        help="QEMU's built-in virtio-balloon-pci,free-page-reporting=on instead of the backend",
    )
    guest.add_argument(
        "--no-balloon",
        action="store_true",
        help="no balloon device (the control of gigantic, offline, vmem, fill; no backend)",
    )
    guest.add_argument("--console-log", type=Path, metavar="FILE", help="also write it here")
    guest.add_argument("--timeout", type=count, default=900, metavar="S", help="kill QEMU after")
    guest.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto")
    guest.add_argument(
        "--mem-path", type=Path, metavar="DIR", help="guest RAM in a file in DIR (hugetlbfs)"
    )
    guest.add_argument(
        "--share", choices=("on", "off"), default="on", help="off: see QEMU's error only"
    )
    guest.add_argument("--qemu", metavar="BIN", help="another QEMU than the provisioned one")
    guest.add_argument(
        "--qmp",
        type=Path,
        metavar="PATH",
        help="a QMP socket for you while the guest runs (default: launch-PID.qmp in the "
        "run directory; launch uses a monitor of its own)",
    )
    guest.add_argument(
        "--socket-path", type=Path, help="the backend's socket (default VB_RUN_DIR/launch-PID.sock)"
    )
    launch.add_argument("qemu_args", nargs="*", metavar="-- QEMU_ARG", help=argparse.SUPPRESS)


def add_setup_parser(commands: Any) -> None:
    setup = commands.add_parser(
        "setup-qemu", help="provision QEMU >= 10.2, the guest kernel and busybox (cached; root)"
    )
    setup.add_argument("--refresh", action="store_true", help="redo every step")


def default_args() -> argparse.Namespace:
    """`vhost-balloon launch` as parsed with no option given."""
    parser = argparse.ArgumentParser(prog="vhost-balloon")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["launch"])


def run(args: argparse.Namespace) -> int:
    return asyncio.run(launch(args))


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    """The launch options in args, checked against each other."""
    if args.mem_path is not None and not args.mem_path.is_dir():
        raise UsageError(f"--mem-path {args.mem_path} is not a directory")
    if args.baseline and args.no_balloon:
        raise UsageError("--baseline and --no-balloon exclude each other")
    if args.no_balloon and args.workload not in STUDY_WORKLOADS:
        raise UsageError("--no-balloon is a control for --workload gigantic, offline, vmem or fill")
    if not 0 <= args.vmem_pause <= 3600:
        raise UsageError(f"--vmem-pause takes seconds from 0 to 3600, not {args.vmem_pause}")
    if args.vmem_size is not None and (args.vmem_size <= 0 or args.vmem_size % (2 << 20)):
        raise UsageError("--vmem-size must be a multiple of 2M (virtio-mem's block size), above 0")
    if args.virtio_mem is not None and args.virtio_mem % 2:
        raise UsageError(
            f"--virtio-mem takes an even number of MiB (2 MiB blocks), not {args.virtio_mem}"
        )
    if args.settle is not None and args.settle < 0:
        raise UsageError(f"--settle takes seconds >= 0, not {args.settle}")
    workload = args.workload or ("balloon" if args.balloon is not None else "fill")
    if workload == "balloon" and args.balloon is None:
        raise UsageError("--workload balloon needs --balloon SIZE (the target)")
    if args.balloon is not None and workload != "balloon":
        raise UsageError(f"--balloon is for the balloon workload, not --workload {workload}")
    if args.balloon_oom < 0:
        raise UsageError(f"--balloon-oom takes MiB >= 0, not {args.balloon_oom}")
    if args.balloon_oom and workload != "balloon":
        raise UsageError("--balloon-oom is for the balloon workload")
    if workload == "balloon" and args.no_balloon:
        raise UsageError("the balloon workload needs a balloon device")
    if args.vmem_size is not None and workload != "vmem":
        raise UsageError(f"--vmem-size is for the vmem workload, not --workload {workload}")
    device_mib = args.virtio_mem if args.virtio_mem is not None else DEFAULT_VIRTIO_MEM_MIB
    if args.vmem_size is not None and args.vmem_size > device_mib << 20:
        raise UsageError(
            f"--vmem-size {args.vmem_size >> 20}M exceeds the {device_mib} MiB virtio-mem device"
        )
    options = LaunchOptions(
        workload=workload,
        rounds=args.rounds,
        size_mib=args.size,
        pause_s=args.pause,
        settle_s=args.settle,
        duration_s=args.duration,
        mem=args.mem,
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        baseline=args.baseline,
        no_balloon=args.no_balloon,
        console_log=args.console_log,
        timeout_s=args.timeout,
        accel=args.accel,
        mem_path=args.mem_path,
        share=args.share,
        qemu=args.qemu,
        socket_path=args.socket_path,
        qemu_args=tuple(a for a in args.qemu_args if a != "--"),
        console_to_stderr=args.json,
        balloon_target=args.balloon,
        oom_mib=args.balloon_oom,
        qmp_socket=args.qmp,
        movable=args.movable,
        virtio_mem_mib=args.virtio_mem,
        vmem_size=args.vmem_size,
        vmem_pause_s=args.vmem_pause,
    )
    try:  # before provisioning and QEMU: a user's mistake is found at once
        check_qemu_option_values(options)
    except LaunchError as error:
        raise UsageError(str(error)) from None
    if options.balloon_target is not None:
        ram = options.guest_ram_bytes
        if not 0 < options.balloon_target < ram:
            raise UsageError(
                f"--balloon {options.balloon_target >> 20} MiB is not between 0 and the "
                f"guest's RAM ({ram >> 20} MiB)"
            )
        if options.balloon_target % 4096 or ram % 4096:
            # num_pages counts 4 KiB pages: such a target can never be reached exactly.
            raise UsageError(
                f"--balloon {options.balloon_target}: not a whole number of 4 KiB pages"
            )
    return options


async def launch(args: argparse.Namespace) -> int:
    options = launch_options(args)
    if args.control_socket is not None:  # else bind() says only "AF_UNIX path too long"
        check_unix_path(args.control_socket)
    settings = None if args.baseline or args.no_balloon else server_settings(args)
    if settings is not None and options.workload == "balloon":
        settings = with_balloon_stats(settings)

    def note(text: str) -> None:
        print(f"launch: {text}", file=sys.stderr, flush=True)

    run = Launch(options, settings, note, sys.stderr if args.json else sys.stdout)
    try:
        summary = await run.run()
    except LaunchError as error:
        raise UsageError(str(error)) from None
    failure = run.failure()
    if failure is not None:
        summary["error"] = failure
    print(json.dumps(summary, indent=2) if args.json else format_launch_summary(summary))
    if failure is not None:
        raise UsageError(failure)
    return 130 if run.interrupted else 0


def with_balloon_stats(settings: ServerSettings) -> ServerSettings:
    """The balloon workload reports the guest's stats: offer the stats queue,
    and poll it every BALLOON_STATS_INTERVAL_S unless an interval was given."""
    balloon = settings.balloon
    interval = balloon.stats_interval_s or BALLOON_STATS_INTERVAL_S
    features = balloon.features | 1 << BALLOON_F_STATS_VQ
    return replace(settings, balloon=replace(balloon, features=features, stats_interval_s=interval))


def run_setup(args: argparse.Namespace) -> int:
    script = provisioning.configs_dir() / "provision.sh"
    failure = provisioning.run_provision(script, *(["--refresh"] if args.refresh else []))
    if failure is not None:
        raise UsageError(failure)
    print(provisioning.cache_dir() / "env.sh")
    return 0
