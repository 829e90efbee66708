"""`ctxdistill report RUNS_DIR`: eval.json files -> report.md, the trade-off plots, the CP selection.

- Tables per method: the domain score (knowledge probes), every retention metric and its change from
  the initial model with a 95 % interval (`stats.paired`: item by item over identical item ids,
  clustered by IFEval prompt, the between-seed variance included when several seeds were trained;
  exact McNemar + Tango's interval for one seed's binary items). A † marks a change whose Holm-adjusted
  p-value (within the table, family size printed under it) is below 0.05. Where no interval can be
  computed the cell says "—" and why ("no per-item scores"), never "not significant". Each table ends
  with the minimum detectable difference (MDE, 2 paired SEs) of each column.
- CP selection, two rules side by side, per seed and over seeds: the DiSC paper's (the learning rate
  with the best domain score among those whose drop on each post-training skill, IFEval, GSM8K,
  HumanEval, is at most 5 points) and a confidence-aware one (the upper 95 % bound of each drop at most
  5 points), with whether the picks agree.
- Plots (matplotlib, Agg): `frontier.png`, domain score against each retention measure, one line per
  method across learning rates (at most 6 per panel, legend outside), 95 % intervals as error bars;
  `kl_vs_drop.png`, per-token KL on the training documents against the drop of each skill.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import stats
from .config import opt
from .errors import CtxDistillError

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
FIXED_COLORS = {"disc": "#1f77b4", "ft": "#2ca02c", "disc_all": "#d62728", "ft_kl": "#9467bd"}  # the same in every plot
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
          "#000080", "#ff1493", "#b8860b"]


@dataclass
class ReportConfig:
    runs_dir: str = opt("runs/sweep", "directory holding eval.json files (a sweep's out, or any tree of evaluations)")
    out: str = opt("", "where to write report.md and the PNGs (default: RUNS_DIR)")
    domain_metric: str = opt("knowledge.mcq_sampled", "the knowledge (domain) score to maximise")
    cp_skills: str = opt(",".join(SKILLS), "post-training skills the CP rule protects (comma-separated metric keys)")
    cp_threshold: float = opt(5.0, "CP rule: largest allowed drop in points on each skill")
    significance: float = opt(2.0, "the minimum detectable difference printed under each table, in paired standard errors")
    alpha: float = opt(0.05, "family-wise error rate: a change is flagged † when its Holm-adjusted p-value is below it")

    def validate(self) -> "ReportConfig":
        if not Path(self.runs_dir).is_dir():
            raise CtxDistillError(f"{self.runs_dir} is not a directory; pass the sweep's out directory (holding baseline/ and runs/)")
        if self.cp_threshold < 0 or self.significance <= 0 or not 0 < self.alpha < 1:
            raise CtxDistillError("cp_threshold must be >= 0, significance > 0 and alpha in (0, 1)")
        return self


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


def _drop_bound(runs: list[dict], base: dict, skill: str, confident: bool) -> tuple[float | None, str, str]:
    """Points lost on a skill: the point estimate (paper rule) or the upper 95 % bound (confidence-aware)."""
    est, used = vs_base(runs, base, skill), skill
    note = ""
    if confident and not est.defined and skill in FALLBACK:
        used = FALLBACK[skill]
        est, note = vs_base(runs, base, used), f"{used} in place of {skill} ({est.reason})"
    if est.delta is None:
        return None, note, used
    if not confident:
        return -est.delta * scale(used), note, used
    if not est.defined:
        return math.inf, est.reason, used
    return -est.lo * scale(used), note, used


def cp_select(groups: dict, base: dict, domain: str, skills: list[str], threshold: float, confident: bool = False) -> dict:
    """Per method: the lr with the best domain score whose drop on every skill is <= threshold points (confident:
    whose upper 95 % bound of each drop is)."""
    selection = {}
    for method, by_lr in groups.items():
        candidates, rejected, notes = [], {}, set()
        for lr, runs in by_lr.items():
            dom = mean_metric(runs, domain)
            drops = {}
            for skill in skills:
                if base is None or skill not in base["metrics"] or not any(skill in r["metrics"] for r in runs):
                    continue
                bound, note, used = _drop_bound(runs, base, skill, confident)
                if note:
                    notes.add(note)
                if bound is not None:
                    drops[used] = bound
            too_big = {s: d for s, d in drops.items() if d > threshold}
            if too_big:
                rejected[lr] = too_big
            elif dom is not None:
                candidates.append((dom["value"], lr, drops))
        if candidates:
            value, lr, drops = max(candidates, key=lambda c: (c[0], -c[1]))
            selection[method] = {"lr": lr, "domain": value, "drops": drops, "rejected": rejected, "notes": sorted(notes)}
        else:
            selection[method] = {"lr": None, "rejected": rejected, "notes": sorted(notes)}
    return selection


def seeds_of(groups: dict) -> list:
    return sorted({r.get("run", {}).get("seed") for by_lr in groups.values() for rs in by_lr.values() for r in rs}, key=str)


def cp_both(groups: dict, base: dict, domain: str, skills: list[str], threshold: float) -> dict:
    """Both CP rules over all seeds and per seed: {"paper", "confident", "per_seed": {seed: {method: (paper lr, confident lr)}}}."""
    out = {"paper": cp_select(groups, base, domain, skills, threshold), "confident": cp_select(groups, base, domain, skills, threshold, True),
           "per_seed": {}}
    seeds = seeds_of(groups)
    if len(seeds) > 1:
        for seed in seeds:
            sub = {m: {lr: [r for r in rs if r.get("run", {}).get("seed") == seed] for lr, rs in by_lr.items()} for m, by_lr in groups.items()}
            sub = {m: {lr: rs for lr, rs in v.items() if rs} for m, v in sub.items()}
            sub = {m: v for m, v in sub.items() if v}
            paper, conf = cp_select(sub, base, domain, skills, threshold), cp_select(sub, base, domain, skills, threshold, True)
            out["per_seed"][str(seed)] = {m: {"paper": paper[m]["lr"], "confident": conf[m]["lr"]} for m in sub}
    return out


def cp_lines(cp: dict, domain: str, skills: list[str], threshold: float) -> list[str]:
    """The two CP rules as markdown: per method the lr each picks, per seed, and whether the picks agree."""
    seeds = sorted({s for s in cp["per_seed"]})
    lines = [f"Paper rule: the best `{domain}` among learning rates whose drop on each of {', '.join(f'`{s}`' for s in skills)} is at most "
             f"{threshold:g} points (point estimates). Confidence-aware rule: the same with the upper 95 % bound of each drop at most "
             f"{threshold:g} points. A skill not measured constrains neither rule.", "",
             "| method | paper rule | confidence-aware rule | " + " | ".join(f"seed {s}: paper / confident" for s in seeds) + (" | picks agree |" if seeds else ""),
             "|---|---|---|" + "---|" * (len(seeds) + (1 if seeds else 0))]
    for method, sel in cp["paper"].items():
        conf = cp["confident"].get(method, {})

        def show(s):
            return "none passes" if s.get("lr") is None else f"lr {s['lr']:g}"
        cells = [method, show(sel), show(conf)]
        picks = [sel.get("lr"), conf.get("lr")]
        for seed in seeds:
            got = cp["per_seed"][seed].get(method)
            if got is None:
                cells.append("not run")
                continue
            cells.append(" / ".join("none" if v is None else f"{v:g}" for v in (got["paper"], got["confident"])))
            picks += [got["paper"], got["confident"]]
        if seeds:
            per_seed = [cp["per_seed"][s][method] for s in seeds if method in cp["per_seed"][s]]
            agree = len({g["paper"] for g in per_seed}) == 1 and len({g["confident"] for g in per_seed}) == 1 if len(per_seed) > 1 else None
            cells.append("one seed" if agree is None else ("yes" if agree else "**no**"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({n for sel in cp["confident"].values() for n in sel.get("notes", [])})
    lines += [""] + ([f"Confidence-aware rule: {'; '.join(notes)}.", ""] if notes else [])
    why = []
    for method, sel in cp["confident"].items():
        if sel["lr"] is None and sel["rejected"]:
            worst = {lr: max(v.items(), key=lambda kv: kv[1]) for lr, v in sel["rejected"].items()}
            lr, (skill, bound) = min(worst.items(), key=lambda kv: kv[1][1])
            why.append(f"{method} {bound:.1f} (lr {lr:g}, {skill})" if math.isfinite(bound) else f"{method}: no interval ({skill})")
    if why:
        lines += [f"Where the confidence-aware rule certifies nothing, the closest any learning rate came (the smallest, over "
                  f"learning rates, of the largest upper bound of a skill drop, points; it must be ≤ {threshold:g}): "
                  + "; ".join(why) + ". The full bounds are in selection.json.", ""]
    return lines


def jsonable(value):
    """A JSON-safe copy: non-finite floats (an unbounded drop) become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def digits_of(key: str) -> int:
    return 1 if scale(key) == 100 else (4 if METRICS.get(key, ("", ""))[1] == "kl" else 3)


