#!/usr/bin/env python3
"""Coverage-guided fuzzing of every parser of untrusted input, with atheris.

    .venv/bin/python scripts/fuzz.py                      # every target, 1,000,000 inputs each
    .venv/bin/python scripts/fuzz.py --runs 3000          # a short run (the test command's)
    .venv/bin/python scripts/fuzz.py --target session --seconds 600

Each target (tests/fuzz/targets.py) runs in a process of its own under
atheris (libFuzzer), with the project's modules instrumented for coverage,
starting from a copy of its seed corpus (tests/fuzz/corpus/TARGET; the copy
grows, the repository's corpus does not, unless --keep-corpus). A crash (an
exception the target does not allow, a failed assertion) or a hang (an
input running over --timeout seconds) leaves libFuzzer's artifact in the
output directory, to become a regression test. Prints, per target: inputs
run, coverage (libFuzzer's `cov` and `ft`), corpus size, crashes, hangs,
seconds; exits 1 if anything crashed or hung.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
TARGETS = ("header", "request", "ring", "session", "balloon", "stats")
# libFuzzer's last status line: "#123456 DONE cov: 812 ft: 2210 corp: 160/9Kb ..."
STATUS = re.compile(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)\s+cov: (\d+) ft: (\d+) corp: (\d+)")

CHILD = """
import logging, sys, atheris
# Nearly every input is bad, and each would log its refusal: only here, in
# the fuzzing process, is the project's logging turned off.
logging.getLogger("vhost_balloon").setLevel(logging.CRITICAL)
with atheris.instrument_imports(include=["vhost_balloon", "tests.fuzz", "tests.unit.fuzz_targets"]):
    from tests.fuzz.targets import TARGETS
atheris.Setup(sys.argv, TARGETS[{target!r}])
atheris.Fuzz()
"""


@dataclass
class Outcome:
    target: str
    runs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    log: str = ""


def fuzz(target: str, args: argparse.Namespace, out: Path) -> Outcome:
    runs, seconds, timeout, keep = args.runs, args.seconds, args.timeout, args.keep_corpus
    work = out / target
    corpus = work / "corpus"
    artifacts = work / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)  # a reused --out: count only this run's
    artifacts.mkdir(parents=True)
    seeds = CORPUS / target
    if keep:
        corpus = seeds
    else:
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.copytree(seeds, corpus) if seeds.is_dir() else corpus.mkdir(parents=True)
    argv = [
        sys.executable,
        "-c",
        CHILD.format(target=target),
        f"-runs={runs}",
        f"-timeout={timeout}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        "-rss_limit_mb=4096",
        str(corpus),
    ]
    if seconds:
        argv.insert(3, f"-max_total_time={seconds}")
    start = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    outcome = Outcome(target, seconds=time.monotonic() - start, log=done.stderr)
    for match in STATUS.finditer(done.stderr):
        outcome.runs, outcome.cov, outcome.ft, outcome.corpus = map(int, match.groups())
    executed = re.search(r"stat::number_of_executed_units: (\d+)", done.stderr)
    if executed:
        outcome.runs = int(executed.group(1))
    names = [p.name for p in artifacts.iterdir()]
    outcome.crashes = sum(n.startswith(("crash-", "oom-", "leak-")) for n in names)
    outcome.hangs = sum(n.startswith("timeout-") for n in names)
    if done.returncode != 0 and not (outcome.crashes or outcome.hangs):
        outcome.crashes = 1  # it died some other way: the log says how
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", action="append", choices=TARGETS, help="repeatable; all by default"
    )
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (1000000)")
    parser.add_argument("--seconds", type=int, default=0, help="stop a target after this long")
    parser.add_argument("--timeout", type=int, default=10, help="seconds before an input is a hang")
    parser.add_argument("--out", type=Path, help="where corpora and artifacts go (a temp dir)")
    parser.add_argument("--keep-corpus", action="store_true", help="grow tests/fuzz/corpus itself")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vb-fuzz-"))
    failed = False
    columns = ("inputs", "cov", "ft", "corpus", "crashes", "hangs", "seconds")
    widths = (9, 6, 6, 6, 7, 5, 8)
    print(f"{'target':8} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for target in args.target or TARGETS:
        o = fuzz(target, args, out)
        print(
            f"{o.target:8} {o.runs:9d} {o.cov:6d} {o.ft:6d} {o.corpus:6d} {o.crashes:7d} "
            f"{o.hangs:5d} {o.seconds:8.1f}",
            flush=True,
        )
        if o.crashes or o.hangs:
            failed = True
            print(o.log[-4000:], file=sys.stderr)
            print(f"artifacts in {out / target / 'artifacts'}", file=sys.stderr)
    if args.out is None and not failed:
        shutil.rmtree(out, ignore_errors=True)  # nothing to look at: leave no temp dir behind
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
