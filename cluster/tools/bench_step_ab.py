"""`tierserve bench engine --against REV`: the engine step now vs the step loop of an older commit, A/B.

The old tree is exported (`git archive REV`) into a temporary folder; cluster/tools/step_timing_worker.py times
the same shapes in a fresh process on each tree, alternating old, new, old, new ... for --rounds rounds (these
machines drift by tens of percent over minutes: only interleaved ratios mean anything). Each round reports the
median step time per shape; the table shows the median over rounds and new/old. Separate processes, not one:
both trees are the package `workers`, and one process cannot import two of them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("step_timing_worker.py")


@dataclass
class StepABResult:
    against: str  # the old commit
    head: str  # the new tree's commit (+ "-dirty" with uncommitted changes)
    rounds: int
    repeats: int  # repeats of each shape inside one round (its median is the round's figure)
    old_step_s: dict[str, float]  # shape -> median over rounds
    new_step_s: dict[str, float]
    ratio: dict[str, float]  # new / old: above 1 is slower
    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # "old"/"new" -> shape -> every round


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout.strip()


def export_tree(rev: str, into: Path) -> None:
    """The old commit's workers/ and kernels/ (all the worker imports) into `into`."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "workers", "kernels"], cwd=REPO_ROOT,
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def time_tree(tree: Path, repeats: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(WORKER), str(repeats)], env=env, cwd=tree, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_step_ab(against: str, rounds: int, repeats: int, progress=lambda message: None) -> StepABResult:
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    old_commit = _git("rev-parse", "--short", against)
    head = _git("rev-parse", "--short", "HEAD") + ("-dirty" if _git("status", "--porcelain", "workers",
                                                                     "kernels") else "")
    runs: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory(prefix="tierserve-ab-") as tmp:
        old_tree = Path(tmp) / "old"
        export_tree(against, old_tree)
        for round_index in range(rounds):
            for label, tree in (("old", old_tree), ("new", REPO_ROOT)):
                progress(f"round {round_index + 1}/{rounds}: {label} tree")
                for shape, seconds in time_tree(tree, repeats).items():
                    runs[label].setdefault(shape, []).append(seconds)
    old = {shape: statistics.median(values) for shape, values in runs["old"].items()}
    new = {shape: statistics.median(values) for shape, values in runs["new"].items()}
    ratio = {shape: new[shape] / old[shape] for shape in old if shape in new}
    return StepABResult(against=old_commit, head=head, rounds=rounds, repeats=repeats, old_step_s=old,
                        new_step_s=new, ratio=ratio, runs=runs)


def format_table(result: StepABResult) -> str:
    lines = [f"engine step, {result.head} vs {result.against} (median of {result.rounds} alternating rounds)",
             f"{'shape':<36} {'old ms':>9} {'new ms':>9} {'new/old':>8}"]
    for shape, ratio in result.ratio.items():
        lines.append(f"{shape:<36} {result.old_step_s[shape] * 1e3:>9.2f} {result.new_step_s[shape] * 1e3:>9.2f} "
                     f"{ratio:>8.3f}")
    return "\n".join(lines)


def to_json(result: StepABResult) -> str:
    return json.dumps(asdict(result), indent=2)


def run_step_ab_bench(args: argparse.Namespace) -> int:
    result = run_step_ab(args.against, args.rounds, args.step_repeats,
                         progress=lambda message: print(f"[bench engine --against] {message}", file=sys.stderr,
                                                        flush=True))
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).write_text(to_json(result))
    return 0
