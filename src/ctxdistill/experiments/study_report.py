"""results.md and its plots, from a study summary (`ctxdistill study`) alone: no model, no training.

Per domain: the pre-registered primary comparison (config `primary:`) on its own; every method at the
learning rate each CP rule picks (the paper's and the confidence-aware one, per seed); a matched-domain-
score comparison (each method's retention read off its learning-rate curve at the same domain score,
with a joint bootstrap interval over items and the share of resamples that reach the gain); method
against method item by item; the trade-off plots and the full per-learning-rate tables. Then the
continual-update rounds. Every interval comes from `ctxdistill.stats`; every table is one Holm family.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np

from .. import stats
from ..files import write_text_atomic
from ..stats import interpolate_at  # noqa: F401  (the interpolation the matched tables use)
from .comparisons import (KL_KEYS, METRICS, SKILLS, compare, digits_of, group_runs, item_vector, mean_metric, probe_round_accuracy,  # noqa: F401
                          scale, seed_pairs, vs_base)
from .plots import plot_continual, plot_frontier, plot_kl_vs_drop
from .report import ReportConfig, Table, _num, build_markdown, fmt_est, jsonable
from .selection import cp_both, cp_lines

FRONTIER_KEYS = ["drift.chat_kl", "ifeval.prompt_strict", "ifeval.inst_strict", "mmlu.accuracy", "nq_open.contains", "pubmedqa.accuracy",
                 "drift.chat_logprob", "gsm8k.gold_logprob", "nq_open.gold_logprob"]
HEADLINE_METHODS = ("disc", "ft", "disc_all", "ft_kl")
HEADLINE_KEYS = ["ifeval.inst_strict", "ifeval.prompt_strict", "mmlu.accuracy", "nq_open.contains", "pubmedqa.accuracy",
                 "drift.chat_kl", "drift.doc_kl"]
MATCHED_KEYS = ("ifeval.prompt_strict", "ifeval.inst_strict", "drift.chat_kl", "drift.chat_logprob", "nq_open.gold_logprob")
MATCHED_PAIRS = (("disc", "ft"), ("disc_chat", "ft"), ("disc", "ft_kl"), ("disc_t1", "disc"), ("sdft", "disc"), ("disc_chat", "disc"),
                 ("sdft", "ft"))
BOOTSTRAP = 1000
NOT_CONTRASTIVE = ("**This domain score is an artefact.** The mean log-probability of the gold option is not contrastive: "
                   "p(yes) can rise without p(no) falling, so a model that only moves towards one answer raises it on "
                   "balanced labels; and the accuracy beside it chose by log-prob per character (\"yes\" 3, \"no\" 2), so "
                   "the model gave the same answer to every probe. ctxdistill now scores two-option probes by the "
                   "contrastive margin log p(gold) − log p(other) and answers by its sign (`knowledge.option_margin`); "
                   "these runs predate it and their models are not kept, so the re-scoring belongs to the powered "
                   "study (issue 18). Read every number on this domain's score below as exploratory.")


def _with_paths(evals: list[dict], tag: str) -> list[dict]:
    for i, e in enumerate(evals):
        e.setdefault("_path", f"{tag}/{e.get('run', {}).get('name', i)}/eval.json")
    return evals


def _level(key: str, runs: list[dict]) -> str:
    m = mean_metric(runs, key)
    return "–" if m is None else f"{m['value'] * scale(key):.{digits_of(key)}f}"


# ---------------------------------------------------------------- matched gain, joint bootstrap


def _resamplers(evals: list[dict], keys: list[str], B: int, seed: int = 0) -> dict | str:
    """Per task: one B × n index matrix shared by every evaluation (the items of every metric resampled together)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in keys:
        task = key.split(".")[0] if not key.startswith("drift.doc") else "doc_kl"
        ref = next((item_vector(e, key) for e in evals if item_vector(e, key)[0] is not None), (None, None))
        if ref[0] is None:
            return stats.NO_ITEMS
        scores, ids = ref
        tag = (task, key if ids is not None and len(set(ids)) < len(ids) else "")  # clustered metrics get their own draw
        if tag not in out:
            clusters = ids if tag[1] else None
            out[tag] = stats.resample_indices(len(scores), B, rng, clusters)
        out[key] = out[tag]
    return out


