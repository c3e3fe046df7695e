"""What a launch is asked for (LaunchOptions) and the run-guest.sh command
line that asks qemu-configs/run-guest.sh for it.

run-guest.sh builds the initramfs, picks the accelerator and writes QEMU's
command line; the balloon device is the backend's socket (default), QEMU's
built-in device (`baseline`), or none (`no_balloon`, a control for the
study's workloads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vhost_balloon.backend.balloon.features import OFFERED_FEATURES
from vhost_balloon.backend.qemu.provisioning import LaunchError, configs_dir
from vhost_balloon.protocol.units import parse_guest_memory
from vhost_balloon.protocol.virtio import balloon_queues

WORKLOADS = ("fill", "gigantic", "offline", "vmem", "balloon", "pattern")
# The loops of contiguous-range attempts: a summary each, same keys.
RANGE_LOOPS = ("gigantic", "offline")
# The workloads that run for --duration after --settle, with isolation tests traced.
TIMED_LOOPS = (*RANGE_LOOPS, "vmem")
# The workloads of the study (experiment specs), each with its controls: no
# balloon device and QEMU's built-in one. fill is the price of reporting.
STUDY_WORKLOADS = (*TIMED_LOOPS, "fill")
DEFAULT_VIRTIO_MEM_MIB = 1024  # vmem: the virtio-mem device's size
DEFAULT_MOVABLE = {"offline": "1536M"}  # movablecore= of a workload that needs ZONE_MOVABLE
# Per workload: guest RAM and kernel command line when the user gives none.
# The gigantic workload needs a 1 GiB-aligned range that is all RAM (2560M
# leaves GPA 1-2 GiB), the kernel image out of it (nokaslr), and no zeroing
# of the whole 1 GiB on every allocation (init_on_alloc=0: 2.5-4 s per
# attempt under TCG otherwise). See docs/qemu.md.
DEFAULT_MEM = {
    "fill": "512M",
    "gigantic": "2560M",
    "offline": "2560M",
    "vmem": "1024M",
    "balloon": "512M",
    "pattern": "512M",
}
DEFAULT_APPEND = {
    "fill": "",
    "gigantic": "nokaslr init_on_alloc=0",
    "offline": "nokaslr init_on_alloc=0",
    # Hotplugged memory goes to ZONE_MOVABLE, as virtio-mem's docs advise for unplug.
    "vmem": "init_on_alloc=0 memhp_default_state=online_movable",
    "balloon": "init_on_alloc=0",
    "pattern": "",
}
# What QEMU's -m and size= take: a number and an optional unit (qemu_strtosz).
# What the kernel's movablecore= takes (memparse, or a percentage of memory).
MOVABLECORE = re.compile(r"[1-9][0-9]*[KMG]?|[1-9][0-9]?%")
_QEMU_SIZE = re.compile(r"[0-9]+(\.[0-9]+)?[BKMGTPEbkmgtpe]?")


@dataclass(frozen=True, slots=True)
class LaunchOptions:
    """None for settle_s, mem and append means the workload's default
    (settle: the guest's, 0 for fill and 20 for gigantic; DEFAULT_MEM,
    DEFAULT_APPEND); an append given replaces the workload's default."""

    workload: str = "fill"
    rounds: int = 2
    size_mib: int = 300
    pause_s: int = 5
    settle_s: int | None = None
    duration_s: int = 30
    mem: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    baseline: bool = False
    no_balloon: bool = False
    console_log: Path | None = None
    timeout_s: int = 900
    accel: str = "auto"
    mem_path: Path | None = None
    share: str = "on"
    qemu: str | None = None
    socket_path: Path | None = None
    qemu_args: tuple[str, ...] = ()
    console_to_stderr: bool = False
    balloon_target: int | None = None  # balloon workload: the guest's target size, bytes
    oom_mib: int = 0  # balloon workload: fill this much past free memory (deflate-on-oom)
    qmp_socket: Path | None = None  # the user's QMP socket (default: in VB_RUN_DIR)
    movable: str | None = None  # movablecore= for the guest (offline's default: 1536M)
    virtio_mem_mib: int | None = None  # a virtio-mem device of this size (vmem's default: 1024)
    vmem_size: int | None = None  # vmem: bytes plugged and unplugged per cycle (default: all)
    vmem_pause_s: float = 2.5  # vmem: from a plug's end to the unplug request

    @property
    def guest_ram_bytes(self) -> int:
        """--mem in bytes, as QEMU reads -m: MiB without a unit, fractions allowed."""
        text = self.guest_mem
        unit = text[-1:].upper()
        scale = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        if unit in scale:
            return int(float(text[:-1]) * scale[unit])
        return int(float(text) * (1 << 20))

    @property
    def balloon_bytes(self) -> int:
        """What the balloon takes: guest RAM - the target."""
        if self.balloon_target is None:
            return 0
        return max(0, self.guest_ram_bytes - self.balloon_target)

    @property
    def guest_mem(self) -> str:
        return self.mem if self.mem is not None else DEFAULT_MEM[self.workload]

    @property
    def kernel_append(self) -> str:
        return self.append if self.append is not None else DEFAULT_APPEND[self.workload]

    @property
    def virtio_mem(self) -> int | None:
        if self.virtio_mem_mib is not None:
            return self.virtio_mem_mib
        return DEFAULT_VIRTIO_MEM_MIB if self.workload == "vmem" else None

    @property
    def movablecore(self) -> str | None:
        return self.movable if self.movable is not None else DEFAULT_MOVABLE.get(self.workload)

    @property
    def mode(self) -> str:
        if self.no_balloon:
            return "none"
        return "builtin" if self.baseline else "vhost-user"


