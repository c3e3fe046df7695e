"""What the device records of every report it published (invariant 5).

Every timestamp is time.monotonic_ns(), the same clock in every process on
the host, so records can be matched against the guest's and QEMU's views.
The device hands each record to its hooks; observe/ writes and counts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any


def hold_window_ns(t_kick_ns: int, t_published_ns: int, t_notified_ns: int) -> int | None:
    """A report's hold window as the backend measures it: from the kick it
    was seen at to the notification, or to the publish when no notification
    was sent (kick-to-notify). None when the kick or that end is missing (0):
    no window to measure. Takes a record's fields or a trace line's."""
    end_ns = t_notified_ns or t_published_ns
    if not t_kick_ns or not end_ns:
        return None
    return end_ns - t_kick_ns


@dataclass(slots=True)
class ReportRecord:
    """Not changed once handed to the hooks: the trace serialises it later,
    on its writer thread."""

    session: str
    queue: int
    seq: int
    head: int
    entries: int
    bytes: int
    ranges: list[tuple[int, int]]
    discard: str
    t_kick_ns: int
    t_popped_ns: int
    t_start_ns: int = 0  # this report's turn began (after a kick delay or earlier reports)
    t_discard_start_ns: int = 0
    t_discard_done_ns: int = 0
    t_published_ns: int = 0
    t_notified_ns: int = 0  # 0 when no notification was sent
    discard_syscall_ns: int = 0
    discarded_entries: int = 0
    freed_bytes: int = 0
    skipped_outside: int = 0
    skipped_unaligned: int = 0
    poison_ack: bool = False
    injected_ns: dict[str, int] = field(default_factory=dict)  # measured, per point
    bql_wait_ns: dict[str, int] = field(default_factory=dict)  # per BQL phase
    settings: dict[str, Any] = field(default_factory=dict)  # LatencySettings in force
    errors: list[str] = field(default_factory=list)

    @property
    def kick_to_notify_ns(self) -> int | None:
        """This report's hold window (hold_window_ns)."""
        return hold_window_ns(self.t_kick_ns, self.t_published_ns, self.t_notified_ns)

    def to_json(self) -> str:
        # The fields' own values, not asdict()'s deep copy (7x slower): json
        # writes tuples as lists either way, so the line is the same.
        line = {"kind": "report"} | {name: getattr(self, name) for name in _FIELDS}
        return json.dumps(line, separators=(",", ":"))


_FIELDS = tuple(item.name for item in fields(ReportRecord))


@dataclass(slots=True)
class BalloonRecord:
    """One inflate or deflate chain, as it was handled and published: traced
    with the same timestamps as a report (kick to notify is the time the
    guest's balloon step took the host), under its own kind."""

    kind: str  # "inflate" or "deflate"
    session: str
    queue: int
    seq: int  # per kind
    head: int
    pfns: int  # in the chain
    pages: int  # newly ballooned (inflate) or given back (deflate)
    ranges: list[tuple[int, int]]  # those pages, coalesced (gpa, bytes), the first 64
    discard: str
    t_kick_ns: int
    t_popped_ns: int
    t_start_ns: int = 0
    t_discard_start_ns: int = 0
    t_discard_done_ns: int = 0
    t_published_ns: int = 0
    t_notified_ns: int = 0
    discard_syscall_ns: int = 0
    discarded_entries: int = 0  # discard syscalls' ranges
    freed_bytes: int = 0
    skipped_outside: int = 0  # PFNs outside guest RAM
    skipped_unaligned: int = 0  # PFNs in a region not page-aligned in its file
    duplicates: int = 0  # repeated in the chain, or already ballooned
    unknown: int = 0  # deflated, never inflated
    partial_granules: int = 0  # huge pages left partly ballooned by this chain
    bad_chain: str = ""  # why nothing in the chain was used ("" if it was)
    ranges_total: int = 0  # len(ranges) before it was cut to the first 64
    injected_ns: dict[str, int] = field(default_factory=dict)
    bql_wait_ns: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.pages << 12

    @property
    def kick_to_notify_ns(self) -> int | None:
        return hold_window_ns(self.t_kick_ns, self.t_published_ns, self.t_notified_ns)

    def to_json(self) -> str:
        line = {name: getattr(self, name) for name in _BALLOON_FIELDS}
        return json.dumps(line, separators=(",", ":"))


_BALLOON_FIELDS = tuple(item.name for item in fields(BalloonRecord))


@dataclass(slots=True)
class StatsRecord:
    """One sample from the stats queue, named as QEMU names the tags."""

    session: str
    queue: int
    seq: int
    t_ns: int
    stats: dict[str, int]
    unknown_tags: dict[str, int]

    def to_json(self) -> str:
        line = {"kind": "stats"} | {name: getattr(self, name) for name in _STATS_FIELDS}
        return json.dumps(line, separators=(",", ":"))


_STATS_FIELDS = tuple(item.name for item in fields(StatsRecord))
TraceRecord = ReportRecord | BalloonRecord | StatsRecord