def _boot_means(ev: dict, key: str, idx: np.ndarray) -> np.ndarray | None:
    scores, _ = item_vector(ev, key)
    if scores is None and key in KL_KEYS and ev.get("role") == "baseline":
        return np.zeros(len(idx))
    return None if scores is None else stats.resampled_means(np.asarray(scores, float), idx)


def _seed_level(runs: list[dict], arrays: list[list[np.ndarray]], rng: np.random.Generator) -> list[np.ndarray]:
    """Two-level bootstrap, outer level: per resample, draw the cell's seeds with replacement and average
    the drawn seeds' item-resampled means. `arrays` holds one list (one (B,) array per seed) per quantity;
    every quantity of a cell uses the same seed draw (a seed's run gives its domain score and its metric)."""
    S, B = len(runs), len(arrays[0][0])
    if S < 2:
        return [np.mean(per_seed, axis=0) for per_seed in arrays]
    draws = rng.integers(0, S, size=(B, S))
    cols = np.arange(B)[:, None]
    return [np.stack(per_seed)[draws, cols].mean(axis=1) for per_seed in arrays]


def cell_rng(seed: int, method: str, lr: float) -> np.random.Generator:
    """The seed draws of one (method, lr) cell: keyed by the cell, so a method's interval does not move when
    another method joins the table (one generator shared in table order would shift every later cell's draws)."""
    return np.random.default_rng([seed + 1, zlib.crc32(f"{method}|{float(lr)!r}".encode())])


def matched_bootstrap(groups: dict, base: dict, domain: str, key: str, gains: list[float], B: int = BOOTSTRAP,
                      seeds: bool = True, seed: int = 0) -> dict:
    """Each method's change in `key` where its learning-rate curve first reaches each domain gain, per
    resample of a joint bootstrap: the items of every task resampled together for every run (the same draw
    for every method, so differences stay paired) and, with `seeds`, the seeds of each (method, lr) cell
    resampled too (two-level). Returns {"points": method -> [(domain, key)] (initial model first, means over
    seeds), "values": (method, gain) -> (B,) changes, "base": the initial value of `key`, "reason": why
    there are no resamples ("" when there are)}."""
    evals = [base] + [r for by_lr in groups.values() for rs in by_lr.values() for r in rs]
    idx = _resamplers(evals, [domain, key], B, seed)
    base_key = base["metrics"].get(key, {"value": 0.0} if key in KL_KEYS else None)
    if base_key is None:
        return {"points": {}, "values": {}, "base": None, "reason": f"the initial model has no {key}"}
    base_key = base_key["value"]
    curves, points, reason = {}, {}, idx if isinstance(idx, str) else ""
    for method, by_lr in groups.items():
        pts = [(base["metrics"][domain]["value"], base_key)]
        boot_d = [_boot_means(base, domain, idx[domain])] if not reason else []
        boot_m = [_boot_means(base, key, idx[key])] if not reason else []
        for lr, runs in by_lr.items():
            d, m = mean_metric(runs, domain), mean_metric(runs, key)
            if not (d and m):
                continue
            pts.append((d["value"], m["value"]))
            if not reason:
                bd = [_boot_means(r, domain, idx[domain]) for r in runs]
                bm = [_boot_means(r, key, idx[key]) for r in runs]
                if any(x is None for x in bd + bm):
                    reason = stats.NO_ITEMS
                else:
                    d_b, m_b = _seed_level(runs, [bd, bm], cell_rng(seed, method, lr)) if seeds else (np.mean(bd, axis=0), np.mean(bm, axis=0))
                    boot_d.append(d_b)
                    boot_m.append(m_b)
        points[method] = pts
        if not reason:
            curves[method] = stats.Curve(boot_d, boot_m)
    values = {(method, g): stats.curve_values(curve, g / scale(domain)) - base_key for method, curve in curves.items() for g in gains}
    return {"points": points, "values": values, "base": base_key, "reason": reason}


def matched_difference(boot: dict, a: str, b: str, gain: float, domain: str) -> dict:
    """A − B at one gain: the point estimate from the mean curves and the bootstrap summary of the resamples."""
    s_dom = scale(domain)
    pa, pb = boot["points"].get(a), boot["points"].get(b)
    va = interpolate_at(pa, pa[0][0] + gain / s_dom) if pa else None
    vb = interpolate_at(pb, pb[0][0] + gain / s_dom) if pb else None
    if boot["reason"] or (a, gain) not in boot["values"] or (b, gain) not in boot["values"]:
        return {"value": None if va is None or vb is None else va - vb, "lo": None, "hi": None, "reach": 0.0, "p": None,
                "reason": boot["reason"] or "a method was not run"}
    return stats.bootstrap_summary(boot["values"][(a, gain)] - boot["values"][(b, gain)], None if va is None or vb is None else va - vb)


