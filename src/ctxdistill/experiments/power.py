"""The `decision` preset's subset sizes, from a power calculation on an existing study's per-item scores.

    python -m ctxdistill.experiments.power docs/study_v1/results/study_summary.json

For each task: the spread of the paired differences observed in the study, for the two comparisons a
decision rests on: each run against the initial model (what the CP rules read) and DiSC against FT
(same learning rate and seed); for pass/fail items the share of discordant items q, for continuous ones
the SD of the per-item difference; the larger need of the two counts. The items a paired two-sided test at alpha = 0.05 needs for 80 % power to
detect the task's target difference d are n = (z_0.975 + z_0.8)^2 * var / d^2, with var = q − d^2 for
pass/fail items and SD^2 for continuous ones. The size is n, capped by the items the task has and by
the CPU budget (seconds per item measured in the same study at its generation lengths, 1 thread on the
2-core machine; when the sizes do not fit `BUDGET_S`, every task but IFEval shrinks in proportion).
The targets: 5 points for rates (the CP rule's threshold); for the continuous measures, about the
smallest DiSC − FT difference the study reports as a finding.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from .. import stats

# metric -> (preset key, target difference, items available, the task whose seconds per item it costs)
TARGETS = {
    "ifeval.prompt_strict": ("ifeval", 0.05, 541, "ifeval"),
    "mmlu.accuracy": ("mmlu", 0.05, 14042, "mmlu"),
    "pubmedqa.accuracy": ("pubmedqa", 0.05, 500, "pubmedqa"),
    "nq_open.gold_logprob": ("nq_open", 0.05, 1769, "nq_open"),
    "gsm8k.gold_logprob": ("gsm8k", 0.02, 1319, "gsm8k"),
    "drift.chat_kl": ("chat_prompts", 0.02, 24, "drift"),
    "knowledge.mcq_loglik": ("probes_loglik", 0.05, 124, "knowledge"),
}
BUDGET_S = 4500.0  # one evaluation on one CPU thread: 75 minutes
PAIR = ("disc", "ft")


def _spread(diffs: list[np.ndarray], binary: bool) -> dict:
    if not diffs:
        return {"pairs": 0}
    d = np.concatenate(diffs)
    return {"pairs": len(diffs), "items": len(d), "binary": bool(binary), "discordance": float(np.mean(d != 0)),
            "sd": float(d.std(ddof=1)), "mean": float(d.mean())}


def observed_spread(summary: dict, key: str) -> dict:
    """{"vs_initial": ..., "disc_vs_ft": ...}: pooled over every such pair of the study (same items; DiSC − FT at the
    same lr and seed): discordance (binary) or SD (continuous) of the per-item differences."""
    from .comparisons import _vectors, group_runs, seed_pairs

    found = {"vs_initial": ([], True), "disc_vs_ft": ([], True)}

    def add(which, a, b):
        got = _vectors([a], [b], key)
        if isinstance(got, str):
            return
        A, B, _ = got
        diffs, binary = found[which]
        found[which] = (diffs + [A[0] - B[0]], binary and stats.is_binary(A[0]) and stats.is_binary(B[0]))

    for data in summary.get("domains", {}).values():
        runs = [dict(r, _path="x") for r in data.get("runs", [])]
        if data.get("baseline"):
            for r in runs:
                add("vs_initial", r, data["baseline"])
        groups = group_runs(runs)
        if all(m in groups for m in PAIR):
            for lr in set(groups[PAIR[0]]) & set(groups[PAIR[1]]):
                for a, b in zip(*seed_pairs(groups[PAIR[0]][lr], groups[PAIR[1]][lr])):
                    add("disc_vs_ft", a, b)
    return {which: _spread(*v) for which, v in found.items()}


def seconds_per_item(summary: dict, task: str, key: str) -> float | None:
    per = []
    for data in summary.get("domains", {}).values():
        for e in [data.get("baseline")] + list(data.get("runs", [])):
            if not e or task not in (e.get("timings_s") or {}) or key not in e.get("metrics", {}):
                continue
            per.append(e["timings_s"][task] / e["metrics"][key]["n"])
    return float(np.median(per)) if per else None


def required_n(spread: dict, target: float, power: float = 0.8) -> int | None:
    if not spread.get("pairs"):
        return None
    var = spread["discordance"] - target ** 2 if spread["binary"] else spread["sd"] ** 2
    return stats.n_for_power(target, math.sqrt(max(var, 1e-12)), power)


def decision_sizes(summary: dict, budget_s: float = BUDGET_S) -> list[dict]:
    rows = []
    for key, (preset_key, target, available, task) in TARGETS.items():
        spreads = observed_spread(summary, key)
        needs = {which: required_n(sp, target) for which, sp in spreads.items()}
        if key.startswith("drift."):  # a KL from the initial model is > 0 by construction: only the method difference is a question
            needs["vs_initial"] = None
        which = max((w for w in needs if needs[w] is not None), key=lambda w: needs[w], default="vs_initial")
        rows.append({"metric": key, "preset": preset_key, "target": target, "available": available, "needs": needs, "by": which,
                     **spreads[which], "required": needs[which], "seconds_per_item": seconds_per_item(summary, task, key)})
    for row in rows:
        row["size"] = min(row["required"] or row["available"], row["available"])
    cost = lambda r: r["size"] * (r["seconds_per_item"] or 0.0)
    total, ifeval = sum(map(cost, rows)), sum(cost(r) for r in rows if r["metric"] == "ifeval.prompt_strict")
    if total > budget_s:  # IFEval keeps its size; the rest shrink in proportion
        factor = max(budget_s - ifeval, 0.0) / (total - ifeval)
        for row in rows:
            if row["metric"] != "ifeval.prompt_strict":
                row["size"] = max(1, int(row["size"] * factor))
    for row in rows:
        row["seconds"] = cost(row)
        row["power_at_size"] = (stats.power_paired_binary(row["size"], row["target"], row["discordance"]) if row.get("binary")
                                else _power_continuous(row["size"], row["target"], row.get("sd")))
    return rows


def _power_continuous(n: int, delta: float, sd: float | None) -> float | None:
    if not sd:
        return None
    z = stats.sps.norm.ppf(0.975)
    return float(stats.sps.norm.cdf(delta * math.sqrt(n) / sd - z))


def markdown(rows: list[dict]) -> str:
    lines = ["| metric | target d | n for 80 % power: vs initial / DiSC − FT | spread of the larger | s per item | size | power at size |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = ((f"q = {r['discordance']:.3f}" if r.get("binary") else f"SD = {r['sd']:.4f}") + f" ({r['pairs']} pairs, {r['items']} items)"
                  if r.get("pairs") else "not measured")
        needs = " / ".join(str(r["needs"][w] or "–") for w in ("vs_initial", "disc_vs_ft"))
        sec = f"{r['seconds_per_item']:.2f}" if r["seconds_per_item"] else "–"
        power = f"{r['power_at_size']:.2f}" if r["power_at_size"] is not None else "–"
        lines.append(f"| {r['metric']} | {r['target']:g} | {needs} | {spread} | {sec} | {r['size']} of {r['available']} | {power} |")
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"Estimated evaluation time at these sizes: {total / 60:.0f} min on one thread (budget {BUDGET_S / 60:.0f} min)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the decision preset's sizes from a study summary's per-item scores")
    ap.add_argument("summary")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = decision_sizes(json.loads(open(args.summary, encoding="utf-8").read()))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
