"""Counters for every path a report or a message can take."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class DeviceStats:
    reports: int = 0
    entries: int = 0
    reported_bytes: int = 0
    discarded_entries: int = 0
    freed_bytes: int = 0
    skipped_outside: int = 0
    skipped_unaligned: int = 0
    poison_acks: int = 0
    discard_errors: int = 0
    discard_syscall_ns: int = 0
    queue_errors: int = 0
    notifications: int = 0
    # Inflate and deflate chains (the classic balloon).
    inflate_chains: int = 0
    inflated_pages: int = 0
    inflate_freed_bytes: int = 0
    deflate_chains: int = 0
    deflated_pages: int = 0
    deflate_unknown_pfns: int = 0  # given back but never inflated
    balloon_pfns_outside: int = 0  # PFNs outside guest RAM
    balloon_pfns_unaligned: int = 0  # in a region not page-aligned in its file
    balloon_duplicate_pfns: int = 0  # repeated in a chain, or inflated twice
    bad_balloon_chains: int = 0  # not an array of PFNs: acked, nothing used
    other_acks: int = 0  # chains of queues nothing is read from (hinting)

    def add(self, other: DeviceStats) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def as_dict(self) -> dict[str, int]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def counters(self) -> dict[str, int]:
        """The figures a user reads first (demo summary, Prometheus counters)."""
        return {
            "reports": self.reports,
            "entries": self.entries,
            "reported_bytes": self.reported_bytes,
            "freed_bytes": self.freed_bytes,
            "skipped_entries": self.skipped_outside + self.skipped_unaligned,
            "discard_errors": self.discard_errors,
            "queue_errors": self.queue_errors,
            "inflated_pages": self.inflated_pages,
            "inflate_freed_bytes": self.inflate_freed_bytes,
            "deflated_pages": self.deflated_pages,
        }