def matched_table(groups: dict, base: dict, domain: str, key: str, gains: list[float], B: int = BOOTSTRAP, alpha: float = 0.05,
                  seeds: bool = True) -> list[str]:
    """`matched_bootstrap` as a table: each method's change at each gain with its 95 % interval and the share
    of resamples that reach the gain; then the difference between method pairs (one Holm family)."""
    s_dom, s_key = scale(domain), scale(key)
    unit = "pts" if s_dom == 100 else METRICS.get(domain, ("", "nats"))[1]
    measured = {m: by_lr for m, by_lr in groups.items() if any(key in r.get("metrics", {}) for rs in by_lr.values() for r in rs)}
    unmeasured = sorted(set(groups) - set(measured))  # their evaluations skipped the task: "not measured", not "not reached"
    groups = measured
    boot = matched_bootstrap(groups, base, domain, key, gains, B, seeds)
    if boot["base"] is None:
        return []
    points, values, reason, base_key = boot["points"], boot["values"], boot["reason"], boot["base"]
    header = ["method"] + [f"+{g:g} {unit}" for g in gains]
    table = Table(header, [None] + [key] * len(gains), alpha, k=None)
    for method, pts in points.items():
        cells = [method]
        for g in gains:
            target = pts[0][0] + g / s_dom
            v = interpolate_at(pts, target)
            if reason or (method, g) not in values:
                cells.append("not reached" if v is None else f"{_num((v - base_key) * s_key, digits_of(key))} [— {reason}]")
                continue
            summ = stats.bootstrap_summary(values[(method, g)], None if v is None else v - base_key)
            cells.append(_boot_cell(key, summ))
        table.rows.append(cells)
    for a, b in MATCHED_PAIRS:
        if a not in points or b not in points or reason:
            continue
        cells = [f"**{a} − {b}**"]
        for g in gains:
            summ = matched_difference(boot, a, b, g, domain)
            cells.append(stats.Estimate(summ["value"], None, summ["lo"], summ["hi"], summ["p"], reason=summ["reason"] or "")
                         if summ["lo"] is not None and summ["value"] is not None else _boot_cell(key, summ))
            if isinstance(cells[-1], stats.Estimate):
                cells[-1].notes.append(f"{summ['reach'] * 100:.0f} %")
        table.rows.append(cells)
    lines = table.lines(note=f"Joint bootstrap over items{' and seeds (two-level)' if seeds else ''} ({B} resamples); in brackets "
                             "the share of resamples in which the curve reaches the gain (the interval is over those)."
                             + (f" Not measured for {', '.join(unmeasured)} (their evaluations did not run this task)." if unmeasured else ""))
    # the reach of difference rows, appended to their cells
    out = []
    for line in lines:
        out.append(line)
    reach_rows = [r for r in table.rows if isinstance(r[0], str) and r[0].startswith("**")]
    for r in reach_rows:
        reach = ", ".join(c.notes[0] if isinstance(c, stats.Estimate) and c.notes else "–" for c in r[1:])
        out.append(f"Both curves reach the gain in: {r[0]} {reach} of resamples.")
    return out


def _boot_cell(key: str, summ: dict) -> str:
    d = digits_of(key)
    s = scale(key)
    if summ["value"] is None:
        return f"not reached ({summ['reach'] * 100:.0f} % of resamples do)"
    if summ["lo"] is None:
        return f"{_num(summ['value'] * s, d)} [— {summ['reason']}]"
    return f"{_num(summ['value'] * s, d)} [{_num(summ['lo'] * s, d)}, {_num(summ['hi'] * s, d)}] ({summ['reach'] * 100:.0f} %)"


# ---------------------------------------------------------------- method against method


PAIRED = (("disc", "ft"), ("disc_all", "ft"), ("disc", "ft_kl"), ("disc_chat", "disc"), ("disc_ctx", "disc"), ("disc_ctx_strict", "disc"),
          ("disc_t1", "disc"), ("disc_ctx", "ft"), ("disc_ctx_strict", "ft"), ("disc_t1", "ft"), ("sdft", "disc"), ("sdft", "ft"))
