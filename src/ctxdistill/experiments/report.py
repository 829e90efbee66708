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

from .. import stats
from ..errors import CtxDistillError
from ..files import write_text_atomic
from ..options import opt
from .comparisons import KL_KEYS, METRICS, SKILLS, digits_of, group_runs, load_evals, mean_metric, scale, vs_base
from .plots import plot_frontier, plot_kl_vs_drop
from .selection import cp_both, cp_lines

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


def jsonable(value):
    """A JSON-safe copy: non-finite floats (an unbounded drop) become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


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
    write_text_atomic(report_path, text)
    write_text_atomic(out / "selection.json", json.dumps(jsonable({"cp": cp["paper"], "cp_confident": cp["confident"], "cp_per_seed": cp["per_seed"],
                                                    "threshold": cfg.cp_threshold, "skills": skills,
                                                    "domain_metric": cfg.domain_metric, "kl_correlations": correlations}),
                                                   indent=2, default=str) + "\n")
    return {"report": str(report_path), "plots": plots, "selection": cp["paper"], "selection_confident": cp["confident"]}
