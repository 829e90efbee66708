"""report.md, the plots and the CP selection from fixture evaluations (no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ctxdistill.report import ReportConfig, cp_select, difference, group_runs, load_evals, significant, write_report


def metric(value: float, n: int = 100, prop: bool = True) -> dict:
    return {"value": value, "stderr": math.sqrt(value * (1 - value) / n) if prop else 0.01, "n": n}


def fake_eval(path: Path, role: str, scores: dict, run: dict | None = None, items: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    metrics = {k: metric(v, prop=not k.startswith("drift.")) for k, v in scores.items()}
    data = {"schema": "ctxdistill.eval/1", "role": role, "model": "tiny", "suite": "quick", "metrics": metrics, "run": run or {},
            "item_scores": items or {}, "tasks": {k.split(".")[0]: {"ids": ["a", "b", "c", "d"]} for k in scores}, "timings_s": {"total": 1.0}}
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


def test_cp_selection_picks_the_best_domain_score_within_the_threshold(runs_dir):
    base, runs = load_evals(runs_dir)
    groups = group_runs(runs)
    selection = cp_select(groups, base, "knowledge.mcq_sampled", ["ifeval.inst_strict", "gsm8k.accuracy", "humaneval.pass@1"], 5.0)
    assert selection["ft"]["lr"] == 1e-5  # lr 1e-4 drops IFEval by 20 points
    assert 1e-4 in selection["ft"]["rejected"]
    assert selection["disc"]["lr"] == 1e-4  # a 3-point drop is allowed
    strict = cp_select(groups, base, "knowledge.mcq_sampled", ["ifeval.inst_strict"], 1.0)
    assert strict["ft"]["lr"] is None and strict["disc"]["lr"] == 1e-5


def test_differences_and_significance():
    base = {"metrics": {"m.x": {"value": 0.5, "stderr": 0.05, "n": 4}}, "item_scores": {"m.x": [1, 0, 1, 0]}, "tasks": {"m": {"ids": [1, 2, 3, 4]}}}
    same = {"metrics": {"m.x": {"value": 0.5, "stderr": 0.05, "n": 4}}, "item_scores": {"m.x": [1, 0, 1, 0]}, "tasks": {"m": {"ids": [1, 2, 3, 4]}}}
    d = difference(same, base, "m.x")
    assert d["delta"] == 0 and d["kind"] == "paired" and not significant(d, 2.0)
    moved = {"metrics": {"m.x": {"value": 0.75, "stderr": 0.05, "n": 4}}, "item_scores": {"m.x": [1, 1, 1, 0]}, "tasks": {"m": {"ids": [1, 2, 3, 4]}}}
    d = difference(moved, base, "m.x")
    assert d["delta"] == pytest.approx(0.25) and d["se"] == pytest.approx(0.25)  # paired: SD of (0,1,0,0) / 2
    assert not significant(d, 2.0)
    other_items = dict(moved, tasks={"m": {"ids": [5, 6, 7, 8]}})
    d = difference(other_items, base, "m.x")
    assert d["kind"] == "unpaired" and d["se"] == pytest.approx(math.sqrt(2) * 0.05)
    assert significant(d, 2.0)


def test_report_markdown_and_plots(runs_dir):
    paths = write_report(ReportConfig(runs_dir=str(runs_dir)))
    text = Path(paths["report"]).read_text()
    assert "## ft" in text and "## disc" in text and "## CP selection" in text
    assert "**(CP)**" in text and "n.s." in text
    assert "- **ft**: lr 1e-05" in text and "- **disc**: lr 0.0001" in text
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
