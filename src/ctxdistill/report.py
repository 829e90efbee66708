"""`ctxdistill report RUNS_DIR`: eval.json files -> report.md, the trade-off plots, the CP selection.

- Tables per method: the domain score (knowledge probes), every retention metric and its change from
  the initial model, the drift KLs and the training time. A change smaller than 2 standard errors is
  marked "n.s." (not significant). The standard error of a change is paired (the SD of per-item
  differences / sqrt(n)) when both evaluations scored the same items, else sqrt(SE_a^2 + SE_b^2).
- CP selection, the DiSC paper's rule: per method, the learning rate with the best domain score among
  those whose drop on each post-training skill (IFEval, GSM8K, HumanEval) is at most 5 points.
- Plots (matplotlib, Agg): `frontier.png`, domain score against each retention measure, one line per
  method across learning rates (the trade-off frontier); `kl_vs_drop.png`, per-token KL on the training
  documents against the drop of each skill (the paper's forgetting predictor).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import opt
from .errors import CtxDistillError

# key -> (label, kind): "prop" are proportions shown in points (x100); "nats" are continuous
METRICS = {
    "knowledge.mcq_sampled": ("Domain MCQ (majority of 5)", "prop"),
    "knowledge.mcq_loglik": ("Domain MCQ (log-lik)", "prop"),
    "knowledge.short_f1": ("Domain short-answer F1", "prop"),
    "knowledge.gold_option_logprob": ("Domain gold option log-prob", "nats"),
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
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
          "#000080", "#ff1493", "#b8860b"]


@dataclass
class ReportConfig:
    runs_dir: str = opt("runs/sweep", "directory holding eval.json files (a sweep's out, or any tree of evaluations)")
    out: str = opt("", "where to write report.md and the PNGs (default: RUNS_DIR)")
    domain_metric: str = opt("knowledge.mcq_sampled", "the knowledge (domain) score to maximise")
    cp_skills: str = opt(",".join(SKILLS), "post-training skills the CP rule protects (comma-separated metric keys)")
    cp_threshold: float = opt(5.0, "CP rule: largest allowed drop in points on each skill")
    significance: float = opt(2.0, "changes smaller than this many standard errors are marked n.s.")

    def validate(self) -> "ReportConfig":
        if not Path(self.runs_dir).is_dir():
            raise CtxDistillError(f"{self.runs_dir} is not a directory; pass the sweep's out directory (holding baseline/ and runs/)")
        if self.cp_threshold < 0 or self.significance <= 0:
            raise CtxDistillError("cp_threshold must be >= 0 and significance > 0")
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


def difference(run: dict, base: dict, key: str) -> dict | None:
    """run - base for one metric, with a paired SE when both scored the same items."""
    a, b = run["metrics"].get(key), base["metrics"].get(key)
    if a is None or b is None or not all(math.isfinite(x) for x in (a["value"], b["value"])):
        return None
    delta = a["value"] - b["value"]
    ia, ib = run.get("item_scores", {}).get(key), base.get("item_scores", {}).get(key)
    same_items = ia is not None and ib is not None and len(ia) == len(ib) > 1 and _same_ids(run, base, key)
    if same_items:
        diffs = [x - y for x, y in zip(ia, ib)]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        kind = "paired"
    else:
        se = math.sqrt((a.get("stderr") or 0.0) ** 2 + (b.get("stderr") or 0.0) ** 2)
        kind = "unpaired"
    return {"delta": delta, "se": se, "kind": kind}


def _same_ids(run: dict, base: dict, key: str) -> bool:
    task = key.split(".")[0]
    ra, rb = run.get("tasks", {}).get(task, {}), base.get("tasks", {}).get(task, {})
    return ra.get("ids") == rb.get("ids")


def significant(diff: dict | None, k: float) -> bool:
    return diff is not None and (diff["se"] == 0 and diff["delta"] != 0 or diff["se"] > 0 and abs(diff["delta"]) >= k * diff["se"])


def group_runs(runs: list[dict]) -> dict[str, dict[float, list[dict]]]:
    """method -> lr -> [runs over seeds]."""
    groups: dict[str, dict[float, list[dict]]] = {}
    for r in runs:
        info = r.get("run", {})
        method, lr = info.get("method") or Path(r["_path"]).parent.name, float(info.get("lr") or 0.0)
        groups.setdefault(method, {}).setdefault(lr, []).append(r)
    return {m: dict(sorted(v.items())) for m, v in sorted(groups.items())}


def mean_metric(runs: list[dict], key: str) -> dict | None:
    """Mean over seeds; SE = sqrt(sum SE^2) / k (independent seeds)."""
    vals = [r["metrics"][key] for r in runs if key in r["metrics"] and math.isfinite(r["metrics"][key]["value"])]
    if not vals:
        return None
    k = len(vals)
    return {"value": sum(v["value"] for v in vals) / k, "stderr": math.sqrt(sum((v.get("stderr") or 0.0) ** 2 for v in vals)) / k, "n": vals[0]["n"]}


def cp_select(groups: dict, base: dict, domain: str, skills: list[str], threshold: float) -> dict:
    """Per method: the lr with the best domain score whose drop on every skill is <= threshold points."""
    selection = {}
    for method, by_lr in groups.items():
        candidates, rejected = [], {}
        for lr, runs in by_lr.items():
            dom = mean_metric(runs, domain)
            drops = {}
            for skill in skills:
                m, b = mean_metric(runs, skill), base["metrics"].get(skill) if base else None
                if m is not None and b is not None:
                    drops[skill] = (b["value"] - m["value"]) * scale(skill)
            too_big = {s: d for s, d in drops.items() if d > threshold}
            if too_big:
                rejected[lr] = too_big
            elif dom is not None:
                candidates.append((dom["value"], lr, drops))
        if candidates:
            value, lr, drops = max(candidates, key=lambda c: (c[0], -c[1]))
            selection[method] = {"lr": lr, "domain": value, "drops": drops, "rejected": rejected}
        else:
            selection[method] = {"lr": None, "rejected": rejected}
    return selection


def fmt(key: str, m: dict | None) -> str:
    if m is None or not math.isfinite(m["value"]):
        return "–"
    s = scale(key)
    digits = 1 if s == 100 else (4 if METRICS.get(key, ("", ""))[1] == "kl" else 3)
    se = m.get("stderr")
    se_text = f" ± {se * s:.{digits}f}" if se is not None and math.isfinite(se) and se > 0 else ""
    return f"{m['value'] * s:.{digits}f}{se_text}"


def fmt_delta(key: str, d: dict | None, k: float) -> str:
    if d is None:
        return ""
    s = scale(key)
    digits = 1 if s == 100 else 4 if METRICS.get(key, ("", ""))[1] == "kl" else 3
    mark = "" if significant(d, k) else " n.s."
    value = d["delta"] * s
    if abs(value) < 0.5 * 10 ** -digits:
        value = 0.0
    return f" ({value:+.{digits}f}{mark})"


def build_markdown(cfg: ReportConfig, base: dict | None, groups: dict, selection: dict, keys: list[str], plots: list[str]) -> str:
    k = cfg.significance
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
    lines += [f"Scores are in points (x100) for rates; log-probs and KLs in nats per token. `±` is one standard error. "
              f"In brackets: the change from the initial model; **n.s.** marks a change smaller than {k:g} standard errors "
              f"(paired over the same items where possible), which this evaluation cannot tell from noise.", ""]
    if base:
        lines += ["## Initial model", "", "| metric | value |", "|---|---|"]
        lines += [f"| {METRICS.get(key, (key,))[0]} | {fmt(key, base['metrics'].get(key))} |" for key in keys if key in base["metrics"]]
        lines.append("")
    for method, by_lr in groups.items():
        lines += [f"## {method}", ""]
        header = ["lr", "seeds"] + [METRICS.get(key, (key,))[0] for key in keys] + ["train s"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        chosen = selection.get(method, {}).get("lr")
        for lr, runs in by_lr.items():
            cells = [f"{lr:g}" + (" **(CP)**" if chosen == lr else ""), str(len(runs))]
            for key in keys:
                m = mean_metric(runs, key)
                d = None
                if base and len(runs) == 1:
                    d = difference(runs[0], base, key)
                elif base and m is not None and key in base["metrics"]:
                    b = base["metrics"][key]
                    d = {"delta": m["value"] - b["value"], "se": math.sqrt(m["stderr"] ** 2 + (b.get("stderr") or 0) ** 2), "kind": "unpaired"}
                cells.append(fmt(key, m) + fmt_delta(key, d, k))
            train_s = [r.get("run", {}).get("train_s") for r in runs if r.get("run", {}).get("train_s") is not None]
            cells.append(f"{sum(train_s) / len(train_s):.0f}" if train_s else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## CP selection", "",
              f"Rule: the best `{cfg.domain_metric}` among learning rates whose drop on each of "
              f"{', '.join(f'`{s}`' for s in cfg.cp_skills.split(','))} is at most {cfg.cp_threshold:g} points.", ""]
    for method, sel in selection.items():
        if sel["lr"] is None:
            why = "; ".join(f"lr {lr:g}: " + ", ".join(f"{s} -{d:.1f}" for s, d in v.items()) for lr, v in sel["rejected"].items())
            lines.append(f"- **{method}**: no learning rate meets the constraint ({why or 'no domain score'}).")
        else:
            drops = ", ".join(f"{s} {0.0 - d:+.1f}".replace("-0.0", "+0.0") for s, d in sel["drops"].items())
            lines.append(f"- **{method}**: lr {sel['lr']:g}, domain score {sel['domain'] * scale(cfg.domain_metric):.1f} (skill changes: {drops or 'not measured'}).")
    lines += ["", "Drops smaller than about 2 standard errors of the skill's change are within noise: with small "
              "subsets (`quick`) the constraint can pass or fail by chance; use `--suite full` for decisions.", ""]
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines)


def _grid(plt, n: int):
    """Up to two panels per row; unused panels are hidden."""
    n = max(1, n)
    cols = min(2, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def plot_frontier(path: Path, base: dict | None, groups: dict, selection: dict, domain: str, xkeys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkeys = [k for k in xkeys if base is None or k in base["metrics"]] or xkeys[:1]
    fig, axes = _grid(plt, len(xkeys))
    for ax, xkey in zip(axes, xkeys):
        for ci, (method, by_lr) in enumerate(groups.items()):
            color = COLORS[ci % len(COLORS)]
            pts = []
            for lr, runs in by_lr.items():
                x, y = mean_metric(runs, xkey), mean_metric(runs, domain)
                if x and y:
                    pts.append((lr, x, y))
            if not pts:
                continue
            xs = [p[1]["value"] * scale(xkey) for p in pts]
            ys = [p[2]["value"] * scale(domain) for p in pts]
            ax.errorbar(xs, ys, xerr=[p[1]["stderr"] * scale(xkey) for p in pts], yerr=[p[2]["stderr"] * scale(domain) for p in pts],
                        color=color, marker="o", ms=6, lw=1.6, capsize=2, alpha=0.9, label=method)
            for (lr, _, _), x, y in zip(pts, xs, ys):
                ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7.5, color=color)
                if selection.get(method, {}).get("lr") == lr:
                    ax.scatter([x], [y], s=220, facecolors="none", edgecolors=color, linewidths=2, zorder=5)
        if base and xkey in base["metrics"] and domain in base["metrics"]:
            bx, by = base["metrics"][xkey]["value"] * scale(xkey), base["metrics"][domain]["value"] * scale(domain)
            ax.scatter([bx], [by], marker="*", s=220, color="black", zorder=6, label="initial model")
        label, kind = METRICS.get(xkey, (xkey, "prop"))
        ax.set_xlabel(label + (" (points)" if kind == "prop" else " (nats/token)") + "  → better")
        ax.set_ylabel(METRICS.get(domain, (domain,))[0] + (" (points)" if scale(domain) == 100 else " (nats)"))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Knowledge gained vs capability retained (labels: learning rate; circle: CP selection; bars: ±1 SE)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_kl_vs_drop(path: Path, base: dict, groups: dict, ykeys: list[str]) -> dict:
    """Per-token KL on training docs (x, log) vs each skill's drop (y); returns the Spearman correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ykeys = [k for k in ykeys if k in base["metrics"]]
    fig, axes = _grid(plt, len(ykeys))
    correlations = {}
    for ax, ykey in zip(axes, ykeys):
        xs_all, ys_all = [], []
        for ci, (method, by_lr) in enumerate(groups.items()):
            xs, ys, es = [], [], []
            for lr, runs in by_lr.items():
                for r in runs:
                    kl, m = r["metrics"].get("drift.doc_kl"), r["metrics"].get(ykey)
                    if kl is None or m is None or not kl["value"] > 0:
                        continue
                    d = difference(r, base, ykey)
                    xs.append(kl["value"])
                    ys.append(-d["delta"] * scale(ykey))
                    es.append(d["se"] * scale(ykey))
            ax.errorbar(xs, ys, yerr=es, ls="none", marker="o", ms=6, capsize=2, color=COLORS[ci % len(COLORS)], label=method)
            xs_all += xs
            ys_all += ys
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("per-token KL(initial ‖ updated) on training docs (nats)")
        label, kind = METRICS.get(ykey, (ykey, "prop"))
        ax.set_ylabel(f"drop in {label}" + (" (points)" if kind == "prop" else " (nats/token)"))
        rho = spearman(xs_all, ys_all)
        correlations[ykey] = rho
        ax.set_title(f"Spearman ρ = {rho:.2f} over {len(xs_all)} runs" if rho is not None else f"{len(xs_all)} runs", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Does the per-token KL on the training documents predict forgetting? (bars: ±1 SE)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
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
    selection = cp_select(groups, base, cfg.domain_metric, skills, cfg.cp_threshold)
    present = set(base["metrics"]) if base else set()
    for r in runs:
        present |= set(r["metrics"])
    keys = [k for k in METRICS if k in present]
    plots = []
    correlations = {}
    if runs:
        frontier = out / "frontier.png"
        plot_frontier(frontier, base, groups, selection, cfg.domain_metric, [s for s in skills + ["drift.chat_logprob"] if s in present])
        plots.append(str(frontier))
        if base and any("drift.doc_kl" in r["metrics"] for r in runs):
            kl_plot = out / "kl_vs_drop.png"
            correlations = plot_kl_vs_drop(kl_plot, base, groups, [s for s in skills + ["drift.chat_logprob"] if s in present])
            plots.append(str(kl_plot))
    text = build_markdown(cfg, base, groups, selection, keys, plots)
    if correlations:
        text += "\nSpearman correlation between per-token KL on the training documents and each drop: " + ", ".join(
            f"{METRICS.get(k, (k,))[0]} {v:.2f}" if v is not None else f"{METRICS.get(k, (k,))[0]} –" for k, v in correlations.items()) + ".\n"
    report_path = out / "report.md"
    report_path.write_text(text, encoding="utf-8")
    (out / "selection.json").write_text(json.dumps({"cp": selection, "threshold": cfg.cp_threshold, "skills": skills,
                                                    "domain_metric": cfg.domain_metric, "kl_correlations": correlations},
                                                   indent=2, default=str) + "\n", encoding="utf-8")
    return {"report": str(report_path), "plots": plots, "selection": selection}
