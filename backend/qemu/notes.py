"""What run-guest.sh and QEMU say on stderr, turned into facts.

run-guest.sh and build-initramfs.sh prefix their own lines (`run-guest: `,
`build-initramfs: `); among them the QEMU pid, the accelerator chosen and
why, and a one-sentence `FAILED:` reason. Any other line is QEMU's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PID_NOTE = re.compile(r"^run-guest: qemu pid (\d+)")
_ACCEL = "run-guest: accelerator: "
_FAILED = "run-guest: FAILED: "


@dataclass(slots=True)
class RunGuestNotes:
    qemu_pid: int | None = None
    accel: str | None = None
    accel_reason: str | None = None  # None: the accelerator was asked for
    failure: str | None = None  # run-guest.sh's own reason for giving up
    qemu_errors: list[str] = field(default_factory=list)  # QEMU's lines, in order

    def feed(self, line: str) -> None:
        """Take one stderr line (without its newline)."""
        if match := _PID_NOTE.match(line):
            self.qemu_pid = int(match.group(1))
        elif line.startswith(_ACCEL):
            self._parse_accel(line.removeprefix(_ACCEL))
        elif line.startswith(_FAILED):
            self.failure = line.removeprefix(_FAILED)
        elif not line.startswith(("run-guest: ", "build-initramfs: ")):
            self.qemu_errors.append(line)

    def _parse_accel(self, text: str) -> None:
        name, _, rest = text.partition(" ")
        self.accel = name.rstrip(",")
        rest = rest.strip()
        if rest.startswith("because "):
            rest = rest.removeprefix("because ")
        self.accel_reason = rest or None

    @property
    def first_error(self) -> str | None:
        return self.qemu_errors[0] if self.qemu_errors else None
