"""CP selection: which learning rate each method would be run at.

The DiSC paper's rule: the best domain score among the learning rates whose drop on each post-training
skill is at most `threshold` points. The confidence-aware rule beside it: the upper 95 % bound of each
drop at most `threshold` points. Both per seed and over seeds, with whether the picks agree.
"""

from __future__ import annotations

import math

from .comparisons import FALLBACK, mean_metric, scale, vs_base

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