PAIRED_KEYS = ("knowledge.mcq_loglik", "knowledge.option_margin", "knowledge.gold_option_logprob", "ifeval.prompt_strict", "ifeval.inst_strict",
               "drift.chat_kl", "drift.chat_logprob", "drift.doc_kl", "nq_open.gold_logprob", "gsm8k.gold_logprob", "mmlu.accuracy")


def paired_section(groups: dict, alpha: float = 0.05, skip: tuple | None = None, registered: dict | None = None) -> list[str]:
    """Method A minus method B at the same learning rate and seed, item by item; one Holm family per pair.

    `registered` maps (A, B) to the metrics a pre-registration names for that pair: only those columns are
    labelled confirmatory, everything else stays exploratory."""
    registered = registered or {}
    lines = []
    present = {k for by_lr in groups.values() for rs in by_lr.values() for r in rs for k in r["metrics"]}
    keys = [k for k in PAIRED_KEYS if k in present]
    for a, b in PAIRED:
        if a not in groups or b not in groups:
            continue
        table = Table(["lr", "seeds"] + [METRICS.get(k, (k,))[0] for k in keys], [None, None] + keys, alpha)
        for lr in [lr for lr in groups[a] if lr in groups[b]]:
            xa, xb = seed_pairs(groups[a][lr], groups[b][lr])
            if xa:
                table.add([f"{lr:g}", str(len(xa))] + [compare(xa, xb, k) for k in keys])
        if table.rows:
            named = [METRICS.get(k, (k,))[0] for k in registered.get((a, b), []) if k in keys]
            label = (f"pre-registered secondary endpoint for {', '.join(named)}; the other columns exploratory" if named else "exploratory")
            lines += [f"**{a} − {b}**, same learning rate and seed, paired over the same items ({label}):", ""] + table.lines() + [""]
    if lines:
        lines = ["### Method against method, item by item" + ("" if registered else " (exploratory)"), "",
                 "Differences in points (rates) or nats (log-probs, KLs); for KLs lower is better, for log-probs higher. Two seeds: "
                 "the per-item differences averaged over seeds, the between-seed variance added (two-way ANOVA, Satterthwaite df).", ""] + lines
    return lines


def primary_lines(primary: dict, name: str, groups: dict, base: dict | None = None, domain: str = "") -> list[str]:
    """The pre-registered primary comparison: A − B on `metric` at one learning rate (`lr`), or, with `gain`,
    at matched domain gain (each method's curve read where it first reaches the initial score + gain; a
    two-level joint bootstrap over items and seeds, `bootstrap` resamples). `registered` says where and
    when it was pre-registered; without it the comparison is labelled as designated after the runs."""
    if not primary or primary.get("domain") != name:
        return []
    a, b, key = primary.get("a"), primary.get("b"), primary.get("metric")
    registered = primary.get("registered")
    provenance = (f"Pre-registered in {registered}." if registered else
                  "Designated in the study config after this study was run, so it is the comparison the powered study "
                  "pre-registers, not a confirmed result.")
    if primary.get("gain") is not None:
        return _primary_matched(primary, name, groups, base, domain, provenance)
    lr = float(primary.get("lr", 0))
    head = [f"### Primary comparison: {a} − {b}, `{key}`, lr {lr:g}", ""]
    if a not in groups or b not in groups or lr not in groups[a] or lr not in groups[b]:
        return head + ["Not run.", ""]
    xa, xb = seed_pairs(groups[a][lr], groups[b][lr])
    est = compare(xa, xb, key)
    text = fmt_est(key, est)
    verdict = ("the interval excludes 0" if est.excludes_zero() else
               "the interval includes 0: no difference is shown, and none is ruled out beyond the interval" if est.defined else "no interval")
    notes = f" ({'; '.join(est.notes)})" if est.notes else ""
    return head + [f"{text} over {len(xa)} seed(s), n = {est.n} items, {est.method or '—'}{notes}, p = "
                   + (f"{est.p:.3g}" if est.p is not None else "—") + f": {verdict}. A family of one (not Holm-adjusted). {provenance}", ""]


