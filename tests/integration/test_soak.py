"""The integrity soak (scripts/soak.py, guest/soak.py): a short run under every
kind of chaos finds nothing, and the checks it relies on do find what they
look for."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import StartBackend
from vhost_balloon.backend.latency.delays import parse_delay
from vhost_balloon.backend.latency.injection import LatencySettings, Point
from vhost_balloon.guest.soak import BlockState, SoakGuest, SoakGuestOptions

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_under_delays_disconnects_and_restarts_finds_nothing(
    tmp_path: Path,
) -> None:
    summary = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--seconds",
            "12",
            "--memory-mib",
            "128",
            "--delay-every",
            "1",
            "--disconnect-every",
            "2",
            "--restart-every",
            "4",
            "--json",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(summary.read_text())
    guest, trace = result["guest"], result["trace"]
    assert result["failures"] == []
    # Every kind of chaos happened, and the checks ran through all of it.
    assert result["delay_changes"] >= 1
    assert result["backend_restarts"] >= 1 and guest["connections_lost"] >= 1
    assert guest["disconnects_injected"] >= 1 and guest["reports_abandoned"] >= 1
    assert guest["connections"] >= 3
    assert guest["reports_published"] >= 50 and trace["records"] >= guest["reports_published"]
    assert guest["pages_checked"] > 0 and guest["altered_bytes"] == 0
    assert guest["undiscarded_bytes"] == 0 and trace["published_before_discard"] == 0
    assert "1. soak of" in run.stdout and "bytes of unreported memory altered: 0" in run.stdout


async def test_the_soak_guest_counts_every_altered_byte_once(start_backend: StartBackend) -> None:
    backend = await start_backend()
    guest = SoakGuest(SoakGuestOptions(socket_path=str(backend.socket_path), memory_bytes=64 << 20))
    try:
        await guest.connect()
        assert guest.allocate()
        (owned,) = [gpa for gpa, state in guest.state.items() if state is BlockState.OWNED]
        mapping, offset = guest.ram.locate(owned + 3 * 4096 + 100, 2)
        mapping[offset : offset + 2] = bytes(
            255 - byte for byte in mapping[offset : offset + 2]
        )  # two bytes of one page, as a stray write by the host would
        guest.check_all()
        assert (guest.counts.altered_pages, guest.counts.altered_bytes) == (1, 2)
        guest.check_all()  # stamped again: counted once
        assert guest.counts.altered_bytes == 2
        # A freed block is still the guest's until it is reported: checked the same way.
        assert guest.free()
        mapping[offset] ^= 0xFF
        guest.check_all()
        assert guest.counts.altered_bytes == 3
    finally:
        await guest.close()


async def test_a_report_seen_used_before_its_pages_read_zero_is_caught(
    start_backend: StartBackend,
) -> None:
    # --discard none publishes without freeing anything: the pages keep their stamps.
    backend = await start_backend(discard="none")
    guest = SoakGuest(SoakGuestOptions(socket_path=str(backend.socket_path), memory_bytes=64 << 20))
    try:
        await guest.connect()
        for _ in range(5):
            guest.allocate()
        while guest.free():
            pass
        await guest.report()
        assert guest.counts.reports_published == 1
        assert guest.counts.early_reports == 1 and guest.counts.undiscarded_bytes > 0
    finally:
        await guest.close()


async def test_a_disconnect_strands_the_report_in_flight_until_the_grace_ends(
    start_backend: StartBackend,
) -> None:
    # A publish delay keeps the report in flight when the guest hangs up.
    latency = LatencySettings(delays={Point.PUBLISH: parse_delay("const:200ms")})
    backend = await start_backend(latency=latency)
    options = SoakGuestOptions(
        socket_path=str(backend.socket_path), memory_bytes=64 << 20, stranded_grace_s=0.3
    )
    guest = SoakGuest(options)
    try:
        await guest.connect()
        guest.allocate()
        guest.free()
        guest.want_disconnect()
        await guest.report()
        assert guest.driver is None and guest.counts.disconnects_injected == 1
        stranded = [gpa for gpa, state in guest.state.items() if state is BlockState.STRANDED]
        assert len(stranded) == 1
        guest._release_stranded()
        assert guest.state[stranded[0]] is BlockState.STRANDED  # not before the grace
        time.sleep(0.35)
        guest._release_stranded()
        assert guest.state[stranded[0]] is BlockState.RELEASED
        await guest.connect()  # the same RAM, a new connection
        assert guest.counts.connections == 2
    finally:
        await guest.close()
