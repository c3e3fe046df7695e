"""The study's figures (matplotlib, Agg: no display needed).

- hold_cdf.png: CDF of the time each report held its pages, per setting
  (the guest's view: chain available .. used entry seen; for a real guest,
  its ftrace duration of virtballoon_free_page_report);
- time_to_success_cdf.png: a real guest's "try again -> works": per
  setting, the CDF of the time from a request's first failure to its
  success (gigantic: the next attempt that got the page; offline: the
  offline that retried inside offline_pages());
- fill_cdf.png: the price of reporting: per setting, the CDF of the fill
  workload's later rounds (each an allocate-and-touch of memory the round
  before freed);
- held_over_time.png: bytes held by the report in flight over time, first
  repeat of each setting;
- failure_vs_delay.png: contiguous-allocation failure rate against the
  delay the backend really injected per report (mean of its trace), mean
  and standard error over repeats; controls as horizontal bands, the
  model beside a real guest as its own series (without a delay sweep:
  against the backend's median kick-to-notify time);
- measured_vs_model.png: each run's failure rate against the time-held
  model's prediction: the fraction of the time attempts could arrive (not
  while a success is kept) during which a report overlapping the target
  range was in flight. Attempts arriving at random (Poisson) times see
  time averages, so the points lie on y = x exactly when attempts and
  reporting are independent; where they are not (a success frees the
  range, which reporting then pulls), the points leave the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vhost_balloon.backend.experiment.spec import ExperimentSpec

MiB = 1 << 20
KIND_STYLE = {
    "mock": ("model guest", "o"),
    "model": ("free-list model", "s"),
    "qemu": ("real guest", "o"),
}
CONTROL_LABEL = {"no_balloon": "no balloon device", "builtin": "QEMU built-in balloon"}
CONTROL_STYLE = {"no_balloon": ("black", ":"), "builtin": ("tab:grey", "--")}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _jsonl(path: Path, *numbers: str) -> list[dict[str, Any]]:
    """The records of a point's raw JSONL file that hold every key of `numbers`
    as a number; a file cut short or edited loses its bad lines, not the figure."""
    records = []
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and all(_finite(record.get(k)) for k in numbers):
                    records.append(record)
    except OSError:
        return []
    return records


def _holds_ms(out: Path, row: dict[str, Any]) -> list[float]:
    directory = out / "points" / str(row.get("dir", ""))
    if row["kind"] in ("mock", "model"):
        reports = _jsonl(directory / "guest" / "reports.jsonl", "hold_ns")
        return [r["hold_ns"] / 1e6 for r in reports]
    try:
        launch = json.loads((directory / "launch.json").read_text(encoding="utf-8"))
        samples = launch.get("guest_hold_us", {}).get("samples", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [us / 1e3 for us in samples if _finite(us)] if isinstance(samples, list) else []


def _held_series(out: Path, row: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(seconds since the first sample, MiB held) as a step series."""
    directory = out / "points" / str(row.get("dir", ""))
    if row["kind"] in ("mock", "model"):
        records = _jsonl(directory / "guest" / "held.jsonl", "t_ns", "bytes")
        samples = [(s["t_ns"], s["bytes"]) for s in records]
    else:
        events: list[tuple[int, int]] = []
        trace = _jsonl(directory / "backend-trace.jsonl", "t_kick_ns", "t_published_ns", "bytes")
        for record in trace:
            events += [
                (record["t_kick_ns"], record["bytes"]),
                (record["t_published_ns"], -record["bytes"]),
            ]
        events.sort()
        held, samples = 0, []
        for t, delta in events:
            held += delta
            samples.append((t, held))
    if not samples:
        return [], []
    t0 = samples[0][0]
    return [(t - t0) / 1e9 for t, _ in samples], [b / MiB for _, b in samples]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _launch_summary(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    """A real-guest point's launch summary (launch.json), {} without one."""
    if row["kind"] in ("mock", "model"):
        return {}
    directory = out / "points" / str(row.get("dir", ""))
    try:
        launch = json.loads((directory / "launch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return launch if isinstance(launch, dict) else {}


def _times_to_success_ms(out: Path, row: dict[str, Any]) -> list[float]:
    """A real-guest point's "try again -> works" times."""
    launch = _launch_summary(out, row)
    try:
        loop = launch.get(launch.get("workload", "gigantic")) or {}
        samples = (loop.get("try_again") or {}).get("time_to_success_samples_ms", [])
    except AttributeError:
        return []
    return [ms for ms in samples if _finite(ms)] if isinstance(samples, list) else []


def _later_fills_ms(out: Path, row: dict[str, Any]) -> list[float]:
    """A fill point's later rounds (round 1 touches memory never backed)."""
    try:
        rounds = (_launch_summary(out, row).get("fill") or {}).get("round_ms") or []
        samples = [r["ms"] for r in rounds if r["round"] > 1]
    except (AttributeError, KeyError, TypeError):
        return []
    return [ms for ms in samples if _finite(ms)]


def _cdf(
    out: Path,
    rows: list[dict[str, Any]],
    samples: Callable[[Path, dict[str, Any]], list[float]],
    *,
    name: str,
    xlabel: str,
    ylabel: str,
    title: str,
    controls: bool = False,
) -> Path | None:
    """One CDF per setting of what `samples` gives for each of its rows (and
    for the controls' rows, when they are the baseline)."""
    names = {kind: style[0] for kind, style in KIND_STYLE.items()}
    if controls:
        names |= CONTROL_LABEL
    by_setting: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    for row in rows:
        if row.get("status") != "ok" or row["kind"] not in names:
            continue
        by_setting.setdefault(row["setting_key"], []).extend(samples(out, row))
        labels[row["setting_key"]] = f"{names[row['kind']]}: {row['label']}"
    if not any(by_setting.values()):
        return None
    fig, ax = plt.subplots(figsize=(12, 5))
    for key, values in by_setting.items():
        if not values:
            continue
        ordered = sorted(values)
        ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(ordered, ys, where="post", label=f"{labels[key]} (n={len(ordered)})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves
    return _save(fig, out / "figures" / f"{name}.png")


def hold_cdf(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    return _cdf(
        out,
        rows,
        _holds_ms,
        name="hold_cdf",
        xlabel="hold window per report (ms, log scale)",
        ylabel="fraction of reports",
        title="How long reported pages are out of the guest's allocator",
    )


def time_to_success_cdf(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """The review's "fails. Try again -> works": per setting, how long each
    request that failed first took to succeed (docs/qemu.md, try_again)."""
    return _cdf(
        out,
        rows,
        _times_to_success_ms,
        name="time_to_success_cdf",
        xlabel="from the first failure to success (ms, log scale)",
        ylabel="fraction of requests that failed first",
        title="Try again -> works: time until the same request succeeded",
    )


def fill_cdf(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """The price of reporting: how long each later fill round took."""
    return _cdf(
        out,
        rows,
        _later_fills_ms,
        name="fill_cdf",
        xlabel="allocate and touch one round's memory (ms, log scale)",
        ylabel="fraction of later rounds",
        title="The price of reporting: refilling memory the last round freed",
        controls=True,  # no balloon device is the price's baseline
    )


def held_over_time(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    firsts: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("status") == "ok" and row["kind"] in KIND_STYLE:
            firsts.setdefault(row["setting_key"], row)
    series = [(row, *_held_series(out, row)) for row in firsts.values()]
    series = [item for item in series if item[1]]
    if not series:
        return None
    fig, axes = plt.subplots(
        len(series), 1, figsize=(8, 1.6 * len(series) + 1), sharex=True, squeeze=False
    )
    for ax, (row, ts, mib) in zip(axes[:, 0], series, strict=True):
        ax.step(ts, mib, where="post", linewidth=0.8)
        ax.set_ylabel("MiB held", fontsize=7)
        ax.set_title(
            f"{KIND_STYLE[row['kind']][0]}: {row['label']} (seed {row['seed']})", fontsize=8
        )
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("seconds")
    return _save(fig, out / "figures" / "held_over_time.png")


def _series_key(entry: dict[str, Any], spec: ExperimentSpec) -> str:
    # One line per value of the keys other than the x axis's own.
    others = (
        [k for k in spec.sweep if k != "delay"] if "delay" in spec.sweep else list(spec.sweep)[1:]
    )
    parts = [f"{k}={entry.get('set_' + k)}" for k in others]
    name: str = KIND_STYLE.get(entry["kind"], (entry["kind"], "o"))[0]
    return name + (f" {' '.join(parts)}" if parts else "")


def failure_vs_delay(out: Path, spec: ExperimentSpec, summary: list[dict[str, Any]]) -> Path | None:
    points = [e for e in summary if e["kind"] in KIND_STYLE and not math.isnan(e["failure_rate"])]
    if not points:
        return None
    # A delay sweep is plotted against the delay the backend injected; any
    # other (contention, discard) against the backend's whole time per report.
    if "delay" in spec.sweep:
        x_key, x_label = "injected_ms", "delay injected per report (ms, measured by the backend)"
    else:
        x_key = "kick_to_notify_p50_ms"
        x_label = "backend time per report, kick to notify (ms, median)"
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[dict[str, Any]]] = {}
    for entry in points:
        series.setdefault(_series_key(entry, spec), []).append(entry)
    for name, entries in series.items():
        entries.sort(key=lambda e: e[x_key])
        marker = KIND_STYLE.get(entries[0]["kind"], ("", "o"))[1]
        ax.errorbar(
            [e[x_key] for e in entries],
            [100 * e["failure_rate"] for e in entries],
            xerr=[e[f"{x_key}_se"] for e in entries],
            yerr=[100 * e["failure_rate_se"] for e in entries],
            marker=marker,
            capsize=3,
            label=name,
        )
    for entry in summary:
        if entry["kind"] in CONTROL_LABEL and not math.isnan(entry["failure_rate"]):
            rate, error = 100 * entry["failure_rate"], 100 * entry["failure_rate_se"]
            color, style = CONTROL_STYLE[entry["kind"]]
            ax.axhline(
                rate,
                color=color,
                linestyle=style,
                linewidth=1.2,
                label=CONTROL_LABEL[entry["kind"]],
            )
            ax.axhspan(rate - error, rate + error, alpha=0.15, color=color)
    ax.set_xlabel(x_label)
    ax.set_ylabel("contiguous-allocation attempts failed (%)")
    ax.set_title("Failure rate against hypervisor time (mean ± s.e. over repeats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "figures" / "failure_vs_delay.png")


def measured_vs_model(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    runs = [
        r
        for r in rows
        if r.get("status") == "ok"
        and r["kind"] in KIND_STYLE
        and r.get("attempts")
        and _finite(r.get("model_p_fail", r.get("held_fraction")))
        and _finite(r.get("failure_rate"))
    ]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 6))
    for kind, (name, marker) in KIND_STYLE.items():
        chosen = [r for r in runs if r["kind"] == kind]
        if chosen:
            ax.scatter(
                [100 * r.get("model_p_fail", r["held_fraction"]) for r in chosen],
                [100 * r["failure_rate"] for r in chosen],
                marker=marker,
                label=name,
                alpha=0.7,
            )
    top = max(100 * max(max(r.get("model_p_fail", 0.0), r["failure_rate"]) for r in runs), 1.0)
    top *= 1.1
    ax.plot([0, top], [0, top], color="grey", linewidth=1, label="model: P(fail) = time held")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted: time a report over the target range was in flight (%)")
    ax.set_ylabel("attempts failed (%)")
    ax.set_title("Measured failure rate vs the time-held model, per run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "figures" / "measured_vs_model.png")


def draw_all(
    spec: ExperimentSpec, out: Path, rows: list[dict[str, Any]], summary: list[dict[str, Any]]
) -> list[Path]:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    drawn = [
        hold_cdf(out, rows),
        time_to_success_cdf(out, rows),
        fill_cdf(out, rows),
        held_over_time(out, rows),
        failure_vs_delay(out, spec, summary),
        measured_vs_model(out, rows),
    ]
    return [path for path in drawn if path is not None]