def _primary_matched(primary: dict, name: str, groups: dict, base: dict | None, domain: str, provenance: str) -> list[str]:
    a, b, key, gain = primary.get("a"), primary.get("b"), primary.get("metric"), float(primary["gain"])
    B = int(primary.get("bootstrap", 2000))
    unit = "points" if scale(domain) == 100 else METRICS.get(domain, ("", "nats"))[1]
    head = [f"### Primary comparison: {a} − {b}, `{key}`, at matched gain (+{gain:g} {unit} of `{domain}`)", ""]
    if base is None or a not in groups or b not in groups:
        return head + ["Not run yet.", ""]
    seeds = {m: sorted({len(rs) for rs in groups[m].values()}) for m in (a, b)}
    boot = matched_bootstrap({a: groups[a], b: groups[b]}, base, domain, key, [gain], B, seeds=True)
    summ = matched_difference(boot, a, b, gain, domain)
    s, d = scale(key), digits_of(key)
    lrs = {m: ", ".join(f"{lr:g}" for lr in groups[m]) for m in (a, b)}
    design = (f"Curves over learning rates ({a}: {lrs[a]}; {b}: {lrs[b]}; seeds per learning rate {a} {seeds[a]}, {b} {seeds[b]}), "
              f"{B} two-level bootstrap resamples (seeds of each cell drawn with replacement, then the items of every task drawn "
              "together, the same draw for both methods), percentile interval over the resamples in which both curves reach the gain.")
    if summ["value"] is None:
        why = summ["reason"] if summ["reason"] == "a method was not run" or summ["reason"].startswith("no ") else \
            f"a curve does not reach the gain (both do in {summ['reach'] * 100:.0f} % of resamples)"
        return head + [f"Not estimable: {why}. {design} {provenance}", ""]
    if summ["lo"] is None:
        return head + [f"{_num(summ['value'] * s, d)} [— {summ['reason']}]. {design} {provenance}", ""]
    values = boot["values"][(a, gain)] - boot["values"][(b, gain)]
    se = float(np.nanstd(values, ddof=1))
    verdict = (f"the interval lies above 0: {a} keeps it better than {b} at this gain" if summ["lo"] > 0 else
               f"the interval lies below 0: {a} keeps it worse than {b} at this gain" if summ["hi"] < 0 else
               "the interval includes 0: the difference is not resolved at this power (not evidence of equality)")
    return head + [f"**{_num(summ['value'] * s, d)} [{_num(summ['lo'] * s, d)}, {_num(summ['hi'] * s, d)}]** (95 %), bootstrap p = "
                   f"{summ['p']:.3g}, both curves reach the gain in {summ['reach'] * 100:.0f} % of resamples; bootstrap SE "
                   f"{se * s:.{d}f}, so the difference detectable with 80 % power at α = 0.05 is ≈ {_num(stats.mde(se, 2.8) * s, d, False)}: "
                   f"{verdict}. A family of one (not Holm-adjusted). {design} {provenance}", ""]


