"""The price of reporting: the fill workload's console lines and summary,
a real-guest fill sweep's spec keys, the launch command they become, the
row of a fill run, the price table against the no-balloon control and its
splice, and the setting keys of sweeps run before the keys existed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.backend.launch_summaries import builtin_summary
from vhost_balloon.backend.cli.launch import launch_options
from vhost_balloon.backend.cli.parser import build_parser
from vhost_balloon.backend.experiment import figures
from vhost_balloon.backend.experiment.points import PointError, qemu_command, qemu_row
from vhost_balloon.backend.experiment.report import price_table
from vhost_balloon.backend.experiment.spec import SpecError, parse_spec
from vhost_balloon.backend.experiment.splice import splice
from vhost_balloon.backend.experiment.tables import summarise, write_jsonl
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.summary import fill_summary
from vhost_balloon.backend.qemu.summary_table import format_launch_summary

SPEC = (
    "[experiment]\nname = 'price'\nguest = 'qemu'\nrepeats = 1\nseed = 3\n"
    "[settings]\nworkload = 'fill'\nrounds = {rounds}\nsize = '{size}'\npause = '3s'\n"
    "memory = '1024M'\n"
    "[sweep]\ndiscard = ['punch-hole', 'none']\n"
    "[controls]\nno_balloon = true\n"
)


def _console(fill_us: dict[int, float], mib: int = 256) -> GuestConsole:
    console = GuestConsole()
    console.feed("VB params workload=fill rounds=3 size_mib=256", 0.0)
    for number in fill_us:
        console.feed(f"VB round={number} fill_start t=1.0 memfree_kib=9", 1.0)
        console.feed(f"VB round={number} filled_mib={mib} t=2.0 memfree_kib=9", 2.0)
    for number, us in fill_us.items():
        console.feed(f"VB fill_round={number} fill_us={us}", 9.0)
    return console


def test_the_guest_timed_rounds_become_the_fill_summary() -> None:
    console = _console({1: 2_000_000.0, 2: 3_000_000.0, 3: 3_200_000.0, 4: 3_100_000.0})
    fill = fill_summary(console)
    assert fill is not None and not console.errors
    assert fill["size_mib"] == 256 and fill["first_ms"] == 2000.0
    assert [r["ms"] for r in fill["round_ms"]] == [2000.0, 3000.0, 3200.0, 3100.0]
    assert fill["later_ms"]["p50"] == pytest.approx(3100.0)  # round 1 left out
    assert fill["later_mib_per_s"] == pytest.approx(256 / 3.1, abs=0.1)
    table = format_launch_summary(builtin_summary("fill", fill=fill))
    assert "fill 256 MiB (ms)" in table and "round 1 2000.0" in table


def test_no_timings_no_fill_summary_and_a_garbled_line_is_recorded() -> None:
    assert fill_summary(GuestConsole()) is None  # ftrace off: the rounds are not timed
    console = _console({1: 2e6})
    console.feed("VB fill_round=2 fill_us=lots", 9.0)
    assert console.errors and "fill_round=2" in console.errors[0]
    fill = fill_summary(console)
    assert fill is not None and fill["later_ms"] is None  # one round: nothing later


def test_a_fill_point_becomes_a_launch_of_the_fill_workload(tmp_path: Path) -> None:
    points = parse_spec(SPEC.format(rounds=12, size="256M")).points()
    ours = " ".join(qemu_command(points[0], tmp_path))
    assert "--workload fill" in ours and "--rounds 12 --size 256 --pause 3" in ours
    assert "--discard punch-hole" in ours
    assert "--discard none" in " ".join(qemu_command(points[1], tmp_path))
    control = qemu_command(points[2], tmp_path)
    assert points[2].kind == "no_balloon" and control[-1] == "--no-balloon"


@pytest.mark.parametrize(
    ("rounds", "size", "named"),
    [(0, "256M", "rounds"), (1.5, "256M", "rounds"), (2, "1.5M", "size"), (2, "512K", "size")],
)
def test_bad_fill_keys_are_refused_naming_them(rounds: object, size: str, named: str) -> None:
    with pytest.raises(SpecError, match=named):
        parse_spec(SPEC.format(rounds=rounds, size=size))


def test_older_sweeps_keep_their_setting_keys() -> None:
    gigantic = SPEC.format(rounds=2, size="300M").replace("'fill'", "'gigantic'")
    key = parse_spec(gigantic.replace("pause = '3s'", "")).points()[0].setting_key
    assert "rounds=" not in key and "size=" not in key and "pause=" not in key
    fill = parse_spec(SPEC.format(rounds=12, size="256M")).points()[0].setting_key
    assert "rounds=12" in fill and "size=256M" in fill and "pause=3s" in fill


def test_launch_takes_no_balloon_as_the_fill_control() -> None:
    parser = build_parser()
    options = launch_options(parser.parse_args(["launch", "--workload", "fill", "--no-balloon"]))
    assert options.no_balloon and options.workload == "fill"


def _summary(later_ms: float, given_mib: int) -> dict[str, Any]:
    rounds = [{"round": 1, "ms": 2000.0}, {"round": 2, "ms": later_ms}]
    return {
        "workload": "fill",
        "guest_reports": 9,
        "guest_hold_us": {"samples": [1000.0]},
        "memfd_freed": [{"round": 1, "freed_mib": 256, "given_back_bytes": given_mib << 20}],
        "fill": {
            "size_mib": 256,
            "round_ms": rounds,
            "first_ms": 2000.0,
            "later_ms": {"p50": later_ms},
        },
    }


def test_a_fill_run_is_a_row_and_the_price_table_compares_it_with_no_reporting(
    tmp_path: Path,
) -> None:
    row = qemu_row(_summary(3100.0, 250), {})
    assert row["fill_later_p50_ms"] == 3100.0 and row["fill_first_ms"] == 2000.0
    assert row["given_back_mib"] == 250 and (row["attempts"], row["failures"]) == (2, 0)
    with pytest.raises(PointError, match="fewer than two"):
        qemu_row(_summary(3100.0, 250) | {"fill": {"round_ms": [{"round": 1, "ms": 1.0}]}}, {})

    def stored(kind: str, label: str, later_ms: float, given: int) -> dict[str, Any]:
        return {
            **qemu_row(_summary(later_ms, given), {}),
            "kind": kind,
            "label": label,
            "setting_key": f"{kind} {label}",
            "seed": 3,
            "repeat": 0,
            "status": "ok",
            "set_size": "256M",
        }

    rows = [
        stored("qemu", "discard=punch-hole", 3100.0, 250),
        stored("no_balloon", "base", 3000.0, 0),
    ]
    table = price_table(summarise(rows))
    assert table is not None
    ours, control = table.splitlines()[2:]
    assert ours.startswith("| qemu | discard=punch-hole | 1 | 256M | 250.00 | 2000.00 |")
    assert ours.endswith("| 3100 | 3100 | 1.033x |")
    assert control.endswith("| 3000 | 3000 | 1.000x |")
    assert price_table(summarise([{**rows[0], "fill_later_p50_ms": None}])) is None
    # Every run is shown; a run slowed by the host does not move the median.
    slow = [{**rows[0], "seed": 4, "fill_later_p50_ms": 9000.0}, {**rows[0], "seed": 5}]
    table = price_table(summarise([*rows, *slow]))
    assert table is not None and "| 3100 9000 3100 | 3100 | 1.033x |" in table

    results = tmp_path / "results" / "price"
    results.mkdir(parents=True)
    write_jsonl(results / "results.jsonl", rows)
    document = tmp_path / "results.md"
    document.write_text("x\n<!-- price:price -->\nold\n<!-- /price:price -->\n", encoding="utf-8")
    assert splice(document, tmp_path / "results") == 1
    assert "1.033x" in document.read_text(encoding="utf-8")
    json.dumps(rows)  # a row is plain JSON


def test_the_fill_cdf_draws_the_later_rounds_of_each_setting(tmp_path: Path) -> None:
    (tmp_path / "figures").mkdir()
    rows = []
    for kind, later in (("qemu", 3100.0), ("no_balloon", 3000.0)):
        point = tmp_path / "points" / kind
        point.mkdir(parents=True)
        summary = _summary(later, 250)
        (point / "launch.json").write_text(json.dumps(summary), encoding="utf-8")
        rows.append(
            {"kind": kind, "label": "base", "setting_key": kind, "status": "ok", "dir": kind}
        )
    assert figures._later_fills_ms(tmp_path, rows[0]) == [3100.0]  # round 1 left out
    assert figures._later_fills_ms(tmp_path, rows[1]) == [3000.0]  # the control is drawn too
    path = figures.fill_cdf(tmp_path, rows)
    assert path is not None and path.stat().st_size > 0
    assert figures.fill_cdf(tmp_path, rows[1:]) is not None  # the control alone
    assert figures.fill_cdf(tmp_path, [{**rows[0], "dir": "missing"}]) is None
