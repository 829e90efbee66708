"""The statistics behind every comparison `ctxdistill report` and `ctxdistill study` print.

One question, asked many times: is method A's score different from B's (or from the initial model's),
on the same evaluation items, over the seeds that were trained? The answer is an `Estimate`: the mean
per-item difference, its standard error, a 95 % interval, a two-sided p-value, and, where none can be
computed, the reason (printed as "—", never as "not significant").

- **Paired and clustered.** Differences are taken item by item over identical item ids. Items that
  share a cluster (the instructions of one IFEval prompt) are summed per cluster first, so the SE is a
  cluster-robust one (linearised ratio of cluster totals).
- **Seeds.** With k seeds on the same items the per-item differences form a k × n table. The mean's
  variance is estimated from the two-way (items × seeds) ANOVA as Var = (MS_items + MS_seeds)/(nk), which
  exceeds the unbiased (MS_items + MS_seeds − MS_error)/(nk) by MS_error/(nk) (the unbiased form
  undercovers with 2-3 seeds, benchmarks/bench_ci_coverage.py), with Satterthwaite degrees of freedom: the
  between-seed variance is part of the error bar, and two seeds give few degrees of freedom. With one
  seed the interval is conditional on that seed (the model that was trained), which is all one seed
  can say.
- **Binary outcomes, one seed.** The exact McNemar (sign) test on the discordant pairs, and Tango's
  score interval for the difference of paired proportions (non-degenerate with 0 or 1 discordant pairs,
  where the normal interval collapses to ±0). Several seeds: the two-way t below (pooling the seeds'
  pairs into one McNemar table ignores the seed variance); pooled only when that SE is 0.
- **Continuous outcomes, one seed.** Student t with n − 1 degrees of freedom (n = 6 is not a normal
  sample size).
- **Families.** Holm's step-down adjustment within each table (`holm`), the family size printed.
- **Matched gain.** `matched_gain_bootstrap` resamples the items of every task together (the same
  items for every run and the baseline), re-runs the learning-rate interpolation in each resample and
  returns the percentile interval and the share of resamples that reach the target at all.
- **MDE.** `mde(se)` = 2 SE, the smallest difference a table can flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize
from scipy import stats as sps

LEVEL = 0.95
NO_ITEMS = "no per-item scores"
OTHER_ITEMS = "different items"


@dataclass
class Estimate:
    delta: float | None = None
    se: float | None = None
    lo: float | None = None
    hi: float | None = None
    p: float | None = None
    n: int = 0
    seeds: int = 0
    method: str = ""
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def defined(self) -> bool:
        return self.lo is not None and self.hi is not None and self.p is not None

    def excludes_zero(self) -> bool:
        return self.defined and (self.lo > 0 or self.hi < 0)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("delta", "se", "lo", "hi", "p", "n", "seeds", "method", "reason")}


def undefined(reason: str, delta: float | None = None) -> Estimate:
    return Estimate(delta=delta, reason=reason, method="none")


# ------------------------------------------------------------------ aligning items


def align(x: list[float], x_ids: list, y: list[float], y_ids: list) -> tuple[np.ndarray, list] | None:
    """x − y over the item ids both hold, in x's order. Repeated ids (clustered items) must repeat in the same
    order in both. None when the ids differ (the two evaluations did not score the same items)."""
    if x is None or y is None or x_ids is None or y_ids is None or len(x) != len(x_ids) or len(y) != len(y_ids):
        return None
    if list(x_ids) != list(y_ids):
        return None
    return np.asarray(x, float) - np.asarray(y, float), list(x_ids)


def cluster_totals(d: np.ndarray, clusters: list | None) -> np.ndarray:
    """k × N item differences -> k × G linearised cluster scores u whose plain mean is the item mean and whose
    item-wise variance gives the cluster-robust SE: u_g = G/N · (T_g − mean·N_g) + mean."""
    d = np.atleast_2d(np.asarray(d, float))
    if clusters is None or len(set(clusters)) == len(clusters):
        return d
    keys = list(dict.fromkeys(clusters))
    index = {c: i for i, c in enumerate(keys)}
    g = np.array([index[c] for c in clusters])
    G, N = len(keys), d.shape[1]
    sizes = np.bincount(g, minlength=G).astype(float)
    totals = np.stack([np.bincount(g, weights=row, minlength=G) for row in d])
    mean = d.mean(axis=1, keepdims=True)
    return G / N * (totals - mean * sizes) + mean


# ------------------------------------------------------------------ estimators


def two_way(u: np.ndarray) -> tuple[float, float, float]:
    """(mean, SE, df) of the grand mean of a k × n table (seeds × items), two-way random effects."""
    u = np.atleast_2d(np.asarray(u, float))
    k, n = u.shape
    g = u.mean()
    if k == 1:
        se = u.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
        return g, se, n - 1
    item_means, seed_means = u.mean(axis=0), u.mean(axis=1)
    ms_item = k * ((item_means - g) ** 2).sum() / (n - 1)
    ms_seed = n * ((seed_means - g) ** 2).sum() / (k - 1)
    # (MS_items + MS_seeds) / nk, always: the unbiased form (− MS_error/nk), or dropping the seed term when
    # MS_seeds < MS_error, undercovers with 2-3 seeds (benchmarks/bench_ci_coverage.py)
    var = (ms_item + ms_seed) / (n * k)
    df = (ms_item + ms_seed) ** 2 / (ms_item ** 2 / (n - 1) + ms_seed ** 2 / (k - 1)) if var > 0 else n - 1
    return g, math.sqrt(max(var, 0.0)), df


def t_estimate(u: np.ndarray, method: str) -> Estimate:
    mean, se, df = two_way(u)
    mean, se = float(mean), float(se)
    k, n = np.atleast_2d(u).shape
    if not math.isfinite(se) or n < 2:
        return undefined("fewer than 2 items", mean)
    if se == 0:
        return Estimate(mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0, n, k, method,
                        notes=["every item difference is identical"])
    q = sps.t.ppf(0.5 + LEVEL / 2, df)
    p = 2 * sps.t.sf(abs(mean) / se, df)
    return Estimate(mean, se, mean - q * se, mean + q * se, float(p), n, k, method)


def normal_estimate(d: np.ndarray) -> Estimate:
    """The interval the report used to print (mean ± 1.96 SE): kept for the coverage check, which shows it fail."""
    d = np.asarray(d, float)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    z = sps.norm.ppf(0.5 + LEVEL / 2)
    p = 2 * sps.norm.sf(abs(mean) / se) if se > 0 else float(mean == 0)
    return Estimate(mean, se, mean - z * se, mean + z * se, p, len(d), 1, "normal")


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b of the b + c discordant pairs favour A (sign test at 1/2)."""
    if b + c == 0:
        return 1.0
    return float(sps.binomtest(b, b + c, 0.5).pvalue)