def domain_section(name: str, data: dict, domain: str, threshold: float, out: Path, primary: dict | None = None,
                   secondary: list | None = None) -> tuple[list[str], dict]:
    base = data.get("baseline")
    runs = _with_paths(list(data.get("runs", [])), name)
    if base:
        base["_path"] = f"{name}/baseline/eval.json"
    groups = group_runs(runs)
    cp = cp_both(groups, base, domain, SKILLS, threshold)
    selection = cp["paper"]
    lines = [f"## Domain: {name}", ""]
    if not runs:
        return lines + ["No run finished yet.", ""], {}
    digits = digits_of(domain)
    if base:
        lines += [f"{len(runs)} runs ({len(groups)} methods). Domain score: `{domain}` ({METRICS.get(domain, (domain,))[0]}), "
                  f"n = {base['metrics'][domain]['n']} probes; initial model "
                  f"{base['metrics'][domain]['value'] * scale(domain):.{digits}f} ± {base['metrics'][domain]['stderr'] * scale(domain):.{digits}f}.", ""]
    if domain == "knowledge.gold_option_logprob":
        lines += [NOT_CONTRASTIVE, ""]
    lines += primary_lines(primary or {}, name, groups, base, domain)
    # CP table
    lines += ["### Each method at its CP learning rate", ""] + cp_lines(cp, domain, SKILLS, threshold)
    lines += ["At the paper rule's pick: the value over seeds and, in brackets below it, the change from the initial model with its 95 % "
              "interval.", ""]
    keys = [domain] + HEADLINE_KEYS
    table = Table(["method", "CP lr", "seeds"] + [METRICS[k][0] for k in keys] + ["train s"], [None, None, None] + keys + [None])
    for method, by_lr in groups.items():
        lr = selection.get(method, {}).get("lr")
        if lr is None:
            table.add([method, "none passes"] + ["–"] * (len(keys) + 2))
            continue
        rs = by_lr[lr]
        train_s = [r["run"].get("train_s") for r in rs if r.get("run", {}).get("train_s") is not None]
        table.add([method, f"{lr:g}", str(len(rs))] + [_level(k, rs) for k in keys] + [f"{sum(train_s) / len(train_s):.0f}" if train_s else "–"])
        if base:
            table.add(["", "", "change"] + [vs_base(rs, base, k) if any(k in r["metrics"] for r in rs) else "–" for k in keys] + [""])
    lines += table.lines() + [""]
    if base:
        max_gain = max((mean_metric(rs, domain) or {"value": -math.inf})["value"] for by_lr in groups.values() for rs in by_lr.values())
        top = (max_gain - base["metrics"][domain]["value"]) * scale(domain)
        if scale(domain) == 100:  # points of accuracy
            gains = [g for g in (4, 8, 12, 16, 20, 25, 30) if g <= top] or [round(top / 2, 1)]
        else:  # a log-probability: a quarter, half and three quarters of the largest gain any run reached
            gains = [round(top * f, 2) for f in (0.25, 0.5, 0.75)] if top > 0 else []
        lines += ["### At matched domain score", "",
                  "Each method's curve over learning rates (initial model, then increasing lr, mean over seeds), read by linear "
                  "interpolation where its domain score first reaches the initial score plus the column's gain: the change in a "
                  "retention measure that buys that much knowledge. The interval is a joint bootstrap: the items of every task "
                  "(probes, IFEval prompts, chat prompts, ...) are resampled together for every run, and the curves re-read in each "
                  "resample; the x-values carry noise too, so a curve may not reach a gain in every resample.", ""]
        for key in MATCHED_KEYS:
            if key in base["metrics"] or key in KL_KEYS:
                lines += [f"Change in **{METRICS[key][0]}**:", ""] + matched_table(groups, base, domain, key, gains) + [""]
    lines += paired_section(groups, registered={(e["a"], e["b"]): list(e.get("metrics", [])) for e in secondary or [] if e["domain"] == name})
    # plots
    plots = []
    xkeys = [k for k in FRONTIER_KEYS if base and (k in base["metrics"] or k in KL_KEYS)]
    headline = {m: v for m, v in groups.items() if m in HEADLINE_METHODS}
    if len(headline) < len(groups) and len(headline) >= 2:  # the main comparison alone, before the crowded plot
        path = out / f"frontier_{name}_headline.png"
        plot_frontier(path, base, headline, selection, domain, xkeys[:4])
        plots.append(path)
    frontier = out / f"frontier_{name}.png"
    plot_frontier(frontier, base, groups, selection, domain, xkeys[:3])
    plots.append(frontier)
    correlations = {}
    if base and any("drift.doc_kl" in r["metrics"] for r in runs):
        kl_plot = out / f"kl_vs_drop_{name}.png"
        correlations = plot_kl_vs_drop(kl_plot, base, groups, [k for k in ("ifeval.prompt_strict", "mmlu.accuracy", "drift.chat_logprob", "gsm8k.gold_logprob")
                                                               if k in base["metrics"]])
        plots.append(kl_plot)
    lines += [f"### Trade-off plots ({name})", ""]
    lines += [f"![{p.stem}](results/{p.name})" for p in plots] + [""]
    if correlations:
        lines += ["Spearman correlation, over every run of this domain, between the per-token KL on the training documents "
                  "and the drop of: " + ", ".join(f"{METRICS[k][0]} {v:+.2f}" if v is not None else f"{METRICS[k][0]} –"
                                                   for k, v in correlations.items()) + " (descriptive; runs of one method share items).", ""]
    # full tables (the sweep report's)
    present = set(base["metrics"] if base else {}) | {k for r in runs for k in r["metrics"]}
    keys = [k for k in METRICS if k in present]
    table = build_markdown(ReportConfig(runs_dir=".", domain_metric=domain, cp_threshold=threshold), base, groups, cp, keys, [])
    body = table.split("## Initial model", 1)[-1]
    body = body.split("## CP selection", 1)[0]
    lines += [f"### Every run ({name})", "", "#### Initial model" + body.replace("\n## ", "\n#### ")]
    return lines, {"cp": cp["paper"], "cp_confident": cp["confident"], "cp_per_seed": cp["per_seed"], "kl_correlations": correlations}


