"""The report's plots (matplotlib, Agg): the knowledge-retention frontier and KL against skill drops.

At most `MAX_SERIES` methods per panel, the legend outside the axes, 95 % intervals as error bars, and
the same colour for a method in every plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from .comparisons import KL_KEYS, METRICS, digits_of, mean_metric, probe_round_accuracy, scale, vs_base

FIXED_COLORS = {"disc": "#1f77b4", "ft": "#2ca02c", "disc_all": "#d62728", "ft_kl": "#9467bd"}  # the same in every plot
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
          "#000080", "#ff1493", "#b8860b"]


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
    handles = {}
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


def plot_continual(path: Path, series: dict, base: dict | None, probe_round: dict, rounds: int) -> None:
    """One panel per round's probes and per retention measure; every round's value printed at its point; 95 % bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    keys = [k for k in ("ifeval.prompt_strict", "ifeval.inst_strict", "drift.chat_kl") if base is None or k in base["metrics"] or k in KL_KEYS]
    fig, axes = _grid(plt, rounds + len(keys), cols=3)
    base_acc = probe_round_accuracy(base, probe_round) if base else {}

    labels: dict = {}

    def draw(ax, xs, ys, es, color, label, digits):
        ax.errorbar(xs, ys, yerr=es, color=color, marker="o", capsize=2, label=label)
        labels.setdefault(ax, []).extend((x, y, f"{y:.{digits}f}", color) for x, y in zip(xs, ys))

    colors = color_map(series)
    for method, points in series.items():
        color = colors[method]
        for r in range(1, rounds + 1):
            pts = [(0, base_acc[r])] if r in base_acc else []
            pts += [(p[0], p[1][r]) for p in points if p[0] >= r and r in p[1]]
            if pts:
                draw(axes[r - 1], [x for x, _ in pts], [m["value"] * 100 for _, m in pts], [1.96 * m["stderr"] * 100 for _, m in pts], color, method, 1)
        for ax, key in zip(axes[rounds:], keys):
            s = scale(key)
            pts = [(0, mean_metric([base], key) if key in base["metrics"] else {"value": 0.0, "half": 0.0})] if base else []
            pts += [(p[0], mean_metric([p[2]], key)) for p in points]
            pts = [(x, m) for x, m in pts if m]
            draw(ax, [x for x, _ in pts], [m["value"] * s for _, m in pts], [(m.get("half") or 0.0) * s for _, m in pts], color, method, digits_of(key))
    for r in range(1, rounds + 1):
        axes[r - 1].set_title(f"round {r} probes (log-lik MCQ, points), trained in round {r}", fontsize=8)
    for ax, key in zip(axes[rounds:], keys):
        ax.set_title(METRICS[key][0] + (" (points)" if scale(key) == 100 else " (nats/token)"), fontsize=8)
    for ax in axes[: rounds + len(keys)]:
        ax.set_xlabel("after round (0 = initial model)", fontsize=8)
        ax.set_xticks(range(0, rounds + 1))
        ax.set_xlim(-0.3, rounds + 0.5)
        ax.grid(alpha=0.3)
        place_labels(ax, labels.get(ax, []), min_dist=0.04)
    _finish(fig, "Continual updates: each round's value (bars: 95 % intervals; IFEval inst.-level without per-item scores: ±1.96 SE)", path)