def qemu_option(value: object) -> str:
    """A value inside a QEMU option list: QEMU reads ',,' as a literal comma."""
    return str(value).replace(",", ",,")


def check_qemu_option_values(options: LaunchOptions) -> None:
    """Refuse a --mem that is not a plain size: run-guest.sh puts it in `-m MEM`
    and `size=MEM`, where anything after a ',' would be another option.
    (Paths are escaped there instead: QEMU reads ',,' as a literal comma.)"""
    if options.movable is not None and not MOVABLECORE.fullmatch(options.movable):
        raise LaunchError(
            f"--movable {options.movable!r} is not a size such as 1536M or 1G, or a percentage"
        )
    if options.mem is not None and not _QEMU_SIZE.fullmatch(options.mem):
        raise LaunchError(f"--mem {options.mem!r} is not a size such as 512M or 2G")
    if options.mem is not None and "." not in options.mem:  # QEMU takes 1.5G; we do not parse it
        try:
            parse_guest_memory(options.mem)
        except ValueError as error:
            raise LaunchError(f"--mem: {error}") from None


def run_guest_command(
    options: LaunchOptions, socket_path: Path | None, features: int = OFFERED_FEATURES
) -> list[str]:
    """`bash run-guest.sh ...` for these options: the backend's socket as the
    balloon device (or `--builtin` without one, `--no-balloon`), `features`
    the backend offers (they decide how many queues the device has), and
    the user's QEMU arguments last."""
    o = options
    command = [
        "bash",
        str(configs_dir() / "run-guest.sh"),
        "--workload",
        o.workload,
        "--rounds",
        str(o.rounds),
        "--size",
        str(o.size_mib),
        "--pause",
        str(o.pause_s),
        "--duration",
        str(o.duration_s),
        "--mem",
        o.guest_mem,
        "--accel",
        o.accel,
        "--timeout",
        str(o.timeout_s),
        "--share",
        o.share,
        # The guest driver creates one queue per offered feature that has one.
        "--num-vqs",
        str(balloon_queues(features).count),
    ]
    if o.settle_s is not None:
        command += ["--settle", str(o.settle_s)]
    append = o.kernel_append
    if o.workload == "balloon":
        # The guest waits for the host to inflate this much, then to deflate.
        balloon_mib = o.balloon_bytes >> 20
        append = f"{append} vb.balloon={balloon_mib} vb.oom={o.oom_mib}".strip()
    if o.movablecore is not None:
        # Gigantic pages may come from ZONE_MOVABLE only where the kernel has
        # vm.movable_gigantic_pages (not 6.12): the guest sets it if so.
        append = f"{append} movablecore={o.movablecore} vb.movable_gigantic=1".strip()
    if append:
        command += ["--append", append]
    for flag, value in (
        ("--virtio-mem", o.virtio_mem),
        ("--kernel", o.kernel),
        ("--initrd", o.initrd),
        ("--mem-path", o.mem_path),
        ("--qemu", o.qemu),
    ):
        if value is not None:
            command += [flag, str(value)]
    if o.no_balloon:
        command.append("--no-balloon")
    elif socket_path is None:
        command.append("--builtin")
    else:
        command.append(str(socket_path))
    return command + list(o.qemu_args)
