"""Guest RAM on hugetlbfs (memory-backend-file, share=on): the backend
discards whole 2 MiB huge pages only, and the host gets them back.

The test reserves host huge pages itself (vm.nr_hugepages) and mounts a
hugetlbfs in a temporary directory under /tmp (which the chrooted QEMU
shares); both are restored afterwards.

A hugetlbfs file cannot be sealed; the backend holds only memfds to the
F_SEAL_SHRINK rule, so this runs without --allow-unsealed-memory.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MiB, guest_args, run_launch

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
GUEST_MEM_MIB = 512
HUGE_PAGE = 2 * MiB
SIZE_MIB = 200


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture
def hugetlbfs(provisioned: dict[str, str]) -> Iterator[Path]:
    before = int(NR_HUGEPAGES.read_text())
    want = before + GUEST_MEM_MIB * MiB // HUGE_PAGE + 16
    NR_HUGEPAGES.write_text(f"{want}\n")
    got = int(NR_HUGEPAGES.read_text())  # writing never fails; reading tells
    mount = Path(tempfile.mkdtemp(prefix="vb-hugetlbfs-", dir="/tmp"))
    mounted = False
    try:
        if got < want:
            pytest.fail(f"the host could reserve only {got - before} of {want - before} huge pages")
        subprocess.run(
            ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)], check=True
        )
        mounted = True
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()
        NR_HUGEPAGES.write_text(f"{before}\n")


def test_hugetlbfs_guest_ram_is_given_back(hugetlbfs: Path, tmp_path: Path) -> None:
    free_before = _meminfo("HugePages_Free")
    run = run_launch(
        tmp_path,
        "--mem",
        f"{GUEST_MEM_MIB}M",
        "--mem-path",
        str(hugetlbfs),
        *guest_args(rounds=1, size=SIZE_MIB, pause=5),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    print({k: summary[k] for k in ("reports", "entries", "freed_bytes", "memfd_freed")})
    assert summary["reports"] >= 1
    assert summary["backend"]["skipped_entries"] == 0
    for record in run.trace:
        for gpa, length in record["ranges"]:
            assert gpa % HUGE_PAGE == 0 and length % HUGE_PAGE == 0
    # Whole huge pages were given back: the backend's figure (hugetlbfs file
    # blocks) and QEMU's HugetlbPages both fell.
    assert summary["freed_bytes"] >= 0.8 * SIZE_MIB * MiB
    assert summary["freed_bytes"] % HUGE_PAGE == 0
    (item,) = summary["memfd_freed"]
    assert item["given_back_bytes"] >= 0.8 * SIZE_MIB * MiB, item
    assert summary["integrity_ok"] is True
    assert _meminfo("HugePages_Free") >= free_before - 1  # QEMU's file is gone


# Catches: inflation on hugetlbfs that frees nothing (a 4 KiB discard of a
# huge page frees nothing; QEMU's built-in device, which forgets a partial
# huge page at the end of each 1 MiB chain, frees nothing here at all), or
# that punches a huge page while part of it is still the guest's.
def test_hugetlbfs_inflation_frees_whole_huge_pages(hugetlbfs: Path, tmp_path: Path) -> None:
    run = run_launch(
        tmp_path,
        "--balloon",
        "384M",
        "--size",
        "400",
        "--features=-reporting",
        "--mem",
        f"{GUEST_MEM_MIB}M",
        "--mem-path",
        str(hugetlbfs),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    balloon = run.summary["balloon"]
    print({k: v for k, v in balloon.items() if k != "guest_stats"})
    assert balloon["error"] is None and balloon["refill_ok"] is True
    freed = balloon["backend"]["inflate_freed_bytes"]
    assert freed >= 64 * MiB and freed % HUGE_PAGE == 0
    assert balloon["qemu_shared_drop_bytes"] >= 0.9 * freed
    assert balloon["backend"]["partial_huge_pages"] == 0  # all deflated again
    assert run.summary["integrity_ok"] is True
