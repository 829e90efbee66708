"""Comparisons the reports print: metrics and their scale, runs grouped by method and learning rate,
paired differences between runs (or from the initial model) over identical item ids, seed-aware.

The estimators themselves are in `ctxdistill.stats`; this module lines evaluations up for them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import stats
from ..errors import CtxDistillError

# key -> (label, kind): "prop" are proportions shown in points (x100); "nats" are continuous
METRICS = {
    "knowledge.mcq_sampled": ("Domain MCQ (majority of 5)", "prop"),
    "knowledge.mcq_loglik": ("Domain MCQ (log-lik)", "prop"),
    "knowledge.short_f1": ("Domain short-answer F1", "prop"),
    "knowledge.gold_option_logprob": ("Domain gold option log-prob", "nats"),
    "knowledge.option_margin": ("Domain margin log p(gold) − log p(other)", "nats"),
    "ifeval.inst_strict": ("IFEval inst. strict", "prop"),
    "ifeval.prompt_strict": ("IFEval prompt strict", "prop"),
    "gsm8k.accuracy": ("GSM8K", "prop"),
    "humaneval.pass@1": ("HumanEval pass@1", "prop"),
    "nq_open.em": ("NQ-open EM", "prop"),
    "nq_open.contains": ("NQ-open contains", "prop"),
    "mmlu.accuracy": ("MMLU", "prop"),
    "pubmedqa.accuracy": ("PubMedQA", "prop"),
    "drift.chat_logprob": ("Chat log-prob of initial replies", "nats"),
    "gsm8k.gold_logprob": ("GSM8K gold log-prob", "nats"),
    "nq_open.gold_logprob": ("NQ gold log-prob", "nats"),
    "drift.chat_kl": ("Chat KL(init‖model)", "kl"),
    "drift.doc_kl": ("Per-token KL on train docs", "kl"),
}
SKILLS = ("ifeval.inst_strict", "gsm8k.accuracy", "humaneval.pass@1")


def scale(key: str) -> float:
    return 100.0 if METRICS.get(key, ("", "prop"))[1] == "prop" else 1.0


def load_evals(runs_dir: Path) -> tuple[dict | None, list[dict]]:
    """(baseline, runs) from every eval.json under `runs_dir`."""
    baseline, runs = None, []
    for path in sorted(Path(runs_dir).rglob("eval.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CtxDistillError(f"{path} is not valid JSON ({exc.msg}); delete it and re-run the evaluation") from None
        except (UnicodeDecodeError, RecursionError) as exc:
            raise CtxDistillError(f"{path} is not a readable eval.json ({type(exc).__name__}); delete it and re-run the evaluation") from None
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
            what = "has no `metrics` mapping" if isinstance(data, dict) else f"holds a {type(data).__name__}, not an evaluation"
            raise CtxDistillError(f"{path} {what}; it was not written by `ctxdistill eval`: remove it from {runs_dir} or re-run the evaluation")
        data["_path"] = str(path)
        if data.get("role") == "baseline" and (baseline is None or path.parent.name == "baseline"):
            baseline = data
        elif data.get("role") != "baseline":
            runs.append(data)
    return baseline, runs


KL_KEYS = ("drift.chat_kl", "drift.doc_kl", "drift.doc_kl_bits")
FALLBACK = {"ifeval.inst_strict": "ifeval.prompt_strict"}  # for the confidence-aware CP rule, when a skill has no per-item scores


def task_of(key: str) -> str:
    return "doc_kl" if key.startswith("drift.doc_kl") else key.split(".")[0]


def item_vector(ev: dict, key: str) -> tuple[list | None, list | None]:
    """(per-item scores, their ids) of one metric of one evaluation; ids repeat for clustered items."""
    scores = (ev.get("item_scores") or {}).get(key)
    ids = (ev.get("item_ids") or {}).get(key) or (ev.get("tasks") or {}).get(task_of(key), {}).get("ids")
    return scores, ids


def _vectors(evs_a: list[dict], evs_b: list[dict], key: str):
    """Per-seed item scores of A and B on the same items, and the clusters; or the reason there are none."""
    A, B, first = [], [], None
    for x, y in zip(evs_a, evs_b):
        sx, ix = item_vector(x, key)
        sy, iy = item_vector(y, key)
        if sy is None and key in KL_KEYS and y.get("role") == "baseline" and sx is not None:
            sy, iy = [0.0] * len(sx), ix  # the initial model's KL from itself is 0 on every item
        if sx is None or sy is None:
            return stats.NO_ITEMS
        if len(sx) != len(sy) or (ix is not None or iy is not None) and ix != iy:
            return stats.OTHER_ITEMS
        if first is not None and (ix != first or len(sx) != len(A[0])):
            return stats.OTHER_ITEMS  # seeds scored different items: cannot be stacked
        first = ix
        A.append(np.asarray(sx, float))
        B.append(np.asarray(sy, float))
    if not A:
        return stats.NO_ITEMS
    clusters = first if first is not None and len(set(first)) < len(first) else None
    return A, B, clusters


def metric_delta(evs_a: list[dict], evs_b: list[dict], key: str) -> float | None:
    vals = [(x["metrics"].get(key), y["metrics"].get(key, {"value": 0.0} if key in KL_KEYS else None)) for x, y in zip(evs_a, evs_b)]
    vals = [(a["value"], b["value"]) for a, b in vals if a is not None and b is not None]
    return sum(a - b for a, b in vals) / len(vals) if vals and all(math.isfinite(a - b) for a, b in vals) else None


def compare(evs_a: list[dict], evs_b: list[dict], key: str) -> stats.Estimate:
    """A − B on one metric: evs_a[i] and evs_b[i] are the same seed (or B is the initial model)."""
    got = _vectors(evs_a, evs_b, key)
    if isinstance(got, str):
        return stats.undefined(got, metric_delta(evs_a, evs_b, key))
    A, B, clusters = got
    return stats.paired(A, B, clusters)


def vs_base(runs: list[dict], base: dict, key: str) -> stats.Estimate:
    return compare(runs, [base] * len(runs), key)


def seed_pairs(runs_a: list[dict], runs_b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs of A and B trained with the same seed, in seed order."""
    by_seed = {r.get("run", {}).get("seed"): r for r in runs_b}
    pairs = sorted(((r.get("run", {}).get("seed"), r) for r in runs_a if r.get("run", {}).get("seed") in by_seed), key=lambda t: str(t[0]))
    return [r for _, r in pairs], [by_seed[s] for s, _ in pairs]


