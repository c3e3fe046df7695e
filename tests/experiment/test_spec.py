"""Experiment specs: what is accepted, how a sweep expands, and every way a
spec that cannot run is refused before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vhost_balloon.backend.experiment.spec import SpecError, load_spec, parse_spec

MOCK = """
[experiment]
name = "sweep"
guest = "mock"
repeats = 2
seed = 10

[settings]
duration = "5s"
memory = "2G"

[sweep]
delay = ["none", "report=const:10ms"]
capacity = [16, 32]
"""


def test_a_sweep_is_the_product_of_its_lists_times_the_repeats() -> None:
    spec = parse_spec(MOCK)
    points = spec.points()
    assert len(points) == 2 * 2 * 2
    assert {(p.settings["delay"], p.settings["capacity"]) for p in points} == {
        ("none", 16),
        ("none", 32),
        ("report=const:10ms", 16),
        ("report=const:10ms", 32),
    }
    # Repeat r uses seed + r; both repeats of a setting share its key.
    assert sorted({(p.repeat, p.seed) for p in points}) == [(0, 10), (1, 11)]
    first = [p for p in points if p.repeat == 0]
    second = [p for p in points if p.repeat == 1]
    assert [p.setting_key for p in first] == [p.setting_key for p in second]
    assert len({p.setting_key for p in first}) == 4
    # Fixed settings and defaults are filled in.
    assert points[0].settings["duration"] == "5s"
    assert points[0].settings["discard"] == "punch-hole"
    assert points[0].label == "delay=none capacity=16"


def test_a_qemu_spec_adds_controls_and_model_points() -> None:
    spec = parse_spec(
        """
[experiment]
guest = "qemu"
repeats = 1
[sweep]
delay = ["none", "report=const:100ms"]
[controls]
no_balloon = true
builtin = true
[model]
duration = "10s"
memory = "2560M"
"""
    )
    kinds = [p.kind for p in spec.points()]
    assert kinds.count("qemu") == 2
    assert kinds.count("model") == 2
    assert kinds.count("no_balloon") == 1
    assert kinds.count("builtin") == 1
    model = [p for p in spec.points() if p.kind == "model"]
    # The model runs under each real setting's latency, with its own guest settings.
    assert {p.settings["delay"] for p in model} == {"none", "report=const:100ms"}
    assert all(p.settings["memory"] == "2560M" for p in model)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[experiment]\nguest = 'mock'\n[sweep]\ndelayy = ['none']", "unknown key"),
        ("[experiment]\nguest = 'mock'\n[settings]\nsettle = '5s'", 'guest = "qemu" only'),
        ("[experiment]\nguest = 'qemu'\n[settings]\ncapacity = 16", 'guest = "mock" only'),
        ("[experiment]\nguest = 'xen'", 'not "mock" or "qemu"'),
        ("[experiment]\nrepeats = 0", "repeats"),
        ("[experiment]\nrepeats = true", "repeats"),
        ("[experimnt]\nguest = 'mock'", "unknown table"),
        ("[experiment]\ncolor = 'red'", "unknown key"),
        ("[sweep]\ndelay = 'report=const:1ms'", "non-empty list"),
        ("[sweep]\ndelay = []", "non-empty list"),
        ("[sweep]\ndelay = ['none', 'none']", "listed twice"),
        ("[sweep]\ndelay = ['report=bogus:1ms']", "[sweep] delay"),
        ("[sweep]\ndelay = ['nowhere=const:1ms']", "unknown point"),
        ("[sweep]\ndelay = ['report=const:1ms report=const:2ms']", "given twice"),
        ("[sweep]\ncapacity = [64]", "[sweep] capacity"),
        ("[sweep]\norder = [11]", "[sweep] order"),
        ("[settings]\nmemory = 'lots'", "[settings] memory"),
        ("[settings]\nduration = 5", "expected a string"),
        ("[settings]\nduration = '5 fortnights'", "[settings] duration"),
        ("[settings]\nbql = 'const:1ms'", "[settings] bql"),
        ("[settings]\nmmap_contention = 'many'", "[settings] mmap_contention"),
        ("[settings]\ndiscard = 'shred'", "[settings] discard"),
        ("[settings]\nworkload = 'churn:64M'", "[settings] workload"),
        ("[settings]\nattempt_rate = 0", "[settings] attempt_rate"),
        ("[settings]\nretries = 1.5", "[settings] retries"),
        ("[settings]\ntouch = 'yes'", "[settings] touch"),
        ("[controls]\nbuiltin = true", 'needs guest = "qemu"'),
        ("[experiment]\nguest = 'qemu'\n[controls]\nkvm = true", "[controls] kvm"),
        ("[model]\nduration = '5s'", 'needs guest = "qemu"'),
        ("[experiment]\nguest = 'qemu'\n[model]\nsettle = '1s'", "[model] settle"),
        ("[experiment\n", "not valid TOML"),
        ("[sweep]\nmemory = ['1G', '1024M']", "listed twice"),
        ("[sweep]\nattempt_rate = [2, 2.0]", "listed twice"),
        ("[settings]\nattempt_rate = nan", "[settings] attempt_rate"),
        ("[settings]\nattempt_rate = inf", "[settings] attempt_rate"),
        ("[settings]\nmemory = '512M'", "give it more memory"),
        ("[sweep]\nmemory = ['2G', '1G']", "give it more memory"),
        ("[settings]\ncontig_align = '3M'", "power of two"),
        ("[experiment]\nrepeats = 100000000", "repeats"),
        ("[experiment]\nguest = 'qemu'\n[settings]\nduration = '400ms'", "whole number"),
        ("[experiment]\nguest = 'qemu'\n[model]\ndelay = 'none'", "[model] delay"),
        ("experiment = 3", "must be a table"),
    ],
)
def test_a_spec_that_cannot_run_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    assert reason in str(caught.value)


def test_unreadable_and_binary_spec_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(binary)


def test_the_name_defaults_to_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "my-study.toml"
    path.write_text("[sweep]\ndelay = ['none']\n", encoding="utf-8")
    assert load_spec(path).name == "my-study"


def test_model_points_beside_a_real_guest_label_only_their_own_keys() -> None:
    spec = parse_spec(
        "[experiment]\nguest = 'qemu'\nrepeats = 1\n"
        "[sweep]\nsettle = ['20s', '30s']\ndelay = ['none']\n[model]\nduration = '5s'\n"
    )
    model = [p for p in spec.points() if p.kind == "model"]
    # The model does not have `settle`: one model setting, labelled without it.
    assert [p.label for p in model] == ["delay=none"]


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", "a\u0000b", "spaced name", "", "é"])
def test_a_name_that_could_leave_results_is_refused(name: str) -> None:
    """A name is a folder under results/: `..` once wrote report.md one level up."""
    text = f"[experiment]\nname = {json.dumps(name)}\n[sweep]\ndelay = ['none']\n"
    with pytest.raises(SpecError, match="not a plain name"):
        parse_spec(text)


@pytest.mark.parametrize("name", ["delay-sweep", "v1.2_final", "A.b-c"])
def test_plain_names_are_accepted(name: str) -> None:
    assert parse_spec(f'[experiment]\nname = "{name}"\n[sweep]\ndelay = ["none"]\n').name == name