CONTINUAL_KEYS = ("ifeval.prompt_strict", "ifeval.inst_strict", "drift.chat_kl", "mmlu.accuracy")
CONTINUAL_PAIRS = (("disc_t0", "ft"), ("disc", "ft"), ("disc_t0", "disc"))


def _acc_cell(acc: dict, r: int) -> str:
    return f"{acc[r]['value'] * 100:.1f} ± {acc[r]['stderr'] * 100:.1f}" if r in acc else "–"


def continual_section(cont: dict, out: Path) -> list[str]:
    layout = cont["layout"]
    rounds = layout["rounds"]
    probe_round = layout["probe_round"]
    base = cont.get("baseline")
    lines = ["## Continual updates", "",
             f"The corpus in {rounds} batches of {', '.join(str(len(d)) for d in layout['round_docs'])} documents, applied one after "
             "another; each round starts from the previous round's model (for DiSC the teacher is that model too, except `disc_t0`). "
             "After every round: log-likelihood MCQ accuracy on the probes of each round (points ± SE), IFEval prompt- and "
             "instruction-level, the chat KL from the initial model and MMLU; below each row its change from the initial model "
             "with a 95 % interval. One seed.", ""]
    keys = [k for k in CONTINUAL_KEYS if base and k in base["metrics"] or k in KL_KEYS]
    table = Table(["method", "after round"] + [f"round {r} probes" for r in range(1, rounds + 1)] + [METRICS[k][0] for k in keys] + ["train s"],
                  [None, None] + [None] * rounds + keys + [None])
    series = {}
    if base:
        acc = probe_round_accuracy(base, probe_round)
        table.add(["initial", "0"] + [_acc_cell(acc, r) for r in range(1, rounds + 1)] + [_level(k, [base]) if k not in KL_KEYS else "0" for k in keys] + ["–"])
    for method, evals in cont["methods"].items():
        for e in evals:
            r_now = e["run"].get("round")
            acc = probe_round_accuracy(e, probe_round)
            series.setdefault(method, []).append((r_now, acc, e))
            cells = [_acc_cell(acc, r) if r <= r_now else (f"({acc[r]['value'] * 100:.1f})" if r in acc else "–") for r in range(1, rounds + 1)]
            table.add([method, str(r_now)] + cells + [_level(k, [e]) for k in keys] + [f"{e['run'].get('train_s', 0):.0f}"])
            if base:
                table.add(["", "change"] + [""] * rounds + [vs_base([e], base, k) for k in keys] + [""])
    lines += table.lines() + ["", "Numbers in brackets are probes of rounds not trained yet (a check that nothing leaks between rounds).", ""]
    pair_keys = ["knowledge.mcq_loglik"] + keys
    pairs = Table(["comparison", "after round"] + [METRICS[k][0] for k in pair_keys], [None, None] + pair_keys)
    for a, b in CONTINUAL_PAIRS:
        if a in cont["methods"] and b in cont["methods"]:
            by_round = {e["run"].get("round"): e for e in cont["methods"][b]}
            for e in cont["methods"][a]:
                other = by_round.get(e["run"].get("round"))
                if other:
                    pairs.add([f"{a} − {b}", str(e["run"].get("round"))] + [compare([e], [other], k) for k in pair_keys])
    if pairs.rows:
        lines += ["Method against method after the same round, paired over the same items (all probes for the knowledge score; "
                  "exploratory):", ""] + pairs.lines() + [""]
    if series:
        path = out / "continual.png"
        plot_continual(path, series, base, probe_round, rounds)
        lines += [f"![continual](results/{path.name})", ""]
    return lines


def shard_count(timings: dict) -> int:
    """How many `--shard i/N` processes ran, read from the N in their timing files' names (0: not sharded).

    Counting the files instead undercounts: a shard stopped in its first stage never wrote one."""
    counts = [int(m.group(1)) for name in timings if (m := re.search(r"shard\d+of(\d+)", name))]
    return max(counts, default=0)