def tango_interval(b: int, c: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Tango's (1998) score interval for p_A − p_B from n pairs, b with only A right and c with only B right."""
    z = sps.norm.ppf(0.5 + level / 2)
    est = (b - c) / n

    def score(delta: float) -> float:
        w = -b - c + (2 * n - b + c) * delta
        q = (math.sqrt(max(w * w + 8 * n * c * delta * (1 - delta), 0.0)) - w) / (4 * n)
        var = n * (2 * q + delta * (1 - delta))
        num = b - c - n * delta
        if var > 0:
            return num / math.sqrt(var)
        return 0.0 if num == 0 else math.copysign(math.inf, num)

    eps = 1e-12
    lo = -1.0 if score(-1 + eps) <= z else optimize.brentq(lambda x: score(x) - z, -1 + eps, est)
    hi = 1.0 if score(1 - eps) >= -z else optimize.brentq(lambda x: score(x) + z, est, 1 - eps)
    return float(max(-1.0, lo)), float(min(1.0, hi))


def is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def paired(a: list[np.ndarray], b: list[np.ndarray], clusters: list | None = None, binary: bool | None = None) -> Estimate:
    """A − B from per-seed item scores (each a length-N array over the same items, one per seed, seeds matched).

    One seed, binary, unclustered items: exact McNemar p and Tango's interval. Otherwise: cluster-robust
    two-way (items × seeds) t, also for binary items with few discordant pairs (pooling the seeds into one
    McNemar table ignores the seed variance and undercovers, bench_ci_coverage.py); pooled only when the
    two-way SE is 0 (every item difference identical in every seed, e.g. no discordant pair at all)."""
    if not a or not b or len(a) != len(b):
        return undefined(NO_ITEMS)
    A, B = np.stack([np.asarray(x, float) for x in a]), np.stack([np.asarray(x, float) for x in b])
    if A.shape != B.shape or A.shape[1] < 2:
        return undefined(NO_ITEMS if A.shape[1:] == B.shape[1:] else OTHER_ITEMS)
    binary = is_binary(A) and is_binary(B) if binary is None else binary
    k = A.shape[0]
    u = cluster_totals(A - B, clusters)
    if binary and (clusters is None or len(set(clusters)) == len(clusters)):
        bb, cc = int(((A == 1) & (B == 0)).sum()), int(((A == 0) & (B == 1)).sum())
        if k == 1 or two_way(u)[1] == 0:  # several seeds: pooled only where the two-way SE is degenerate
            n = A.size
            lo, hi = tango_interval(bb, cc, n)
            est = Estimate((bb - cc) / n, math.sqrt(max(bb + cc - (bb - cc) ** 2 / n, 0)) / n, lo, hi, mcnemar_exact(bb, cc),
                           A.shape[1], k, "McNemar exact + Tango score interval", notes=[f"{bb + cc} discordant pairs"])
            if k > 1:
                est.notes.append("seeds pooled: every item difference is the same in every seed")
            return est
    return t_estimate(u, "t, clustered by item" + (" and seed (two-way)" if k > 1 else ""))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None stays None and does not count in the family)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def mde(se: float | None, k: float = 2.0) -> float | None:
    """Minimum detectable difference at k standard errors (the report's 2-SE rule)."""
    return None if se is None or not math.isfinite(se) else k * se


