"""Turning a popped report chain into discard targets (the checks of invariant 1).

An entry is discarded only if it is device-writable, fully inside one
region, and aligned (start and length) to that region's discard granularity.
Anything else is skipped and counted, never partially discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backend.discard import DiscardTarget
from backend.mapping import FileIdentity, MemoryMap
from protocol.errors import AddressError
from protocol.memory import Space
from protocol.virtqueue import Chain


@dataclass(slots=True)
class ReportPlan:
    ranges: list[tuple[int, int]] = field(default_factory=list)  # every writable entry
    targets: list[DiscardTarget] = field(default_factory=list)
    files: dict[FileIdentity, int] = field(default_factory=dict)  # identity -> an fd
    skipped_outside: int = 0
    skipped_unaligned: int = 0
    ignored_readable: int = 0

    @property
    def entries(self) -> int:
        return len(self.ranges)

    @property
    def reported_bytes(self) -> int:
        return sum(length for _, length in self.ranges)

    @property
    def skipped(self) -> int:
        return self.skipped_outside + self.skipped_unaligned


def plan_report(chain: Chain, memory_map: MemoryMap, *, discard: bool) -> ReportPlan:
    """Validate each entry of a report; with discard=False only count them."""
    plan = ReportPlan()
    plan.ignored_readable = len(chain.descriptors) - len(chain.writable)
    table = memory_map.memory.table if memory_map.regions else None
    for desc in chain.writable:
        plan.ranges.append((desc.addr, desc.length))
        if table is None or desc.length == 0:
            plan.skipped_outside += 1
            continue
        try:
            index, offset = table.find(desc.addr, desc.length, Space.GPA)
        except AddressError:
            plan.skipped_outside += 1
            continue
        mapped = memory_map.regions[index]
        file_offset = mapped.region.file_offset(offset)
        if file_offset % mapped.granularity or desc.length % mapped.granularity:
            plan.skipped_unaligned += 1
            continue
        if not discard:
            continue
        assert mapped.fd is not None
        plan.targets.append(
            DiscardTarget(
                desc.addr,
                desc.length,
                mapped.fd,
                file_offset,
                mapped.address + file_offset,
                mapped.identity,
            )
        )
        plan.files.setdefault(mapped.identity, mapped.fd)
    return plan
