"""What each run is asked to do: the command lines a point becomes."""

from __future__ import annotations

import itertools
from pathlib import Path

from vhost_balloon.backend.experiment.points import _guest_args, qemu_command
from vhost_balloon.backend.experiment.spec import parse_spec


def test_a_real_guest_point_becomes_a_launch_command(tmp_path: Path) -> None:
    spec = parse_spec(
        "[experiment]\nguest = 'qemu'\nrepeats = 1\nseed = 7\n"
        "[settings]\nduration = '45s'\nsettle = '25s'\norder = 10\n"
        "delay = 'kick=const:1ms report=exp:5ms'\nbql = 'const:1ms@10'\n"
        "[controls]\nno_balloon = true\nbuiltin = true\n"
    )
    points = {p.kind: p for p in spec.points()}
    command = qemu_command(points["qemu"], tmp_path)
    joined = " ".join(command)
    assert command[1:5] == ["-m", "vhost_balloon.backend", "launch", "--json"]
    for part in (
        "--workload gigantic",
        "--duration 45",
        "--settle 25",
        "--mem 2560M",
        "--seed 7",
        "--delay kick=const:1ms --delay report=exp:5ms",
        "--bql const:1ms@10",
        f"--trace {tmp_path / 'backend-trace.jsonl'}",
    ):
        assert part in joined, part
    # --append replaces launch's gigantic defaults, so they are repeated.
    append = command[command.index("--append") + 1]
    assert append == "nokaslr init_on_alloc=0 page_reporting.page_reporting_order=10"
    assert qemu_command(points["no_balloon"], tmp_path)[-1] == "--no-balloon"
    builtin = qemu_command(points["builtin"], tmp_path)
    assert builtin[-1] == "--baseline" and "--trace" not in builtin


def test_a_model_point_becomes_guest_arguments(tmp_path: Path) -> None:
    spec = parse_spec(
        "[settings]\nworkload = 'churn:64M,500ms,1s'\ntouch = true\nbackoff = '20ms'\n"
        "retries = 2\nattempt_cost = '30ms'\n[experiment]\nrepeats = 1\nseed = 4\n"
    )
    (point,) = spec.points()
    args = _guest_args(point.settings, point.seed, tmp_path)
    pairs = {
        flag: value
        for flag, value in itertools.pairwise(args)
        if flag.startswith("--") and not value.startswith("--")
    }
    assert args[:2] == ["--model", "--json"]
    assert pairs["--churn"] == "64M,0.5,1"
    assert pairs["--backoff"] == "0.02"
    assert pairs["--attempt-cost"] == "0.03"
    assert pairs["--retries"] == "2"
    assert pairs["--seed"] == "4"
    assert "--touch" in args