def power_paired_binary(n: int, delta: float, discordance: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired test (normal approximation to McNemar) for a difference `delta` of paired
    proportions when a share `discordance` of the items is discordant."""
    if discordance <= 0 or n <= 0:
        return 0.0
    var = discordance - delta ** 2
    if var <= 0:
        return 1.0
    z = sps.norm.ppf(1 - alpha / 2)
    return float(sps.norm.cdf(abs(delta) * math.sqrt(n) / math.sqrt(var) - z))


def n_for_power(delta: float, sd: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Items a paired comparison with per-item difference SD `sd` needs to detect `delta` with `power`."""
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return int(math.ceil((z * sd / delta) ** 2))


# ------------------------------------------------------------------ matched gain


def interpolate_at(points: list[tuple[float, float]], target: float) -> float | None:
    """The metric where a curve (domain, metric), in learning-rate order, first reaches `target` (linear)."""
    for (d0, m0), (d1, m1) in zip(points, points[1:]):
        if min(d0, d1) <= target <= max(d0, d1) and d1 != d0:
            return m0 + (m1 - m0) * (target - d0) / (d1 - d0)
    for d, m in points:
        if d == target:
            return m
    return None


@dataclass
class Curve:
    """One method's learning-rate curve as resampled means: domain[i] and metric[i] are (B,) arrays (mean over
    seeds at the i-th learning rate, in each bootstrap resample); the first point is the initial model."""
    domain: list[np.ndarray]
    metric: list[np.ndarray]


def curve_values(curve: Curve, gain: float) -> np.ndarray:
    """Per resample: the metric where the curve first reaches its own initial score (first point) plus `gain`
    (NaN where it never does): the initial model's score is resampled too, so its noise is in the interval."""
    B = len(curve.domain[0])
    out = np.full(B, np.nan)
    dom, met = np.stack(curve.domain, axis=1), np.stack(curve.metric, axis=1)
    for b in range(B):
        v = interpolate_at(list(zip(dom[b], met[b])), dom[b, 0] + gain)
        if v is not None:
            out[b] = v
    return out


def bootstrap_summary(values: np.ndarray, point: float | None, level: float = LEVEL) -> dict:
    """Percentile interval over the resamples that reached the target, the share that did, and a two-sided
    bootstrap p-value for 0 (resamples that did not reach count against neither side)."""
    ok = values[np.isfinite(values)]
    reach = len(ok) / len(values) if len(values) else 0.0
    if len(ok) < 20:
        return {"value": point, "lo": None, "hi": None, "reach": reach, "p": None, "reason": "target reached in < 20 resamples"}
    lo, hi = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min((ok <= 0).mean(), (ok >= 0).mean()) + 1 / len(ok))
    return {"value": point, "lo": float(lo), "hi": float(hi), "reach": reach, "p": float(p), "reason": ""}


def resample_indices(n: int, B: int, rng: np.random.Generator, clusters: list | None = None) -> np.ndarray:
    """B × n item indices drawn with replacement (whole clusters when `clusters` is given: the items of each
    drawn cluster; a resample then holds a varying number of items, padded with -1)."""
    if clusters is None:
        return rng.integers(0, n, size=(B, n))
    keys = list(dict.fromkeys(clusters))
    members = [np.flatnonzero(np.asarray([c == key for c in clusters])) for key in keys]
    rows = []
    for _ in range(B):
        picks = rng.integers(0, len(keys), size=len(keys))
        rows.append(np.concatenate([members[i] for i in picks]))
    width = max(map(len, rows))
    out = np.full((B, width), -1)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def resampled_means(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Means of `scores` (length n) over each row of indices (-1 = padding)."""
    scores = np.asarray(scores, float)
    valid = idx >= 0
    vals = np.where(valid, scores[np.clip(idx, 0, None)], 0.0)
    return vals.sum(axis=1) / valid.sum(axis=1)
