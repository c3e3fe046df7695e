"""The host's share of the price of reporting, at native speed.

Reporting hands freed guest memory to the host, which drops it
(punch-hole on the shared memfd, as the backend does). When the guest
allocates and touches that memory again, every page faults on the host and
is zeroed again. Under TCG the guest's own writes are emulated and dwarf
that cost (docs/results.md, section 7), so this measures it where nothing
is emulated: on this host, writing SIZE of a shared memfd that is

- populated (the memory the guest freed was not reported: the baseline);
- punched, as after a report (every page faults in and is zeroed again);

and prints the ratio, the price of reporting for a toucher that runs at
the host's own speed. A KVM guest pays this plus an EPT violation per
page, so this is the floor of its price, not its figure. Medians of
--runs repetitions, alternated.

    .venv/bin/python benchmarks/refault.py [--size-mib 128] [--runs 9]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time

from vhost_balloon.backend.libc import punch_hole

PAGE = 4096


def touch_ms(view: mmap.mmap, block: bytes) -> float:
    """Write the whole mapping (as dd writes its file), in block-sized copies."""
    start = time.perf_counter_ns()
    for offset in range(0, len(view), len(block)):
        view[offset : offset + len(block)] = block
    return (time.perf_counter_ns() - start) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=128, help="memory written per run (128)")
    parser.add_argument("--runs", type=int, default=9, help="repetitions of each (9)")
    args = parser.parse_args()
    if args.size_mib < 1 or args.runs < 1:
        parser.error("--size-mib and --runs take a number >= 1")
    size = args.size_mib << 20
    fd = os.memfd_create("vb-refault")
    try:
        os.ftruncate(fd, size)
        view = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        block = b"\x00" * (1 << 20)  # dd bs=1M if=/dev/zero
        touch_ms(view, block)  # populate once
        populated: list[float] = []
        refaulted: list[float] = []
        for _ in range(args.runs):
            populated.append(touch_ms(view, block))
            punch_hole(fd, 0, size)  # what the backend does with a report
            refaulted.append(touch_ms(view, block))
        view.close()
    finally:
        os.close(fd)
    base = statistics.median(populated)
    price = statistics.median(refaulted)
    pages = size // PAGE
    mib = args.size_mib
    print(f"write {mib} MiB of a shared memfd, medians of {args.runs} runs:")
    for name, ms in (("populated (not reported)", base), ("punched (reported)", price)):
        print(f"  {name:30s}  {ms:8.2f} ms  {mib / ms * 1e3:7.0f} MiB/s")
    print(f"  {'ratio':30s}  {price / base:8.3f}x")
    print(f"  {'per refaulted page':30s}  {(price - base) * 1e3 / pages:8.3f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
