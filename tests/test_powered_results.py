"""The committed powered study (docs/results/study_summary.json) holds what its pre-registration promised.

These read the committed summary, not a fresh run: they fail if a later `--summary-only` rebuilds it from
fewer records (a lost run directory, a half-copied checkout), which would silently shrink the report's seeds.
"""

import json
from collections import defaultdict
from pathlib import Path

import pytest

SUMMARY = Path(__file__).resolve().parents[1] / "docs" / "results" / "study_summary.json"


@pytest.fixture(scope="module")
def domains():
    return json.loads(SUMMARY.read_text())["domains"]


def seeds_per_cell(domain, methods):
    cells = defaultdict(set)
    for run in domain["runs"]:
        if run["run"]["method"] in methods:
            cells[run["run"]["method"], run["run"]["lr"]].add(run["run"]["seed"])
    return cells


def test_primary_arms_have_three_seeds_at_each_learning_rate(domains):
    cells = seeds_per_cell(domains["news_a"], {"disc", "ft"})
    assert {method for method, _ in cells} == {"disc", "ft"}
    assert all(len(seeds) >= 3 for seeds in cells.values()), cells


def test_every_confirmatory_ifeval_evaluation_scores_all_541_prompts(domains):
    for name in ("news_a", "news_qwen"):
        evaluations = [domains[name]["baseline"], *domains[name]["runs"]]
        assert all(e["metrics"]["ifeval.prompt_strict"]["n"] == 541 for e in evaluations), name


def test_the_study_covers_two_post_trained_architectures(domains):
    assert domains["news_a"]["baseline"]["model"] == "smollm2-135m-instruct"
    assert domains["news_qwen"]["baseline"]["model"] == "qwen2.5-coder-0.5b-instruct"
    cells = seeds_per_cell(domains["news_qwen"], {"disc", "ft"})
    assert {method for method, _ in cells} == {"disc", "ft"} and all(len(s) >= 2 for s in cells.values()), cells
