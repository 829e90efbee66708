"""results.md and its plots, from a study summary (`ctxdistill study`) alone: no model, no training.

Per domain: the CP-selected run of every method, a matched-domain-score comparison (each method's
retention read off its learning-rate curve at the same domain score), the full per-learning-rate
tables, the trade-off plots and the KL-vs-forgetting plot. Then the continual-update rounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .report import METRICS, ReportConfig, build_markdown, cp_select, difference, group_runs, mean_metric, plot_frontier, plot_kl_vs_drop, scale

SKILLS = ["ifeval.inst_strict", "gsm8k.accuracy", "humaneval.pass@1"]
FRONTIER_KEYS = ["ifeval.inst_strict", "ifeval.prompt_strict", "mmlu.accuracy", "nq_open.contains", "pubmedqa.accuracy",
                 "drift.chat_logprob", "gsm8k.gold_logprob", "nq_open.gold_logprob"]
HEADLINE_METHODS = ("disc", "ft", "disc_all", "ft_kl")
HEADLINE_KEYS = ["ifeval.inst_strict", "ifeval.prompt_strict", "mmlu.accuracy", "nq_open.contains", "pubmedqa.accuracy",
                 "drift.chat_kl", "drift.doc_kl"]


def _with_paths(evals: list[dict], tag: str) -> list[dict]:
    for i, e in enumerate(evals):
        e.setdefault("_path", f"{tag}/{e.get('run', {}).get('name', i)}/eval.json")
    return evals


def _cell(key: str, runs: list[dict], base: dict | None) -> str:
    m = mean_metric(runs, key)
    if m is None:
        return "–"
    s = scale(key)
    digits = 1 if s == 100 else (4 if METRICS.get(key, ("", ""))[1] == "kl" else 3)
    text = f"{m['value'] * s:.{digits}f}"
    if base is None or key.startswith("drift."):
        return text + (f" ± {m['stderr'] * s:.{digits}f}" if m.get("stderr") else "")
    if len(runs) == 1:
        d = difference(runs[0], base, key)
    else:
        b = base["metrics"].get(key)
        d = None if b is None else {"delta": m["value"] - b["value"], "se": math.sqrt(m["stderr"] ** 2 + (b.get("stderr") or 0) ** 2)}
    if d is None:
        return text
    return f"{text} ({d['delta'] * s:+.{digits}f} ± {d['se'] * s:.{digits}f})"


def interpolate_at(points: list[tuple[float, float]], target: float) -> float | None:
    """The metric where a method's curve (domain, metric), in learning-rate order, first reaches `target`."""
    for (d0, m0), (d1, m1) in zip(points, points[1:]):
        if min(d0, d1) <= target <= max(d0, d1) and d1 != d0:
            return m0 + (m1 - m0) * (target - d0) / (d1 - d0)
    for d, m in points:
        if d == target:
            return m
    return None


def matched_table(groups: dict, base: dict, domain: str, key: str, gains: list[float]) -> list[str]:
    s_dom, s_key = scale(domain), scale(key)
    base_dom = base["metrics"][domain]["value"] * s_dom
    base_key = base["metrics"].get(key, {}).get("value")
    unit = "pts" if s_dom == 100 else METRICS.get(domain, ("", "nats"))[1]
    header = ["method"] + [f"+{g:g} {unit}" for g in gains]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, by_lr in groups.items():
        pts = []
        for lr, runs in by_lr.items():
            d, m = mean_metric(runs, domain), mean_metric(runs, key)
            if d and m:
                pts.append((d["value"] * s_dom, m["value"] * s_key))
        cells = []
        for g in gains:
            v = interpolate_at([(base_dom, (base_key or 0) * s_key)] + pts, base_dom + g) if base_key is not None else None
            cells.append("not reached" if v is None else f"{v - base_key * s_key:+.{1 if s_key == 100 else 4}f}")
        lines.append("| " + " | ".join([method] + cells) + " |")
    return lines