def difference(run: dict, base: dict, key: str) -> dict | None:
    """run − base for one metric: {"delta", "se", "lo", "hi", "p", "kind"} (kind "paired" or the reason there is no interval)."""
    est = compare([run], [base], key)
    if est.delta is None:
        return None
    return {"delta": est.delta, "se": est.se, "lo": est.lo, "hi": est.hi, "p": est.p, "kind": "paired" if est.defined else est.reason}


def group_runs(runs: list[dict]) -> dict[str, dict[float, list[dict]]]:
    """method -> lr -> [runs over seeds]."""
    groups: dict[str, dict[float, list[dict]]] = {}
    for r in runs:
        info = r.get("run", {})
        method, lr = info.get("method") or Path(r["_path"]).parent.name, float(info.get("lr") or 0.0)
        groups.setdefault(method, {}).setdefault(lr, []).append(r)
    return {m: dict(sorted(v.items())) for m, v in sorted(groups.items())}


def mean_metric(runs: list[dict], key: str) -> dict | None:
    """The metric over seeds: mean, SE and 95 % half-width from the item scores (two-way over items and seeds
    when they share items; the eval's own SE for one seed without item scores; None when undefined)."""
    vals = [r["metrics"][key] for r in runs if key in r["metrics"] and math.isfinite(r["metrics"][key]["value"])]
    if not vals:
        return None
    value = sum(v["value"] for v in vals) / len(vals)
    got = _vectors(runs, runs, key) if len(vals) == len(runs) else stats.NO_ITEMS
    se, half = None, None
    if not isinstance(got, str):
        u = stats.cluster_totals(np.stack(got[0]), got[2])
        if u.shape[1] > 1:
            _, se, df = stats.two_way(u)
            half = float(stats.sps.t.ppf(0.975, df) * se) if se > 0 else 0.0
    elif len(vals) == 1 and vals[0].get("stderr") is not None and math.isfinite(vals[0]["stderr"]):
        se = vals[0]["stderr"]
        half = 1.96 * se
    return {"value": value, "stderr": se, "half": half, "n": vals[0]["n"], "seeds": len(vals)}


def digits_of(key: str) -> int:
    return 1 if scale(key) == 100 else (4 if METRICS.get(key, ("", ""))[1] == "kl" else 3)


def probe_round_accuracy(evaluation: dict, probe_round: dict, key: str = "knowledge.mcq_loglik") -> dict[int, dict]:
    """Accuracy (mean, SE, n) on the probes of each round, from an evaluation's per-item scores."""
    scores = evaluation.get("item_scores", {}).get(key)
    ids = evaluation.get("tasks", {}).get("knowledge", {}).get("ids")
    if not scores or not ids or len(scores) != len(ids):
        return {}
    by_round: dict[int, list[float]] = {}
    for pid, score in zip(ids, scores):
        if pid in probe_round:
            by_round.setdefault(int(probe_round[pid]), []).append(float(score))
    out = {}
    for r, xs in sorted(by_round.items()):
        mean = sum(xs) / len(xs)
        se = math.sqrt(mean * (1 - mean) / len(xs)) if len(xs) > 1 else 0.0
        out[r] = {"value": mean, "stderr": se, "n": len(xs)}
    return out