def compute_account(summary: dict) -> list[str]:
    """What the evaluated runs cost, summed from their own records (model load, generation, training, evaluation):
    the study's time on one process, whatever sessions and processes it was actually spread over."""
    evals = [e for d in summary.get("domains", {}).values() for e in ([d.get("baseline")] + list(d.get("runs", []))) if e]
    cont = summary.get("continual") or {}
    evals += ([cont["baseline"]] if cont.get("baseline") else []) + [e for rounds in cont.get("methods", {}).values() for e in rounds]
    if not evals:
        return []
    parts = {"load": 0.0, "generate": 0.0, "train": 0.0, "evaluate": 0.0}
    for e in evals:
        timings = e.get("run", {}).get("timings_s") or {}
        parts["train"] += timings.get("train", e.get("run", {}).get("train_s") or 0.0)
        parts["load"] += timings.get("load", 0.0)
        parts["generate"] += timings.get("generate", 0.0)
        parts["evaluate"] += (e.get("timings_s") or {}).get("total", 0.0)
    total = sum(parts.values())
    return [f"Compute in the {len(evals)} evaluations and the runs behind them, summed from their own records: training "
            f"{parts['train'] / 60:.0f} min, text generation {parts['generate'] / 60:.0f} min, loading (and waiting for texts another "
            f"process was generating) {parts['load'] / 60:.0f} min, "
            f"evaluation {parts['evaluate'] / 60:.0f} min; {total / 3600:.2f} h on one process, i.e. ≈ {total / 7200:.2f} h of wall time "
            "on two processes side by side (process start-up not included).", ""]


def write_results(summary: dict, results_dir: Path, reading: str = "", log=print, primary: dict | None = None,
                  config_path: str = "configs/study.yaml", secondary: list | None = None) -> dict:
    results_dir = Path(results_dir)
    figures = results_dir / "results"
    figures.mkdir(parents=True, exist_ok=True)
    domain = summary.get("domain_metric", "knowledge.mcq_loglik")
    threshold = float(summary.get("cp_threshold", 5.0))
    env = summary.get("environment", {})
    timings = summary.get("timings_s", {})
    summary_path = figures / "study_summary.json"
    rebuild = f"ctxdistill study --config {config_path} --report-only --results-dir {results_dir}" + (f" --reading {reading}" if reading else "")
    lines = ["# ctxdistill study: DiSC against the baselines", "",
             f"Written by `ctxdistill study --config {config_path}` from `{summary_path}` "
             f"(rebuild without training: `{rebuild}`; the config supplies the primary comparison).", "",
             f"Machine: {env.get('machine', '?')} CPU, {env.get('threads', '?')} torch thread(s) per process"
             + (f", {shard_count(timings)} processes side by side (`--shard`)" if shard_count(timings) else "")
             + f", torch {env.get('torch', '?')}, CUDA {'yes' if env.get('cuda') else 'no'}.", ""]
    lines += compute_account(summary)
    if timings:
        lines += ["Stage wall times the processes recorded, summed over the sessions the study was resumed in (a session stopped "
                  "part-way by a ctxdistill older than 2026-11-22 did not record its time, nor did a process killed outright, e.g. with its machine): "
                  + "; ".join(f"{name}: " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in stages.items()) for name, stages in timings.items())
                  + ".", ""]
    missing = summary.get("not_finished") or []
    if missing:
        lines += [f"**Not finished when this summary was written ({len(missing)} planned run{'s' if len(missing) != 1 else ''}):** " + ", ".join(f"`{m}`" for m in missing)
                  + ". Re-running the study command trains and evaluates them (finished runs are skipped).", ""]
    if reading and Path(reading).is_file():
        lines += ["## Reading", "", Path(reading).read_text(encoding="utf-8").strip(), ""]
    extra = {}
    for name, data in summary.get("domains", {}).items():
        section, info = domain_section(name, data, data.get("domain_metric") or domain, threshold, figures,
                                       primary or (summary.get("config") or {}).get("primary"),
                                       secondary if secondary is not None else (summary.get("config") or {}).get("secondary"))
        lines += section
        extra[name] = info
    if summary.get("continual"):
        lines += continual_section(summary["continual"], figures)
    path = results_dir / "results.md"
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    write_text_atomic(figures / "selection.json", json.dumps(jsonable(extra), indent=2, default=str) + "\n")
    log(f"study: results -> {path}")
    return {"results": str(path), "selection": extra}