def fmt(key: str, m: dict | None) -> str:
    if m is None or not math.isfinite(m["value"]):
        return "–"
    s, d = scale(key), digits_of(key)
    se = m.get("stderr")
    se_text = f" ± {se * s:.{d}f}" if se is not None and math.isfinite(se) and se > 0 else ""
    return f"{m['value'] * s:.{d}f}{se_text}"


def _num(x: float, d: int, sign: bool = True) -> str:
    if abs(x) < 0.5 * 10 ** -d:
        x = 0.0
    return f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def fmt_est(key: str, est: stats.Estimate | None, flag: bool = False) -> str:
    """'+3.1 [−1.2, +7.4]' (95 % interval), '†' when flagged; '— (reason)' when there is no interval."""
    if est is None:
        return ""
    s, d = scale(key), digits_of(key)
    if not est.defined:
        return (f"{_num(est.delta * s, d)} " if est.delta is not None else "") + f"[— {est.reason}]"
    return f"{_num(est.delta * s, d)} [{_num(est.lo * s, d)}, {_num(est.hi * s, d)}]" + ("†" if flag else "")


class Table:
    """A markdown table whose cells may be estimates; `lines()` Holm-adjusts them as one family, flags the
    adjusted p < alpha with †, and ends with each column's MDE (k paired SEs, the median over the column)."""

    def __init__(self, header: list[str], keys: list[str | None], alpha: float = 0.05, k: float | None = 2.0):
        self.header, self.keys, self.rows, self.alpha, self.k = header, keys, [], alpha, k

    def add(self, cells: list) -> None:
        self.rows.append(cells)

    def estimates(self) -> list[stats.Estimate]:
        return [c for row in self.rows for c in row if isinstance(c, stats.Estimate)]

    def lines(self, note: str = "") -> list[str]:
        ests = self.estimates()
        adjusted = dict(zip(map(id, ests), stats.holm([e.p if e.defined else None for e in ests])))
        family = sum(e.defined for e in ests)
        out = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        for row in self.rows:
            cells = []
            for key, c in zip(self.keys, row):
                if isinstance(c, stats.Estimate):
                    adj = adjusted.get(id(c))
                    cells.append(fmt_est(key, c, adj is not None and adj < self.alpha))
                else:
                    cells.append(str(c))
            out.append("| " + " | ".join(cells) + " |")
        mdes = []
        for j, key in enumerate(self.keys if self.k else []):
            ses = [row[j].se for row in self.rows if j < len(row) and isinstance(row[j], stats.Estimate) and row[j].defined and row[j].se]
            mdes.append(f"{_num(stats.mde(statistics.median(ses), self.k) * scale(key), digits_of(key), False)}" if key and ses else ("MDE" if j == 0 else ""))
        if any(isinstance(c, stats.Estimate) for row in self.rows for c in row):
            if self.k:
                out.append("| " + " | ".join(mdes) + " |")
            out += ["", (note + " " if note else "") + f"[95 % interval]; † = Holm-adjusted p < {self.alpha:g} within this table "
                    f"(family of {family} test{'s' if family != 1 else ''})" + (f"; last row: MDE, {self.k:g} paired SEs (median over the column)." if self.k else ".")]
        return out


