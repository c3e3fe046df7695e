"""How mmap_lock contention in the backend process stretches each discard.

A 64 MiB memfd is mapped MAP_SHARED in this process and populated (as guest
RAM the backend has touched). Each round times discarding all of it in
32 x 2 MiB calls (a report's shape), with:
  madv-dontneed  madvise(MADV_DONTNEED) on the mapping (this process's
                 mmap_lock for read; recent kernels take only the VMA's lock);
  madv-remove    madvise(MADV_REMOVE) on the mapping (mmap_lock for read);
  punch-hole     fallocate(PUNCH_HOLE) on the fd: no mmap_lock of ours, so it
                 is the control -- it slows down only through what every
                 discard shares with the churn (CPUs, the page allocator,
                 memory bandwidth), not through the lock.
while `MmapContention` runs 0, 1, 2 and 4 threads (mmap / MADV_POPULATE_WRITE
/ mprotect / munmap loops). A run measures every thread count back to back;
each figure is the median of the rounds in that run, each ratio is against
the 0-thread baseline of the SAME run, and the table prints the median over
runs. Times include the GIL re-acquisition after each call, as the backend's
worker thread pays it too. Compare the madvise ratios with punch-hole's: the
excess is lock contention. A full run takes a few minutes (populating 64 MiB
per contention iteration is slow on small VMs).

    .venv/bin/python benchmarks/mmap_contention.py [--runs 5] [--rounds 10]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from collections.abc import Callable

from vhost_balloon.backend.latency.contention import MmapContention, parse_mmap_contention
from vhost_balloon.backend.libc import (
    MADV_DONTNEED,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    buffer_address,
    madvise,
    punch_hole,
)

MiB = 1 << 20
REGION = 64 * MiB
CHUNK = 2 * MiB
METHODS = ("madv-dontneed", "madv-remove", "punch-hole")


class Region:
    """A populated MAP_SHARED memfd region, discarded one way or another."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("contention-bench", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, REGION)
        self.mapping = mmap.mmap(self.fd, REGION)
        self.address = buffer_address(self.mapping)

    def populate(self) -> None:
        try:  # releases the GIL, unlike a Python-level write of 64 MiB
            madvise(self.address, REGION, MADV_POPULATE_WRITE)
        except OSError:  # kernel < 5.14
            self.mapping[:] = b"\xa5" * REGION

    def discard_us(self, method: str) -> float:
        calls: dict[str, Callable[[int], None]] = {
            "madv-dontneed": lambda off: madvise(self.address + off, CHUNK, MADV_DONTNEED),
            "madv-remove": lambda off: madvise(self.address + off, CHUNK, MADV_REMOVE),
            "punch-hole": lambda off: punch_hole(self.fd, off, CHUNK),
        }
        call = calls[method]
        begin = time.perf_counter_ns()
        for offset in range(0, REGION, CHUNK):
            call(offset)
        return (time.perf_counter_ns() - begin) / 1000

    def close(self) -> None:
        self.mapping.close()
        os.close(self.fd)


def measure(region: Region, threads: int, rounds: int, size: str) -> tuple[dict[str, float], float]:
    """Median discard time per method with `threads` contention threads; churn/s."""
    contention = None
    if threads:
        contention = MmapContention(parse_mmap_contention(f"{threads},size={size}"))
        contention.start()
        time.sleep(0.05)  # let every thread reach its loop
    samples: dict[str, list[float]] = {method: [] for method in METHODS}
    begin, before = time.monotonic(), contention.iterations if contention else 0
    try:
        for _ in range(rounds):
            for method in METHODS:  # interleaved, so drift hits all alike
                region.populate()
                samples[method].append(region.discard_us(method))
    finally:
        churn = 0.0
        if contention is not None:
            churn = (contention.iterations - before) / (time.monotonic() - begin)
            contention.stop()
    return {method: statistics.median(values) for method, values in samples.items()}, churn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per thread count")
    parser.add_argument("--threads", default="0,1,2,4", help="contention thread counts")
    parser.add_argument("--size", default="64M", help="each contention thread's mapping")
    args = parser.parse_args()
    counts = [int(text) for text in args.threads.split(",")]
    if counts[0] != 0:
        counts.insert(0, 0)  # every ratio needs its same-run baseline

    times: dict[tuple[int, str], list[float]] = {}
    ratios: dict[tuple[int, str], list[float]] = {}
    churns: dict[int, list[float]] = {}
    region = Region()
    try:
        for run in range(args.runs):
            baseline: dict[str, float] = {}
            for threads in counts:
                medians, churn = measure(region, threads, args.rounds, args.size)
                baseline = baseline or medians
                churns.setdefault(threads, []).append(churn)
                for method, value in medians.items():
                    times.setdefault((threads, method), []).append(value)
                    ratios.setdefault((threads, method), []).append(value / baseline[method])
            print(f"run {run + 1}/{args.runs} done", flush=True)
    finally:
        region.close()

    print(
        f"\n{os.cpu_count()} CPUs, {os.uname().release}; discard of a populated 64 MiB "
        f"MAP_SHARED memfd in 32 x 2 MiB calls; contention mappings {args.size} per thread;"
        f"\nmedian of {args.runs} runs (each the median of {args.rounds} rounds); "
        "ratio = vs 0 threads in the same run\n"
    )
    header = f"{'threads':>7} {'churn/s':>8}"
    for method in METHODS:
        header += f" {method + ' us':>17} {'ratio':>6}"
    print(header)
    for threads in counts:
        line = f"{threads:>7} {statistics.median(churns[threads]):>8.0f}"
        for method in METHODS:
            time_us = statistics.median(times[threads, method])
            ratio = statistics.median(ratios[threads, method])
            line += f" {time_us:>17.0f} {ratio:>6.2f}"
        print(line)


if __name__ == "__main__":
    main()
