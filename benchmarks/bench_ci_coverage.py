"""Coverage self-check of every interval `ctxdistill.stats` prints: simulated studies with known true effects.

    python benchmarks/bench_ci_coverage.py --studies 4000 --out benchmarks/results/ci_coverage.json

Each scenario draws `--studies` independent studies (new items, new seeds, new noise) from a model whose
true difference is known, computes the interval the report would print and counts how often it holds
the truth. A 95 % interval should cover in 93-97 % of studies (with 4000 studies the Monte-Carlo SE of a
coverage of 0.95 is 0.0035). The `normal` rows are the interval the report printed before (mean ± 1.96 SE);
on the one-discordant-pair case it is expected to fail, and the check shows it does.

Scenarios (the sizes of the study in docs/study_v1/results.md):
- binary_paired_n32: one seed, 32 pass/fail items (IFEval prompts), 20 % discordant; Tango's interval.
- binary_1_discordant_n32: one seed, 32 items, one expected discordant pair (p10 = 1/32, p01 = 0).
- binary_2_seeds_few_discordant: 2 seeds x 32 items, ~3.5 discordant pairs per seed whose rates vary by
  seed (SD 0.02): the two-way t; `pooled_mcnemar` (one McNemar table over both seeds) for contrast.
- continuous_n6 / continuous_n24: one seed, per-item differences with skew (GSM8K gold log-probs on 6
  problems, chat KL on 24 prompts); Student t.
- clustered_instructions: 32 prompts with 1-3 instructions each, prompt effects: the cluster-robust t
  (and, as `naive`, the t that treats instructions as independent).
- seeds_2 / seeds_3: 2 or 3 seeds on 24 shared items with a between-seed SD equal to the item SD: the
  two-way interval; `items_only` ignores the seed term (the report's old pooling did).
- matched_gain: two methods' learning-rate curves (64 binary probes as the x axis, 24 chat prompts as
  the y axis, 4 learning rates), read at a gain between the 2nd and 3rd point; joint bootstrap over items
  (percentile interval, `--boot` resamples per study), for one method's change and for the difference,
  over the studies where the report prints an interval (both curves reach the gain in the data).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ctxdistill import stats  # noqa: E402

TARGET = (0.93, 0.97)


def covers(est: stats.Estimate, truth: float) -> bool:
    return est.defined and est.lo <= truth <= est.hi


def binary_pairs(rng, n: int, p10: float, p01: float, p11: float) -> tuple[np.ndarray, np.ndarray]:
    cell = rng.choice(4, size=n, p=[p10, p01, p11, 1 - p10 - p01 - p11])
    return (cell == 0) | (cell == 2), (cell == 1) | (cell == 2)


def scenario_binary(rng, studies: int, n: int, p10: float, p01: float, p11: float = 0.2) -> dict:
    truth = p10 - p01
    hit = {"tango": 0, "normal": 0}
    for _ in range(studies):
        a, b = binary_pairs(rng, n, p10, p01, p11)
        a, b = a.astype(float), b.astype(float)
        hit["tango"] += covers(stats.paired([a], [b]), truth)
        hit["normal"] += covers(stats.normal_estimate(a - b), truth) if (a != b).any() else truth == 0
    return {k: v / studies for k, v in hit.items()}


def scenario_binary_seeds(rng, studies: int, k: int = 2, n: int = 32, p10: float = 0.03, p01: float = 0.08, sd_seed: float = 0.02) -> dict:
    """k seeds of pass/fail items with few discordant pairs (~3.5 per seed) whose rates vary by seed."""
    hit = {"two_way": 0, "pooled_mcnemar": 0}
    truth = p10 - p01
    for _ in range(studies):
        A, B = [], []
        for _s in range(k):
            e = rng.normal(0, sd_seed)
            a, b = binary_pairs(rng, n, max(p10 + e, 0.0), max(p01 - e, 0.0), 0.2)
            A.append(a.astype(float))
            B.append(b.astype(float))
        hit["two_way"] += covers(stats.paired(A, B), truth)
        bb = int(sum(((x == 1) & (y == 0)).sum() for x, y in zip(A, B)))
        cc = int(sum(((x == 0) & (y == 1)).sum() for x, y in zip(A, B)))
        lo, hi = stats.tango_interval(bb, cc, n * k)
        hit["pooled_mcnemar"] += lo <= truth <= hi
    return {k_: v / studies for k_, v in hit.items()}


def scenario_continuous(rng, studies: int, n: int, mu: float = 0.05) -> dict:
    hit = {"t": 0, "normal": 0}
    for _ in range(studies):
        d = mu + rng.gamma(2.0, 0.05, size=n) - 0.1 + rng.normal(0, 0.05, size=n)  # skewed item differences, mean mu
        hit["t"] += covers(stats.paired([d], [np.zeros(n)], binary=False), mu)
        hit["normal"] += covers(stats.normal_estimate(d), mu)
    return {k: v / studies for k, v in hit.items()}


def scenario_clustered(rng, studies: int, prompts: int = 32) -> dict:
    hit = {"clustered": 0, "naive": 0}
    sizes = rng.integers(1, 4, size=prompts)
    clusters = [f"p{g}" for g, s in enumerate(sizes) for _ in range(s)]
    truth = 0.05
    for _ in range(studies):
        prompt_base = rng.normal(0.4, 0.25, size=prompts)  # some prompts are easy for both models, some hard
        base_p = np.clip(np.repeat(prompt_base, sizes), 0.02, 0.98)
        shift = rng.normal(truth, 0.15, size=prompts)  # the update helps some prompts and hurts others
        new_p = np.clip(base_p + np.repeat(shift, sizes), 0.0, 1.0)
        # the truth over a random prompt population: E[new_p - base_p]; clipping biases it, so measure it on a big draw
        u = rng.random(len(clusters))
        a, b = (u < new_p).astype(float), (u < base_p).astype(float)
        est = stats.paired([a], [b], clusters=clusters, binary=True)
        hit["clustered"] += covers(est, POP_TRUTH["clustered"])
        hit["naive"] += covers(stats.t_estimate(np.atleast_2d(a - b), "naive"), POP_TRUTH["clustered"])
    return {k: v / studies for k, v in hit.items()}


POP_TRUTH: dict[str, float] = {}


def clustered_truth(rng, draws: int = 400_000) -> float:
    base = np.clip(rng.normal(0.4, 0.25, size=draws), 0.02, 0.98)
    new = np.clip(base + rng.normal(0.05, 0.15, size=draws), 0.0, 1.0)
    return float((new - base).mean())


def scenario_seeds(rng, studies: int, k: int, n: int = 24, mu: float = 0.03, sd_item: float = 0.05, sd_seed: float = 0.05,
                   sd_noise: float = 0.05) -> dict:
    hit = {"two_way": 0, "items_only": 0}
    for _ in range(studies):
        d = mu + rng.normal(0, sd_item, size=n)[None, :] + rng.normal(0, sd_seed, size=k)[:, None] + rng.normal(0, sd_noise, size=(k, n))
        est = stats.paired(list(d), [np.zeros(n)] * k, binary=False)
        hit["two_way"] += covers(est, mu)
        avg = d.mean(axis=0)
        hit["items_only"] += covers(stats.t_estimate(avg[None, :], "items only"), mu)
    return {k_: v / studies for k_, v in hit.items()}


def scenario_matched(rng, studies: int, boot: int = 200, n_probes: int = 64, n_prompts: int = 24, target: float = 0.15) -> dict:
    """Method A: KL slope 0.5 per unit of domain gain; method B: slope 0.8. Gains 0.05, 0.1, 0.2, 0.3 (lrs)."""
    gains = np.array([0.05, 0.1, 0.2, 0.3])
    slopes = {"a": 0.5, "b": 0.8}
    truth_a, truth_diff = slopes["a"] * target, (slopes["a"] - slopes["b"]) * target
    hit = {"bootstrap_one_method": 0, "bootstrap_difference": 0}
    printed = {"bootstrap_one_method": 0, "bootstrap_difference": 0}  # the report prints an interval only where the point is reached
    reach = []
    for _ in range(studies):
        p = rng.uniform(0.1, 0.4, size=n_probes)  # probe difficulty (population mean 0.25)
        scale_i = rng.lognormal(0.0, 0.5, size=n_prompts)
        scale_i /= math.exp(0.125)  # population mean 1: the true KL of a run is slope * gain
        base_dom = (rng.random(n_probes) < p).astype(float)
        runs = {}
        for m, slope in slopes.items():
            dom = [(rng.random(n_probes) < p + g).astype(float) for g in gains]
            kl = [scale_i * slope * g * rng.lognormal(-0.02, 0.2, size=n_prompts) for g in gains]
            runs[m] = (dom, kl)
        idx_p = rng.integers(0, n_probes, size=(boot, n_probes))
        idx_c = rng.integers(0, n_prompts, size=(boot, n_prompts))
        values, points = {}, {}
        for m, (dom, kl) in runs.items():
            base_d = stats.resampled_means(base_dom, idx_p)
            curve = stats.Curve([base_d] + [stats.resampled_means(x, idx_p) for x in dom],
                                [np.zeros(boot)] + [stats.resampled_means(x, idx_c) for x in kl])
            values[m] = stats.curve_values(curve, target)  # the report's reading: each resample's initial score + the gain
            pts = [(base_dom.mean(), 0.0)] + [(x.mean(), y.mean()) for x, y in zip(dom, kl)]
            points[m] = stats.interpolate_at(pts, pts[0][0] + target)
        one = stats.bootstrap_summary(values["a"], points["a"])
        diff = stats.bootstrap_summary(values["a"] - values["b"], None if points["a"] is None or points["b"] is None else points["a"] - points["b"])
        reach.append(one["reach"])
        for name, summ, truth in (("bootstrap_one_method", one, truth_a), ("bootstrap_difference", diff, truth_diff)):
            if summ["value"] is not None and summ["lo"] is not None:
                printed[name] += 1
                hit[name] += summ["lo"] <= truth <= summ["hi"]
    return {k: v / max(printed[k], 1) for k, v in hit.items()} | {"mean_reach": float(np.mean(reach)),
                                                                  "printed_share": printed["bootstrap_difference"] / studies}


def run(studies: int = 4000, seed: int = 0, boot: int = 200) -> dict:
    POP_TRUTH["clustered"] = clustered_truth(np.random.default_rng(seed + 1))
    scenarios = {
        "binary_paired_n32": lambda rng: scenario_binary(rng, studies, 32, 0.12, 0.08),
        "binary_1_discordant_n32": lambda rng: scenario_binary(rng, studies, 32, 1 / 32, 0.0),
        "binary_2_seeds_few_discordant": lambda rng: scenario_binary_seeds(rng, studies),
        "continuous_n6": lambda rng: scenario_continuous(rng, studies, 6),
        "continuous_n24": lambda rng: scenario_continuous(rng, studies, 24),
        "clustered_instructions": lambda rng: scenario_clustered(rng, studies),
        # between-seed variance equal to one seed's item-sampling variance (the news study: seeds differ by about one SE)
        "seeds_2": lambda rng: scenario_seeds(rng, studies, 2, sd_seed=math.hypot(0.05, 0.05) / math.sqrt(24)),
        "seeds_3": lambda rng: scenario_seeds(rng, studies, 3, sd_seed=math.hypot(0.05, 0.05) / math.sqrt(24)),
        # seed-dominated: seed SD = item SD (12x the item-sampling variance); 2 seeds cannot estimate it
        "seeds_2_seed_dominated": lambda rng: scenario_seeds(rng, studies, 2, sd_seed=0.05),
        "seeds_3_seed_dominated": lambda rng: scenario_seeds(rng, studies, 3, sd_seed=0.05),
        "matched_gain": lambda rng: scenario_matched(rng, studies, boot),
    }
    # each scenario its own random stream (seed, index): adding one does not change the others
    results = {name: fn(np.random.default_rng([seed, i])) for i, (name, fn) in enumerate(scenarios.items())}
    # the intervals the report prints; the others are shown for contrast
    printed = {"binary_paired_n32": "tango", "binary_1_discordant_n32": "tango", "binary_2_seeds_few_discordant": "two_way", "continuous_n6": "t", "continuous_n24": "t",
               "clustered_instructions": "clustered", "seeds_2": "two_way", "seeds_3": "two_way"}
    checks = {f"{s}/{k}": v for s, k in printed.items() for v in [results[s][k]] if s not in KNOWN_LIMITS}
    checks["matched_gain/bootstrap_one_method"] = results["matched_gain"]["bootstrap_one_method"]
    checks = {k: float(v) for k, v in checks.items()}
    passed = {k: bool(TARGET[0] <= v <= TARGET[1]) for k, v in checks.items()}
    limits = {f"{s}/{k}": {"coverage": float(results[s][k]), "why": why} for s, (k, why) in KNOWN_LIMITS.items()}
    return {"studies": studies, "seed": seed, "bootstrap_resamples": boot, "target": TARGET, "coverage": results,
            "checks": checks, "passed": passed, "all_passed": all(passed.values()), "known_limits": limits}


# printed intervals outside the band by the nature of the data, reported rather than checked
KNOWN_LIMITS = {
    "binary_1_discordant_n32": ("tango", "conservative: with about one discordant pair only 0-4 discordant pairs occur, and no "
                                          "non-randomised interval can cover exactly 95 %; the normal interval covers ~65 %"),
    "seeds_2_seed_dominated": ("two_way", "undercovers: two seeds give a 1-df estimate of a seed variance that dominates the error; "
                                          "train more seeds"),
    "seeds_3_seed_dominated": ("two_way", "at the lower edge: a 2-df estimate of a dominating seed variance"),
    "matched_gain": ("bootstrap_difference", "conservative (0.97-0.98 over several runs of this check): a difference it "
                                             "shows is safe, but it can miss one; the one-method interval is at 0.94"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    result = run(args.studies, args.seed, args.boot)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
                         "command": "python benchmarks/bench_ci_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{'scenario':42s} {'interval':22s} coverage")
    for scenario, cov in result["coverage"].items():
        for name, value in cov.items():
            if name in ("mean_reach", "printed_share"):
                label = "(share reaching gain)" if name == "mean_reach" else "(studies with a point)"
                print(f"{scenario:42s} {label:22s} {value:.3f}")
                continue
            key = f"{scenario}/{name}"
            mark = (("ok" if result["passed"][key] else "OUT OF 0.93-0.97") if key in result["passed"] else
                    "known limit (see known_limits)" if key in result["known_limits"] else "(contrast, not printed)")
            print(f"{scenario:42s} {name:22s} {value:.3f}  {mark}")
    print(f"all checked intervals within {TARGET[0]}-{TARGET[1]}: {result['all_passed']} ({result['seconds']} s)")
    for key, limit in result["known_limits"].items():
        print(f"known limit {key}: {limit['coverage']:.3f}, {limit['why']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