def build_markdown(cfg: ReportConfig, base: dict | None, groups: dict, cp: dict, keys: list[str], plots: list[str]) -> str:
    lines = ["# ctxdistill report", ""]
    any_run = next((r for by_lr in groups.values() for rs in by_lr.values() for r in rs), base)
    if any_run:
        suite = any_run.get("suite", "?")
        per_task = {}
        for key in keys:
            if key in any_run["metrics"]:
                per_task.setdefault(key.split(".")[0], any_run["metrics"][key]["n"])
        sizes = ", ".join(f"{t} n={n}" for t, n in per_task.items())
        model = (base or any_run).get("model")
        lines += [f"Suite `{suite}`; initial model `{model}` (`{base['_path'] if base else 'no baseline evaluation found'}`). "
                  f"Items per task: {sizes}.", ""]
    lines += ["Scores are in points (x100) for rates; log-probs and KLs in nats per token; `±` is one standard error. Each lr has "
              "two rows: the value over seeds, then its change from the initial model with a 95 % interval, paired item by item "
              "(clustered by IFEval prompt; the between-seed variance included for several seeds; exact McNemar and "
              "Tango's interval for one seed's pass/fail items). `[— reason]`: no interval can be computed.", ""]
    if base:
        lines += ["## Initial model", "", "| metric | value |", "|---|---|"]
        lines += [f"| {METRICS.get(key, (key,))[0]} | {fmt(key, base['metrics'].get(key))} |" for key in keys if key in base["metrics"]]
        lines.append("")
    chosen = cp["paper"] if cp else {}
    for method, by_lr in groups.items():
        lines += [f"## {method}", ""]
        table = Table(["lr", "seeds"] + [METRICS.get(key, (key,))[0] for key in keys] + ["train s"], [None, None] + keys + [None],
                      cfg.alpha, cfg.significance)
        for lr, runs in by_lr.items():
            cells = [f"{lr:g}" + (" **(CP)**" if chosen.get(method, {}).get("lr") == lr else ""), str(len(runs))]
            cells += [fmt(key, mean_metric(runs, key)) for key in keys]
            train_s = [r.get("run", {}).get("train_s") for r in runs if r.get("run", {}).get("train_s") is not None]
            cells.append(f"{sum(train_s) / len(train_s):.0f}" if train_s else "–")
            table.add(cells)
            if base:
                table.add(["", "change"] + [vs_base(runs, base, key) if any(key in r["metrics"] for r in runs)
                                            and (key in base["metrics"] or key in KL_KEYS) else "" for key in keys] + [""])
        lines += table.lines() + [""]
    skills = [s.strip() for s in cfg.cp_skills.split(",") if s.strip()]
    lines += ["## CP selection", ""]
    if cp:
        lines += cp_lines(cp, cfg.domain_metric, skills, cfg.cp_threshold)
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines)


