"""report.md, the plots and the CP selection from fixture evaluations (no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ctxdistill.experiments.comparisons import difference, group_runs, load_evals
from ctxdistill.experiments.report import ReportConfig, write_report
from ctxdistill.experiments.selection import cp_both, cp_select


def metric(value: float, n: int = 100, prop: bool = True) -> dict:
    return {"value": value, "stderr": math.sqrt(value * (1 - value) / n) if prop else 0.01, "n": n}


def fake_eval(path: Path, role: str, scores: dict, run: dict | None = None, items: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    metrics = {k: metric(v, prop=not k.startswith("drift.")) for k, v in scores.items()}
    data = {"schema": "ctxdistill.eval/1", "role": role, "model": "tiny", "suite": "quick", "metrics": metrics, "run": run or {},
            "item_scores": items or {}, "tasks": {k.split(".")[0]: {"ids": ["a", "b", "c", "d"]} for k in scores}, "timings_s": {"total": 1.0}}
    if items and "ifeval.inst_strict" in items:  # instructions of 2 prompts per item id: clustered
        data["item_ids"] = {"ifeval.inst_strict": [f"p{i // 2}" for i in range(len(items["ifeval.inst_strict"]))]}
    (path / "eval.json").write_text(json.dumps(data))


BASE = {"knowledge.mcq_sampled": 0.30, "ifeval.inst_strict": 0.40, "gsm8k.accuracy": 0.10, "humaneval.pass@1": 0.05,
        "drift.chat_logprob": -1.0, "drift.chat_kl": 0.0}
RUNS = {  # method, lr -> scores (changes from BASE)
    ("ft", 1e-5): {"knowledge.mcq_sampled": 0.45, "ifeval.inst_strict": 0.38, "drift.doc_kl": 0.05},
    ("ft", 1e-4): {"knowledge.mcq_sampled": 0.70, "ifeval.inst_strict": 0.20, "drift.doc_kl": 0.60},  # too much forgetting
    ("disc", 1e-5): {"knowledge.mcq_sampled": 0.40, "ifeval.inst_strict": 0.40, "drift.doc_kl": 0.01},
    ("disc", 1e-4): {"knowledge.mcq_sampled": 0.60, "ifeval.inst_strict": 0.37, "drift.doc_kl": 0.08},
}


@pytest.fixture()
def runs_dir(tmp_path):
    fake_eval(tmp_path / "baseline", "baseline", BASE, {"method": "initial"})
    for (method, lr), change in RUNS.items():
        scores = BASE | change | {"drift.chat_kl": change["drift.doc_kl"] / 2, "drift.chat_logprob": -1.0 - change["drift.doc_kl"]}
        fake_eval(tmp_path / "runs" / f"{method}_lr{lr:g}_s1", "updated", scores, {"method": method, "lr": lr, "seed": 1, "train_s": 12.0})
    return tmp_path


def inst_items(rate: float, n: int = 200) -> list[float]:
    return [1.0 if i < round(rate * n) else 0.0 for i in range(n)]


@pytest.fixture()
def runs_with_items(tmp_path):
    """The same runs with per-instruction IFEval scores (200 instructions, 2 per prompt): the confidence-aware
    rule can then bound each drop."""
    base_items = {"ifeval.inst_strict": inst_items(BASE["ifeval.inst_strict"])}
    fake_eval(tmp_path / "baseline", "baseline", BASE, {"method": "initial"}, base_items)
    for (method, lr), change in RUNS.items():
        scores = BASE | change | {"drift.chat_kl": change["drift.doc_kl"] / 2, "drift.chat_logprob": -1.0 - change["drift.doc_kl"]}
        for seed in (1, 2):
            fake_eval(tmp_path / "runs" / f"{method}_lr{lr:g}_s{seed}", "updated", scores, {"method": method, "lr": lr, "seed": seed, "train_s": 12.0},
                      {"ifeval.inst_strict": inst_items(change["ifeval.inst_strict"])})
    return tmp_path


def test_cp_selection_picks_the_best_domain_score_within_the_threshold(runs_dir):
    base, runs = load_evals(runs_dir)
    groups = group_runs(runs)
    selection = cp_select(groups, base, "knowledge.mcq_sampled", ["ifeval.inst_strict", "gsm8k.accuracy", "humaneval.pass@1"], 5.0)
    assert selection["ft"]["lr"] == 1e-5  # lr 1e-4 drops IFEval by 20 points
    assert 1e-4 in selection["ft"]["rejected"]
    assert selection["disc"]["lr"] == 1e-4  # a 3-point drop is allowed
    strict = cp_select(groups, base, "knowledge.mcq_sampled", ["ifeval.inst_strict"], 1.0)
    assert strict["ft"]["lr"] is None and strict["disc"]["lr"] == 1e-5


def test_differences_are_paired_over_the_same_items_or_have_no_interval():
    base = {"metrics": {"m.x": {"value": 0.5, "stderr": 0.05, "n": 4}}, "item_scores": {"m.x": [1, 0, 1, 0]}, "tasks": {"m": {"ids": [1, 2, 3, 4]}}}
    same = {"metrics": {"m.x": {"value": 0.5, "stderr": 0.05, "n": 4}}, "item_scores": {"m.x": [1, 0, 1, 0]}, "tasks": {"m": {"ids": [1, 2, 3, 4]}}}
    d = difference(same, base, "m.x")
    assert d["delta"] == 0 and d["kind"] == "paired" and d["lo"] < 0 < d["hi"]
    moved = {"metrics": {"m.x": {"value": 0.75, "stderr": 0.05, "n": 4}}, "item_scores": {"m.x": [1, 1, 1, 0]}, "tasks": {"m": {"ids": [1, 2, 3, 4]}}}
    d = difference(moved, base, "m.x")
    assert d["delta"] == pytest.approx(0.25) and d["p"] == 1.0  # one discordant pair: exact McNemar p = 1
    other_items = dict(moved, tasks={"m": {"ids": [5, 6, 7, 8]}})
    assert difference(other_items, base, "m.x")["kind"] == "different items"
    no_items = dict(moved, item_scores={})
    d = difference(no_items, base, "m.x")
    assert d["delta"] == pytest.approx(0.25) and d["kind"] == "no per-item scores" and d["lo"] is None


def test_confidence_aware_cp_rule_needs_the_upper_bound_of_each_drop_within_the_threshold(runs_with_items):
    base, runs = load_evals(runs_with_items)
    cp = cp_both(group_runs(runs), base, "knowledge.mcq_sampled", ["ifeval.inst_strict"], 5.0)
    assert cp["paper"]["disc"]["lr"] == 1e-4  # a 3-point drop passes on its point estimate ...
    assert cp["confident"]["disc"]["lr"] == 1e-5  # ... but its upper bound (200 instructions) is above 5 points
    # ft's 2-point drop at 1e-5 is 4 discordant instructions per seed: pooled (8 of 400), Tango's bound is 3.9 < 5
    assert cp["confident"]["ft"]["lr"] == 1e-5 and 1e-4 in cp["confident"]["ft"]["rejected"]
    assert cp["per_seed"]["1"]["disc"] == {"paper": 1e-4, "confident": 1e-5}


def test_report_markdown_and_plots(runs_dir):
    paths = write_report(ReportConfig(runs_dir=str(runs_dir)))
    text = Path(paths["report"]).read_text()
    assert "## ft" in text and "## disc" in text and "## CP selection" in text
    assert "**(CP)**" in text and "n.s." not in text
    assert "[— no per-item scores]" in text and "Confidence-aware rule" in text
    assert "| ft | lr 1e-05 |" in text and "| disc | lr 0.0001 |" in text
    assert "Spearman" in text
    for plot in paths["plots"]:
        data = Path(plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert {Path(p).name for p in paths["plots"]} == {"frontier.png", "kl_vs_drop.png"}
    selection = json.loads((runs_dir / "selection.json").read_text())
    assert selection["threshold"] == 5.0


def test_report_cli_and_errors(runs_dir, tmp_path, capsys):
    from ctxdistill.cli import main

    assert main(["report", str(runs_dir), "--cp-threshold", "1"]) == 0
    out = capsys.readouterr().out
    assert "CP selection ft: no learning rate meets the constraint" in out and "report:" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "no eval.json" in capsys.readouterr().err


def test_report_with_item_scores_prints_intervals_holm_family_and_mde(runs_with_items):
    text = Path(write_report(ReportConfig(runs_dir=str(runs_with_items)))["report"]).read_text()
    assert "family of 2 tests" in text and "| MDE |" in text  # per method table: two lrs with an IFEval interval
    assert "†" in text  # ft at 1e-4 loses 20 points of 200 instructions over 2 seeds: flagged
