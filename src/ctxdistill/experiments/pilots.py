"""The pre-registered pilot rules of docs/study_plan.md, read from a study summary.

A pilot is a domain of the study (one seed, knowledge probes only) whose runs choose the learning rates of
a confirmatory arm; its runs are reported apart and never pooled. Two rules:
- `bracketing_lrs`: the two adjacent learning rates whose gains bracket a target (SDFT: +16 points); if none
  do, the two whose gains are nearest to it (said so);
- `lowest_lr_reaching`: the lowest learning rate at which every method gains at least a threshold (arm B:
  +10 points for both DiSC and FT).

    python -m ctxdistill.experiments.pilots docs/results/study_summary.json --domain pilot_sdft --bracket 16
    python -m ctxdistill.experiments.pilots docs/results/study_summary.json --domain pilot_qwen --all-reach 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CtxDistillError
from .comparisons import scale


def pilot_gains(summary: dict, domain: str, metric: str = "knowledge.mcq_loglik") -> dict[str, dict[float, float]]:
    """method -> lr -> gain over the domain's initial model (points for rates, the metric's unit otherwise),
    the mean over the pilot's seeds."""
    data = (summary.get("domains") or {}).get(domain)
    if not data or not data.get("baseline"):
        raise CtxDistillError(f"the summary has no evaluated baseline for domain {domain!r}; run the pilot first")
    base = data["baseline"]["metrics"][metric]["value"]
    values: dict[str, dict[float, list[float]]] = {}
    for run in data.get("runs") or []:
        info = run.get("run", {})
        if metric in run.get("metrics", {}):
            values.setdefault(info["method"], {}).setdefault(float(info["lr"]), []).append(run["metrics"][metric]["value"])
    return {m: {lr: (sum(v) / len(v) - base) * scale(metric) for lr, v in sorted(by_lr.items())} for m, by_lr in values.items()}


def bracketing_lrs(gains: dict[float, float], target: float) -> tuple[list[float], str]:
    """The two adjacent learning rates (in increasing order) whose gains bracket `target`, the first such pair;
    else the two whose gains are nearest to it. Returns (lrs, how they were chosen)."""
    if len(gains) < 2:
        raise CtxDistillError(f"a bracket needs at least two learning rates in the pilot, got {len(gains)}")
    lrs = sorted(gains)
    for lo, hi in zip(lrs, lrs[1:]):
        if min(gains[lo], gains[hi]) <= target <= max(gains[lo], gains[hi]):
            return [lo, hi], f"their gains {gains[lo]:+.1f} and {gains[hi]:+.1f} bracket {target:+g}"
    nearest = sorted(sorted(lrs, key=lambda lr: abs(gains[lr] - target))[:2])
    return nearest, (f"no adjacent pair brackets {target:+g} (gains {', '.join(f'{lr:g}: {gains[lr]:+.1f}' for lr in lrs)}); "
                     "the two nearest, so the arm enters the matched-gain analysis only where its curve reaches the target")


def lowest_lr_reaching(gains: dict[str, dict[float, float]], threshold: float) -> tuple[float | None, str]:
    """The lowest learning rate at which every method's gain is at least `threshold` (None if there is none)."""
    common = sorted(set.intersection(*(set(by_lr) for by_lr in gains.values()))) if gains else []
    for lr in common:
        if all(by_lr[lr] >= threshold for by_lr in gains.values()):
            return lr, f"every method gains >= {threshold:g} at {lr:g} (" + ", ".join(f"{m} {g[lr]:+.1f}" for m, g in gains.items()) + ")"
    return None, f"no learning rate of {', '.join(f'{lr:g}' for lr in common) or 'the pilot'} gives every method {threshold:+g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctxdistill.experiments.pilots", description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", help="a study_summary.json")
    parser.add_argument("--domain", required=True, help="the pilot's domain name in the study")
    parser.add_argument("--metric", default="knowledge.mcq_loglik")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--bracket", type=float, help="target gain: the two adjacent lrs that bracket it, per method")
    rule.add_argument("--all-reach", type=float, help="threshold: the lowest lr at which every method reaches it")
    args = parser.parse_args(argv)
    try:
        gains = pilot_gains(json.loads(Path(args.summary).read_text(encoding="utf-8")), args.domain, args.metric)
        if not gains:
            raise CtxDistillError(f"domain {args.domain!r} has no evaluated run with {args.metric}")
        for method, by_lr in gains.items():
            print(f"{method}: " + ", ".join(f"lr {lr:g} {g:+.1f}" for lr, g in by_lr.items()))
        if args.bracket is not None:
            for method, by_lr in gains.items():
                lrs, why = bracketing_lrs(by_lr, args.bracket)
                print(f"{method}: lrs {[float(f'{lr:g}') for lr in lrs]}: {why}")
        else:
            lr, why = lowest_lr_reaching(gains, args.all_reach)
            print(f"lr {lr:g}: {why}" if lr is not None else why)
    except (CtxDistillError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"ctxdistill: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