MAX_SERIES = 6


def _grid(plt, n: int, cols: int = 2, legend_width: float = 2.2):
    """Up to `cols` panels per row, room on the right for a legend outside the axes; unused panels hidden."""
    n = max(1, n)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols + legend_width, 4.0 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _finish(fig, title: str, path: Path, legend_width: float = 2.2) -> None:
    handles, labels = {}, {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    width = fig.get_size_inches()[0]
    fig.legend(list(handles.values()), list(handles.keys()), loc="center left", bbox_to_anchor=(1 - legend_width / width, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_width / width, 0.95))
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def color_map(methods) -> dict[str, str]:
    rest = [c for c in COLORS if c not in FIXED_COLORS.values()]
    out, i = {}, 0
    for m in sorted(methods):
        if m in FIXED_COLORS:
            out[m] = FIXED_COLORS[m]
        else:
            out[m] = rest[i % len(rest)]
            i += 1
    return out


def place_labels(ax, labels: list[tuple[float, float, str, str]], min_dist: float = 0.05) -> None:
    """Learning-rate labels next to their points, skipping any that would sit within `min_dist` (axes fraction) of
    one already placed: no overlapping labels."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    placed = []
    for x, y, text, color in labels:
        u, v = (x - x0) / ((x1 - x0) or 1), (y - y0) / ((y1 - y0) or 1)
        if any(abs(u - a) < min_dist * 1.6 and abs(v - b) < min_dist for a, b in placed):
            continue
        placed.append((u, v))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7, color=color)


def _err(m: dict | None, s: float) -> float:
    return (m.get("half") or 0.0) * s if m else 0.0


def method_chunks(methods: list[str], size: int = MAX_SERIES, anchor: str | None = None) -> list[list[str]]:
    """Methods in panels of at most `size` series; `anchor` (e.g. "ft") is repeated in every panel as the reference."""
    rest = [m for m in methods if m != anchor]
    per = size - (1 if anchor in methods else 0)
    chunks = [rest[i : i + per] for i in range(0, len(rest), per)] or [[]]
    return [([anchor] if anchor in methods else []) + c for c in chunks]


def plot_frontier(path: Path, base: dict | None, groups: dict, selection: dict, domain: str, xkeys: list[str], anchor: str = "ft") -> None:
    """Domain score against each retention measure: one panel per (measure, group of <= 6 methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkeys = [k for k in xkeys if base is None or k in base["metrics"] or k in KL_KEYS] or xkeys[:1]
    colors = color_map(groups)
    chunks = method_chunks(list(groups), MAX_SERIES - (1 if base else 0), anchor)
    panels = [(x, c) for x in xkeys for c in chunks]
    fig, axes = _grid(plt, len(panels), cols=min(len(chunks), 3) if len(chunks) > 1 else 2)
    for ax, (xkey, chunk) in zip(axes, panels):
        labels = []
        for method in chunk:
            by_lr, color = groups[method], colors[method]
            pts = []
            for lr, runs in by_lr.items():
                x, y = mean_metric(runs, xkey), mean_metric(runs, domain)
                if x and y:
                    pts.append((lr, x, y))
            if not pts:
                continue
            xs = [p[1]["value"] * scale(xkey) for p in pts]
            ys = [p[2]["value"] * scale(domain) for p in pts]
            ax.errorbar(xs, ys, xerr=[_err(p[1], scale(xkey)) for p in pts], yerr=[_err(p[2], scale(domain)) for p in pts],
                        color=color, marker="o", ms=5, lw=1.4, capsize=2, alpha=0.9, label=method)
            for (lr, _, _), x, y in zip(pts, xs, ys):
                labels.append((x, y, f"{lr:g}", color))
                if selection.get(method, {}).get("lr") == lr:
                    ax.scatter([x], [y], s=200, facecolors="none", edgecolors=color, linewidths=2, zorder=5)
        if base and domain in base["metrics"] and (xkey in base["metrics"] or xkey in KL_KEYS):
            bx = base["metrics"][xkey]["value"] * scale(xkey) if xkey in base["metrics"] else 0.0
            by = base["metrics"][domain]["value"] * scale(domain)
            ax.scatter([bx], [by], marker="*", s=200, color="black", zorder=6, label="initial model")
        label, kind = METRICS.get(xkey, (xkey, "prop"))
        direction = "  ← less drift" if kind == "kl" else "  → better"
        ax.set_xlabel(label + (" (points)" if kind == "prop" else " (nats/token)") + direction, fontsize=8)
        ax.set_ylabel(METRICS.get(domain, (domain,))[0] + (" (points)" if scale(domain) == 100 else " (nats)"), fontsize=8)
        if len(chunks) > 1:
            ax.set_title(", ".join(chunk), fontsize=8)
        ax.grid(alpha=0.3)
        place_labels(ax, sorted(labels, key=lambda t: -t[1]))
    _finish(fig, "Knowledge gained vs capability retained (labels: learning rate; circle: CP pick, paper rule; bars: 95 % intervals)", path)


def plot_kl_vs_drop(path: Path, base: dict, groups: dict, ykeys: list[str]) -> dict:
    """Per-token KL on training docs (x, log) vs each skill's drop (y); returns the Spearman correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ykeys = [k for k in ykeys if k in base["metrics"]]
    fig, axes = _grid(plt, len(ykeys))
    correlations = {}
    colors = color_map(groups)
    named = list(groups) if len(groups) <= MAX_SERIES else [m for m in groups if m in FIXED_COLORS]
    for ax, ykey in zip(axes, ykeys):
        xs_all, ys_all = [], []
        for method, by_lr in sorted(groups.items(), key=lambda kv: kv[0] in named):  # the named methods drawn on top
            xs, ys, lo, hi = [], [], [], []
            for lr, runs in by_lr.items():
                for r in runs:
                    kl, m = r["metrics"].get("drift.doc_kl"), r["metrics"].get(ykey)
                    if kl is None or m is None or not kl["value"] > 0:
                        continue
                    est = vs_base([r], base, ykey)
                    if est.delta is None:
                        continue
                    xs.append(kl["value"])
                    ys.append(-est.delta * scale(ykey))
                    lo.append((est.hi - est.delta) * scale(ykey) if est.defined else 0.0)  # the drop's interval is the change's, mirrored
                    hi.append((est.delta - est.lo) * scale(ykey) if est.defined else 0.0)
            shown = method in named
            ax.errorbar(xs, ys, yerr=[lo, hi], ls="none", marker="o" if shown else ".", ms=5 if shown else 6, capsize=2,
                        color=colors[method] if shown else "#b0b0b0", label=method if shown else "other methods", zorder=3 if shown else 2)
            xs_all += xs
            ys_all += ys
        ax.axhline(0, color="grey", lw=0.8)
        if xs_all:  # a log axis without data cannot be laid out
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("per-token KL(initial ‖ updated) on training docs (nats)", fontsize=8)
        label, kind = METRICS.get(ykey, (ykey, "prop"))
        ax.set_ylabel(f"drop in {label}" + (" (points)" if kind == "prop" else " (nats/token)"), fontsize=8)
        rho = spearman(xs_all, ys_all)
        correlations[ykey] = rho
        ax.set_title(f"Spearman ρ = {rho:.2f} over {len(xs_all)} runs" if rho is not None else f"{len(xs_all)} runs", fontsize=9)
        ax.grid(alpha=0.3)
    _finish(fig, "Does the per-token KL on the training documents predict forgetting? (bars: 95 % intervals)", path)
    return correlations


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else None


def write_report(cfg: ReportConfig) -> dict:
    cfg.validate()
    runs_dir = Path(cfg.runs_dir)
    out = Path(cfg.out) if cfg.out else runs_dir
    out.mkdir(parents=True, exist_ok=True)
    base, runs = load_evals(runs_dir)
    if not runs and base is None:
        raise CtxDistillError(f"no eval.json under {runs_dir}; run `ctxdistill sweep` or `ctxdistill eval --out {runs_dir}/...` first")
    groups = group_runs(runs)
    skills = [s.strip() for s in cfg.cp_skills.split(",") if s.strip()]
    cp = cp_both(groups, base, cfg.domain_metric, skills, cfg.cp_threshold)
    present = set(base["metrics"]) if base else set()
    for r in runs:
        present |= set(r["metrics"])
    keys = [k for k in METRICS if k in present]
    plots = []
    correlations = {}
    if runs:
        frontier = out / "frontier.png"
        plot_frontier(frontier, base, groups, cp["paper"], cfg.domain_metric, [s for s in skills + ["drift.chat_kl", "drift.chat_logprob"] if s in present])
        plots.append(str(frontier))
        if base and any("drift.doc_kl" in r["metrics"] for r in runs):
            kl_plot = out / "kl_vs_drop.png"
            correlations = plot_kl_vs_drop(kl_plot, base, groups, [s for s in skills + ["drift.chat_logprob"] if s in present])
            plots.append(str(kl_plot))
    text = build_markdown(cfg, base, groups, cp, keys, plots)
    if correlations:
        text += "\nSpearman correlation between per-token KL on the training documents and each drop: " + ", ".join(
            f"{METRICS.get(k, (k,))[0]} {v:.2f}" if v is not None else f"{METRICS.get(k, (k,))[0]} –" for k, v in correlations.items()) + ".\n"
    report_path = out / "report.md"
    report_path.write_text(text, encoding="utf-8")
    (out / "selection.json").write_text(json.dumps(jsonable({"cp": cp["paper"], "cp_confident": cp["confident"], "cp_per_seed": cp["per_seed"],
                                                    "threshold": cfg.cp_threshold, "skills": skills,
                                                    "domain_metric": cfg.domain_metric, "kl_correlations": correlations}),
                                                   indent=2, default=str) + "\n", encoding="utf-8")
    return {"report": str(report_path), "plots": plots, "selection": cp["paper"], "selection_confident": cp["confident"]}