PAIRED = (("disc", "ft"), ("disc_all", "ft"), ("disc", "ft_kl"), ("disc_chat", "disc"), ("disc_ctx", "disc"), ("disc_ctx_strict", "disc"),
          ("disc_t1", "disc"), ("disc_ctx", "ft"), ("disc_ctx_strict", "ft"), ("disc_t1", "ft"))
PAIRED_KEYS = ("knowledge.mcq_loglik", "knowledge.gold_option_logprob", "ifeval.prompt_strict", "drift.chat_kl", "drift.chat_logprob", "drift.doc_kl",
               "nq_open.gold_logprob", "gsm8k.gold_logprob", "mmlu.accuracy")


def paired_difference(a: dict, b: dict, key: str) -> dict | None:
    """a - b over the same items (same ids), with the paired standard error."""
    x, y = a.get("item_scores", {}).get(key), b.get("item_scores", {}).get(key)
    task = key.split(".")[0]
    if not x or not y or len(x) != len(y) or len(x) < 2 or a["tasks"].get(task, {}).get("ids") != b["tasks"].get(task, {}).get("ids"):
        return None
    d = [p - q for p, q in zip(x, y)]
    mean = sum(d) / len(d)
    return {"delta": mean, "se": math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d)), "n": len(d)}


def paired_section(groups: dict) -> list[str]:
    """Method A minus method B at the same learning rate and seed, item by item (the sharpest comparison here)."""
    lines = []
    for a, b in PAIRED:
        if a not in groups or b not in groups:
            continue
        common = [lr for lr in groups[a] if lr in groups[b]]
        rows = []
        for lr in common:
            by_seed = {r["run"].get("seed"): r for r in groups[b][lr]}
            pairs = [(r, by_seed[r["run"].get("seed")]) for r in groups[a][lr] if r["run"].get("seed") in by_seed]
            if not pairs:
                continue
            cells = []
            for key in PAIRED_KEYS:
                diffs = [d for d in (paired_difference(x, y, key) for x, y in pairs) if d]
                if not diffs:
                    cells.append("–")
                    continue
                k, sc = len(diffs), scale(key)
                mean, se = sum(d["delta"] for d in diffs) / k, math.sqrt(sum(d["se"] ** 2 for d in diffs)) / k
                digits = 1 if sc == 100 else (4 if METRICS.get(key, ("", ""))[1] == "kl" else 3)
                mark = "" if se > 0 and abs(mean) >= 2 * se else " n.s."
                cells.append(f"{mean * sc:+.{digits}f} ± {se * sc:.{digits}f}{mark}")
            rows.append("| " + " | ".join([f"{lr:g}", str(len(pairs))] + cells) + " |")
        if rows:
            header = ["lr", "seeds"] + [METRICS.get(k, (k,))[0] for k in PAIRED_KEYS]
            lines += [f"**{a} − {b}**, same learning rate and seed, paired over the same items (n.s.: within 2 SE):", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + rows + [""]
    if lines:
        lines = ["### Method against method, item by item", "",
                 "Differences in points (rates) or nats (log-probs, KLs); for KLs lower is better, for log-probs higher.", ""] + lines
    return lines


def domain_section(name: str, data: dict, domain: str, threshold: float, out: Path) -> tuple[list[str], dict]:
    base = data.get("baseline")
    runs = _with_paths(list(data.get("runs", [])), name)
    if base:
        base["_path"] = f"{name}/baseline/eval.json"
    groups = group_runs(runs)
    selection = cp_select(groups, base, domain, SKILLS, threshold)
    lines = [f"## Domain: {name}", ""]
    if not runs:
        return lines + ["No run finished yet.", ""], {}
    n_runs = len(runs)
    digits = 1 if scale(domain) == 100 else 3
    lines += [f"{n_runs} runs ({len(groups)} methods). Domain score: `{domain}` ({METRICS.get(domain, (domain,))[0]}), "
              f"n = {base['metrics'][domain]['n'] if base else '?'} probes; initial model "
              f"{base['metrics'][domain]['value'] * scale(domain):.{digits}f} ± {base['metrics'][domain]['stderr'] * scale(domain):.{digits}f}." if base else "", ""]
    # CP table
    lines += [f"### Each method at its CP learning rate", "",
              f"CP rule: the learning rate with the best domain score among those that lose at most {threshold:g} points on "
              "IFEval (instruction-level strict), GSM8K and HumanEval. In brackets: change from the initial model ± its "
              "standard error (paired over the same items for a single seed).", ""]
    header = ["method", "CP lr", "seeds", METRICS[domain][0]] + [METRICS[k][0] for k in HEADLINE_KEYS] + ["train s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, by_lr in groups.items():
        lr = selection.get(method, {}).get("lr")
        if lr is None:
            lines.append("| " + " | ".join([method, "none passes"] + ["–"] * (len(header) - 2)) + " |")
            continue
        rs = by_lr[lr]
        train_s = [r["run"].get("train_s") for r in rs if r.get("run", {}).get("train_s") is not None]
        lines.append("| " + " | ".join([method, f"{lr:g}", str(len(rs)), _cell(domain, rs, base)] + [_cell(k, rs, base) for k in HEADLINE_KEYS]
                                       + [f"{sum(train_s) / len(train_s):.0f}" if train_s else "–"]) + " |")
    lines.append("")
    if base:
        max_gain = max((mean_metric(rs, domain) or {"value": -1})["value"] for by_lr in groups.values() for rs in by_lr.values())
        top = (max_gain - base["metrics"][domain]["value"]) * scale(domain)
        if scale(domain) == 100:  # points of accuracy
            gains = [g for g in (4, 8, 12, 16, 20, 25, 30) if g <= top] or [round(top / 2, 1)]
        else:  # a log-probability: a quarter, half and three quarters of the largest gain any run reached
            gains = [round(top * f, 2) for f in (0.25, 0.5, 0.75)] if top > 0 else []
        lines += ["### At matched domain score", "",
                  "Each method's curve over learning rates (initial model, then increasing lr), read by linear interpolation "
                  "where its domain score first reaches the initial score plus the column's gain: the change in a retention "
                  "measure that buys that much knowledge. Mean over seeds; no error bars (interpolated); the per-run tables "
                  "below carry them.", ""]
        for key in ("ifeval.inst_strict", "drift.chat_kl", "drift.chat_logprob", "nq_open.gold_logprob"):
            if key in base["metrics"]:
                lines += [f"Change in **{METRICS[key][0]}**:", ""] + matched_table(groups, base, domain, key, gains) + [""]
    lines += paired_section(groups)
    # plots
    plots = []
    xkeys = [k for k in FRONTIER_KEYS if base and k in base["metrics"]]
    headline = {m: v for m, v in groups.items() if m in HEADLINE_METHODS}
    if len(headline) < len(groups) and len(headline) >= 2:  # the main comparison alone, before the crowded plot
        path = out / f"frontier_{name}_headline.png"
        plot_frontier(path, base, headline, selection, domain, xkeys[:4])
        plots.append(path)
    frontier = out / f"frontier_{name}.png"
    plot_frontier(frontier, base, groups, selection, domain, xkeys)
    plots.append(frontier)
    correlations = {}
    if base and any("drift.doc_kl" in r["metrics"] for r in runs):
        kl_plot = out / f"kl_vs_drop_{name}.png"
        correlations = plot_kl_vs_drop(kl_plot, base, groups, [k for k in ("ifeval.inst_strict", "mmlu.accuracy", "drift.chat_logprob", "gsm8k.gold_logprob")
                                                               if k in base["metrics"]])
        plots.append(kl_plot)
    lines += [f"### Trade-off plots ({name})", ""]
    lines += [f"![{p.stem}](results/{p.name})" for p in plots] + [""]
    if correlations:
        lines += ["Spearman correlation, over every run of this domain, between the per-token KL on the training documents "
                  "and the drop of: " + ", ".join(f"{METRICS[k][0]} {v:+.2f}" if v is not None else f"{METRICS[k][0]} –"
                                                   for k, v in correlations.items()) + ".", ""]
    # full tables (the sweep report's)
    present = set(base["metrics"] if base else {}) | {k for r in runs for k in r["metrics"]}
    keys = [k for k in METRICS if k in present]
    table = build_markdown(ReportConfig(runs_dir=".", domain_metric=domain, cp_threshold=threshold), base, groups, selection, keys, [])
    body = table.split("## Initial model", 1)[-1]
    body = body.split("## CP selection", 1)[0]
    lines += [f"### Every run ({name})", "", "#### Initial model" + body.replace("\n## ", "\n#### ")]
    return lines, {"cp": selection, "kl_correlations": correlations}


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


def continual_section(cont: dict, out: Path) -> list[str]:
    layout = cont["layout"]
    rounds = layout["rounds"]
    probe_round = layout["probe_round"]
    base = cont.get("baseline")
    lines = ["## Continual updates", "",
             f"The corpus in {rounds} batches of {', '.join(str(len(d)) for d in layout['round_docs'])} documents, applied one after "
             "another; each round starts from the previous round's model (for DiSC the teacher is that model too). After every "
             "round: log-likelihood MCQ accuracy on the probes of each round (points ± SE), IFEval and the chat KL from the "
             "initial model.", ""]
    header = ["method", "after round"] + [f"round {r} probes" for r in range(1, rounds + 1)] + ["IFEval inst. strict", "Chat KL(init‖model)", "train s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    series = {}
    if base:
        acc = probe_round_accuracy(base, probe_round)
        lines.append("| initial | 0 | " + " | ".join(f"{acc[r]['value'] * 100:.1f} ± {acc[r]['stderr'] * 100:.1f}" if r in acc else "–"
                                                     for r in range(1, rounds + 1))
                     + f" | {_cell('ifeval.inst_strict', [base], None)} | 0 | – |")
    for method, evals in cont["methods"].items():
        for e in evals:
            r_now = e["run"].get("round")
            acc = probe_round_accuracy(e, probe_round)
            series.setdefault(method, []).append((r_now, acc, e))
            cells = [f"{acc[r]['value'] * 100:.1f} ± {acc[r]['stderr'] * 100:.1f}" if r in acc and r <= r_now else
                     (f"({acc[r]['value'] * 100:.1f})" if r in acc else "–") for r in range(1, rounds + 1)]
            lines.append("| " + " | ".join([method, str(r_now)] + cells + [_cell("ifeval.inst_strict", [e], base), _cell("drift.chat_kl", [e], None),
                                                                           f"{e['run'].get('train_s', 0):.0f}"]) + " |")
    lines += ["", "Numbers in brackets are probes of rounds not trained yet (a check that nothing leaks between rounds).", ""]
    if series:
        path = out / "continual.png"
        plot_continual(path, series, base, probe_round, rounds)
        lines += [f"![continual](results/{path.name})", ""]
    return lines


def plot_continual(path: Path, series: dict, base: dict | None, probe_round: dict, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import COLORS

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    base_acc = probe_round_accuracy(base, probe_round) if base else {}
    styles = ["-", "--", ":", "-."]
    for ci, (method, points) in enumerate(series.items()):
        color = COLORS[ci % len(COLORS)]
        for r in range(1, rounds + 1):
            xs = [0] + [p[0] for p in points if p[0] >= r] if r in base_acc else [p[0] for p in points if p[0] >= r]
            ys = ([base_acc[r]["value"] * 100] if r in base_acc else []) + [p[1][r]["value"] * 100 for p in points if p[0] >= r and r in p[1]]
            es = ([base_acc[r]["stderr"] * 100] if r in base_acc else []) + [p[1][r]["stderr"] * 100 for p in points if p[0] >= r and r in p[1]]
            if len(xs) == len(ys) and ys:
                axes[0].errorbar(xs, ys, yerr=es, color=color, ls=styles[(r - 1) % len(styles)], marker="o", capsize=2,
                                 label=f"{method}: round {r} probes")
        rs = [p[0] for p in points]
        ifeval = [p[2]["metrics"].get("ifeval.inst_strict") for p in points]
        if all(ifeval):
            b = base["metrics"]["ifeval.inst_strict"] if base else None
            axes[1].errorbar(([0] if b else []) + rs, ([b["value"] * 100] if b else []) + [m["value"] * 100 for m in ifeval],
                             yerr=([b["stderr"] * 100] if b else []) + [m["stderr"] * 100 for m in ifeval], color=color, marker="o", capsize=2, label=method)
        kl = [p[2]["metrics"].get("drift.chat_kl") for p in points]
        if all(kl):
            axes[2].errorbar([0] + rs, [0.0] + [m["value"] for m in kl], yerr=[0.0] + [m["stderr"] for m in kl], color=color, marker="o", capsize=2, label=method)
    axes[0].set_title("accuracy on each round's probes (log-lik MCQ)", fontsize=9)
    axes[0].set_ylabel("points")
    axes[1].set_title("IFEval instruction-level strict", fontsize=9)
    axes[1].set_ylabel("points")
    axes[2].set_title("chat KL(initial ‖ model), nats/token", fontsize=9)
    for ax in axes:
        ax.set_xlabel("after round (0 = initial model)")
        ax.set_xticks(range(0, rounds + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Continual updates: does each method keep earlier rounds and its skills? (bars: ±1 SE)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


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


def write_results(summary: dict, results_dir: Path, reading: str = "", log=print) -> dict:
    results_dir = Path(results_dir)
    figures = results_dir / "results"
    figures.mkdir(parents=True, exist_ok=True)
    domain = summary.get("domain_metric", "knowledge.mcq_loglik")
    threshold = float(summary.get("cp_threshold", 5.0))
    env = summary.get("environment", {})
    timings = summary.get("timings_s", {})
    lines = ["# ctxdistill study: DiSC against the baselines", "",
             "Written by `ctxdistill study --config configs/study.yaml` from `docs/results/study_summary.json` "
             "(rebuild without training: `ctxdistill study --report-only --results-dir docs --reading docs/results_reading.md`).", "",
             f"Machine: {env.get('machine', '?')} CPU, {env.get('threads', '?')} torch thread(s) per process"
             + (f", {len([k for k in timings if '.shard' in k])} processes side by side (`--shard`)" if any(".shard" in k for k in timings) else "")
             + f", torch {env.get('torch', '?')}, CUDA {'yes' if env.get('cuda') else 'no'}.", ""]
    lines += compute_account(summary)
    if timings:
        lines += ["Stage wall times the processes recorded, summed over the sessions the study was resumed in (a session stopped "
                  "part-way by a ctxdistill older than 2026-11-22 did not record its time): "
                  + "; ".join(f"{name}: " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in stages.items()) for name, stages in timings.items())
                  + ".", ""]
    missing = summary.get("not_finished") or []
    if missing:
        lines += [f"**Not finished when this summary was written ({len(missing)} planned runs):** " + ", ".join(f"`{m}`" for m in missing)
                  + ". Re-running the study command trains and evaluates them (finished runs are skipped).", ""]
    if reading and Path(reading).is_file():
        lines += ["## Reading", "", Path(reading).read_text(encoding="utf-8").strip(), ""]
    extra = {}
    for name, data in summary.get("domains", {}).items():
        section, info = domain_section(name, data, data.get("domain_metric") or domain, threshold, figures)
        lines += section
        extra[name] = info
    if summary.get("continual"):
        lines += continual_section(summary["continual"], figures)
    path = results_dir / "results.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    tmp.replace(path)
    (figures / "selection.json").write_text(json.dumps(extra, indent=2, default=str) + "\n", encoding="utf-8")
    log(f"study: results -> {path}")
    return {"results": str(path), "selection": extra}
