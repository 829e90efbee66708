"""Study: sweeps per domain with variants, continual rounds, one summary JSON, results.md rebuilt from it alone."""

from __future__ import annotations

import json

import numpy as np

import pytest
import yaml

from ctxdistill.errors import CtxDistillError
from ctxdistill.experiments.study import continual_rounds, load_study_config, run_study
from ctxdistill.experiments.comparisons import probe_round_accuracy
from ctxdistill.stats import interpolate_at


def write_study(tmp_path, tiny_model_dir, corpus_file, **extra):
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f"doc-{i}-q", "doc_id": f"doc-{i}", "question": f"Who leads place {i}?",
                                          "options": ["Anika Dros", "Teodor Vask"], "answer": i}) + "\n" for i in range(2)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    config = {
        "out": str(tmp_path / "study"), "model": str(tiny_model_dir), "results_dir": str(tmp_path / "docs"),
        "train": {"max_steps": 1, "precision": "fp32", "teacher_dtype": "fp32", "max_length": 128},
        "eval": {"tasks": "knowledge,drift,doc_kl", "knowledge_parts": "loglik", "batch_size": 4, "chat_prompts": str(chat)},
        "domains": {"news": {"corpus": str(corpus_file), "probes": str(probes), "methods": ["ft", "disc_all"], "lrs": [1e-3],
                             "method_overrides": {"ft": {"seeds": [1, 2]}, "disc_all": {"method": "disc", "split_strategy": "all_sentences"}}}},
        "continual": {"corpus": str(corpus_file), "probes": str(probes), "rounds": 2, "methods": {"disc": {"lr": 1e-3}, "ft": {"lr": 1e-3}}},
    }
    config.update(extra)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_continual_rounds_cut_the_corpus_in_order_into_near_equal_batches():
    assert continual_rounds(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(CtxDistillError, match="cannot fill"):
        continual_rounds([1], 2)


def test_interpolation_reads_a_curve_where_it_first_reaches_the_target():
    curve = [(20.0, 40.0), (30.0, 38.0), (40.0, 30.0)]
    assert interpolate_at(curve, 25.0) == pytest.approx(39.0)
    assert interpolate_at(curve, 35.0) == pytest.approx(34.0)
    assert interpolate_at(curve, 45.0) is None


def test_probe_round_accuracy_groups_item_scores_by_round():
    evaluation = {"item_scores": {"knowledge.mcq_loglik": [1.0, 0.0, 1.0]}, "tasks": {"knowledge": {"ids": ["a", "b", "c"]}}}
    acc = probe_round_accuracy(evaluation, {"a": 1, "b": 1, "c": 2})
    assert acc[1]["value"] == 0.5 and acc[1]["n"] == 2 and acc[2]["value"] == 1.0


def test_study_config_errors(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    with pytest.raises(CtxDistillError, match="unknown method"):
        load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, domains={"news": {"methods": ["magic"]}}))).validate()
    with pytest.raises(CtxDistillError, match="unknown key"):
        load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, domains={"news": {"methodz": ["ft"]}}))).validate()
    with pytest.raises(CtxDistillError, match="rounds must be >= 2"):
        load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, continual={"rounds": 1, "methods": {"ft": {}}}))).validate()
    monkeypatch.setattr("ctxdistill.model_sources.models_dir", lambda: tmp_path / "no_models")
    with pytest.raises(CtxDistillError, match="ctxdistill fetch-model qwen2.5-coder-0.5b-instruct"):
        load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, domains={
            "a": {"methods": ["ft"]}, "b": {"methods": ["disc"], "model": "qwen2.5-coder-0.5b-instruct"}}))).validate()
    with pytest.raises(CtxDistillError, match="different models"):
        load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, domains={
            "a": {"methods": ["ft"]}, "b": {"methods": ["disc"], "sweep_dir": "a", "model": str(tmp_path)}}))).validate()


def test_each_domain_can_start_from_its_own_model_and_the_summary_names_it(tmp_path, tiny_model_dir, corpus_file, short_preset):
    import shutil

    other = tmp_path / "second_architecture"
    shutil.copytree(tiny_model_dir, other)
    path = write_study(tmp_path, tiny_model_dir, corpus_file, continual={}, domains={
        "small": {"corpus": str(corpus_file), "methods": ["ft"], "lrs": [1e-3]},
        "other": {"corpus": str(corpus_file), "methods": ["ft"], "lrs": [1e-3], "model": str(other)}})
    cfg = load_study_config(str(path))
    run_study(cfg, log=lambda *_: None, progress=False, config_path="configs/two_models.yaml")
    summary = json.loads((tmp_path / "docs" / "results" / "study_summary.json").read_text())
    assert summary["domains"]["small"]["baseline"]["model"] == str(tiny_model_dir)
    assert summary["domains"]["other"]["baseline"]["model"] == str(other)
    assert summary["domains"]["other"]["runs"][0]["run"]["train"]["method"] == "ft"
    results = (tmp_path / "docs" / "results.md").read_text()
    assert "Written by `ctxdistill study --config configs/two_models.yaml`" in results


def test_one_device_option_reaches_every_run_and_evaluation(tmp_path, tiny_model_dir, corpus_file):
    cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, device="cpu",
                                            train={"max_steps": 1, "device": "cuda"}, eval={"device": "cuda"})))
    sweep = cfg.sweep_config("news")
    assert sweep.train_config("ft", 1e-3, 1).device == "cpu" and sweep.eval_config("baseline").device == "cpu"
    unset = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, train={"max_steps": 1, "device": "cpu"})))
    assert unset.sweep_config("news").train_config("ft", 1e-3, 1).device == "cpu"  # no study device: the train: one stays


def test_study_runs_every_stage_resumes_and_rebuilds_results_from_the_summary(tmp_path, tiny_model_dir, corpus_file, monkeypatch, short_preset):
    quiet = dict(log=lambda *_: None, progress=False)
    cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file)))
    run_study(cfg, **quiet)
    summary = json.loads((tmp_path / "docs" / "results" / "study_summary.json").read_text())
    runs = summary["domains"]["news"]["runs"]
    assert sorted(r["run"]["name"] for r in runs) == ["disc_all_lr0.001_s1234", "ft_lr0.001_s1", "ft_lr0.001_s2"]
    disc_all = next(r for r in runs if r["run"]["method"] == "disc_all")
    assert disc_all["run"]["base_method"] == "disc" and disc_all["run"]["train"]["split_strategy"] == "all_sentences"
    assert "knowledge.mcq_loglik" in disc_all["metrics"] and "knowledge.mcq_sampled" not in disc_all["metrics"]
    cont = summary["continual"]
    assert cont["layout"]["round_docs"] == [["doc-0"], ["doc-1"]] and [len(v) for v in cont["methods"].values()] == [2, 2]
    # round 2 starts from round 1's model
    run2 = json.loads((tmp_path / "study" / "continual" / "disc" / "round2" / "run.json").read_text())
    assert run2["config"]["model"].endswith("continual/disc/round1/model")
    assert summary["not_finished"] == []
    assert all(r["run"]["timings_s"]["train"] > 0 for r in runs)  # from each run.json, for the compute account
    text = (tmp_path / "docs" / "results.md").read_text()
    evaluations = len(list((tmp_path / "study").rglob("eval.json")))  # baselines, sweep runs, continual rounds on disk
    assert evaluations == 2 + len(runs) + sum(len(v) for v in cont["methods"].values())
    assert f"Compute in the {evaluations} evaluations" in text, "the compute account counts every evaluation of the study"
    for heading in ("## Domain: news", "### Each method at its CP learning rate", "## Continual updates", "### Every run (news)"):
        assert heading in text
    assert (tmp_path / "docs" / "results" / "frontier_news.png").is_file() and (tmp_path / "docs" / "results" / "continual.png").is_file()

    # Resume: nothing trains again.
    import ctxdistill.training

    monkeypatch.setattr(ctxdistill.training, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    run_study(cfg, **quiet)

    # --report-only rebuilds results.md from the summary alone (the run directories may be gone).
    import shutil

    shutil.rmtree(tmp_path / "study")
    (tmp_path / "docs" / "results.md").unlink()
    only = load_study_config(None, {"report_only": True, "results_dir": str(tmp_path / "docs")})
    run_study(only, **quiet)
    assert (tmp_path / "docs" / "results.md").read_text() == text

    # A domain can have its own domain score (e.g. a log-probability where accuracy cannot move).
    from ctxdistill.experiments.study_report import write_results

    summary["domains"]["news"]["domain_metric"] = "knowledge.gold_option_logprob"
    write_results(summary, tmp_path / "docs2", log=lambda *_: None)
    other = (tmp_path / "docs2" / "results.md").read_text()
    assert "Domain score: `knowledge.gold_option_logprob`" in other and "Domain score: `knowledge.mcq_loglik`" not in other


def test_a_domain_metric_names_the_score_of_its_sweep_directory(tmp_path, tiny_model_dir, corpus_file):
    domains = {"news": {"corpus": str(corpus_file), "methods": ["ft"]},
               "bio_extra": {"sweep_dir": "bio", "corpus": str(corpus_file), "methods": ["disc"], "domain_metric": "knowledge.gold_option_logprob"}}
    cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, domains=domains)))
    assert cfg.domain_metric_of("news") == "knowledge.mcq_loglik" and cfg.domain_metric_of("bio") == "knowledge.gold_option_logprob"


def test_a_stage_stopped_part_way_still_records_its_time(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    import ctxdistill.experiments.sweep

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ctxdistill.experiments.sweep, "run_sweep", stopped)
    cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, continual={})))
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, log=lambda *_: None, progress=False)
    assert "domain:news" in json.loads((tmp_path / "study" / "timings.json").read_text())


def test_shards_split_the_plan_and_together_cover_it(tmp_path, tiny_model_dir, corpus_file):
    from dataclasses import replace

    from ctxdistill.experiments.sweep import SweepConfig

    cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file))).validate()
    whole = cfg.sweep_config("news").plan()
    parts = [load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, shard=f"{i}/2"))).sweep_config("news").plan() for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(whole) and not set(parts[0]) & set(parts[1])
    staggered = SweepConfig(methods=["ft", "disc", "rephrase", "cd_base"], lrs=[1e-5, 1e-4])
    orders = [[m for m, _, _ in replace(staggered, shard=f"{i}/2").plan()] for i in range(2)]
    assert orders == [["ft", "disc", "rephrase", "cd_base"], ["rephrase", "cd_base", "ft", "disc"]]  # never the same method at once
    with pytest.raises(CtxDistillError, match="i/n"):
        SweepConfig(shard="two").shard_of()
    with pytest.raises(CtxDistillError, match="0..n-1"):
        SweepConfig(shard="2/2").shard_of()


def test_a_one_process_domain_runs_whole_in_shard_0_and_other_shards_skip_it(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    import ctxdistill.experiments.sweep as sweep_module

    ran = []
    monkeypatch.setattr(sweep_module, "run_sweep", lambda sweep, **_: ran.append((sweep.out.rsplit("/", 1)[-1], sweep.shard, len(sweep.plan()))))
    domains = {"small": {"corpus": str(corpus_file), "methods": ["ft", "disc"], "lrs": [1e-3]},
               "large": {"corpus": str(corpus_file), "methods": ["ft", "disc"], "lrs": [1e-3], "one_process": True}}
    for i in range(2):
        cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, continual={}, domains=domains, stages=["small", "large"],
                                                shard=f"{i}/2")))
        run_study(cfg, log=lambda *_: None, progress=False)
    # shard 0: its half of `small`, then all of `large`; shard 1: its half of `small` only
    assert ran == [("small", "0/2", 1), ("large", "", 2), ("small", "1/2", 1)]


def test_a_summary_is_never_replaced_by_one_with_fewer_evaluations(tmp_path, tiny_model_dir, corpus_file):
    summary = tmp_path / "docs" / "results" / "study_summary.json"
    summary.parent.mkdir(parents=True)
    committed = json.dumps({"domains": {"news": {"baseline": {"metrics": {}}, "runs": [{"metrics": {}}] * 3}}})
    summary.write_text(committed)
    cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, summary_only=True, out=str(tmp_path / "empty"))))
    with pytest.raises(CtxDistillError, match="holds 4 evaluations and the runs in .*empty only 0: not replacing it"):
        run_study(cfg, log=lambda *_: None, progress=False)
    assert summary.read_text() == committed and not (tmp_path / "docs" / "results.md").exists()


def test_summary_only_reports_what_is_missing_and_trains_nothing(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    import ctxdistill.training

    monkeypatch.setattr(ctxdistill.training, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    cfg = load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, summary_only=True)))
    run_study(cfg, log=lambda *_: None, progress=False)
    summary = json.loads((tmp_path / "docs" / "results" / "study_summary.json").read_text())
    assert "news/ft_lr0.001_s1" in summary["not_finished"] and "continual/disc/round2" in summary["not_finished"]
    assert "Not finished when this summary was written" in (tmp_path / "docs" / "results.md").read_text()


def test_method_comparisons_pair_the_same_items_and_seeds():
    from ctxdistill.experiments.comparisons import compare, seed_pairs

    def ev(scores, ids=(1, 2, 3, 4), seed=1):
        return {"metrics": {"t.x": {"value": sum(scores) / 4, "stderr": 0.1, "n": 4}}, "item_scores": {"t.x": scores},
                "tasks": {"t": {"ids": list(ids)}}, "run": {"seed": seed}}
    a, b = ev([1.0, 1.0, 0.0, 1.0]), ev([0.0, 1.0, 0.0, 0.0])
    d = compare([a], [b], "t.x")
    assert d.delta == pytest.approx(0.5) and d.p == pytest.approx(0.5) and d.n == 4  # 2 discordant pairs, both for a
    assert compare([a], [ev([0.0, 1.0, 0.0, 0.0], ids=(4, 3, 2, 1))], "t.x").reason == "different items"
    xa, xb = seed_pairs([ev([1.0] * 4, seed=2), a], [b, ev([0.0] * 4, seed=3)])
    assert xa == [a] and xb == [b]  # only seed 1 was trained for both


def test_matched_gain_table_bootstraps_items_and_reports_the_reach():
    from ctxdistill.experiments.study_report import matched_table

    ids = [f"q{i}" for i in range(40)]

    def ev(acc: float, kl: float, method: str = "", lr: float = 0.0, role: str = "updated"):
        correct = [1.0 if i < round(acc * 40) else 0.0 for i in range(40)]
        kls = [kl * (0.5 + (i % 4) / 3) for i in range(24)]  # mean kl over 24 prompts
        return {"role": role, "run": {"method": method, "lr": lr, "seed": 1}, "_path": f"{method}{lr}",
                "metrics": {"knowledge.mcq_loglik": {"value": sum(correct) / 40, "stderr": 0.05, "n": 40},
                            "drift.chat_kl": {"value": sum(kls) / 24, "stderr": 0.01, "n": 24}},
                "item_scores": {"knowledge.mcq_loglik": correct, "drift.chat_kl": kls},
                "tasks": {"knowledge": {"ids": ids}, "drift": {"ids": [f"c{i}" for i in range(24)]}}}

    base = ev(0.2, 0.0, role="baseline")
    base["item_scores"].pop("drift.chat_kl")  # the initial model's KL from itself: 0 on every item
    groups = {"ft": {1e-5: [ev(0.3, 0.1, "ft", 1e-5)], 1e-4: [ev(0.5, 0.3, "ft", 1e-4)]},
              "disc": {1e-5: [ev(0.3, 0.05, "disc", 1e-5)], 1e-4: [ev(0.5, 0.15, "disc", 1e-4)]}}
    text = "\n".join(matched_table(groups, base, "knowledge.mcq_loglik", "drift.chat_kl", [20.0], B=200))
    # +20 points: halfway between +10 and +30, so the point estimates are 0.2 (ft) and 0.1 (disc)
    ft_row = next(line for line in text.splitlines() if line.startswith("| ft |"))
    assert ft_row.startswith("| ft | +0.2000 [") and "%)" in ft_row
    assert "| **disc − ft** | -0.1000 [" in text and "family of 1 test)" in text
    assert "Both curves reach the gain in: **disc − ft**" in text
    # a method whose evaluations skipped the task is "not measured", never a curve that "did not reach" the gain
    unmeasured = ev(0.5, 0.0, "sdft", 1e-4)
    for part in ("metrics", "item_scores"):
        unmeasured[part].pop("drift.chat_kl")
    text = "\n".join(matched_table(groups | {"sdft": {1e-4: [unmeasured]}}, base, "knowledge.mcq_loglik", "drift.chat_kl", [20.0], B=200))
    assert "| sdft |" not in text and "**sdft − " not in text and "Not measured for sdft" in text


def _run(acc: float, ifeval: float, method: str, lr: float, seed: int, n: int = 60, role: str = "updated", shift: int = 0):
    """One synthetic evaluation: the first `acc` of n probes right, and `ifeval` of n prompts followed (prompt i
    when (i + shift) % n < ifeval * n, so seeds with different shifts follow different prompts at the same rate)."""
    probes = [1.0 if i < round(acc * n) else 0.0 for i in range(n)]
    prompts = [1.0 if (i + shift) % n < round(ifeval * n) else 0.0 for i in range(n)]
    return {"role": role, "run": {"method": method, "lr": lr, "seed": seed}, "_path": f"{method}{lr}{seed}",
            "metrics": {"knowledge.mcq_loglik": {"value": sum(probes) / n, "stderr": 0.05, "n": n},
                        "ifeval.prompt_strict": {"value": sum(prompts) / n, "stderr": 0.05, "n": n}},
            "item_scores": {"knowledge.mcq_loglik": probes, "ifeval.prompt_strict": prompts},
            "tasks": {"knowledge": {"ids": [f"q{i}" for i in range(n)]}, "ifeval": {"ids": [f"p{i}" for i in range(n)]}}}


def test_matched_gain_bootstrap_resamples_seeds_so_seed_spread_widens_the_interval():
    from ctxdistill.experiments.study_report import matched_bootstrap

    base = _run(0.2, 0.6, "initial", 0.0, 0, role="baseline")

    def groups(ifeval_by_seed):
        return {"disc": {1e-4: [_run(0.4, 0.6, "disc", 1e-4, s) for s in (1, 2, 3)]},
                "ft": {1e-4: [_run(0.4, f, "ft", 1e-4, s, shift=7 * s) for s, f in zip((1, 2, 3), ifeval_by_seed)]}}

    def width(ifeval_by_seed, seeds):
        boot = matched_bootstrap(groups(ifeval_by_seed), base, "knowledge.mcq_loglik", "ifeval.prompt_strict", [10.0], B=400, seeds=seeds)
        diff = boot["values"][("disc", 10.0)] - boot["values"][("ft", 10.0)]  # halfway up a +20-point curve
        assert np.isfinite(diff).mean() > 0.9  # NaN: a resample whose curve does not reach the gain
        return np.nanquantile(diff, 0.975) - np.nanquantile(diff, 0.025)

    # seeds that disagree (FT's IFEval 0.3, 0.5, 0.7 at the same knowledge) widen the two-level interval
    assert width([0.3, 0.5, 0.7], seeds=True) > 1.3 * width([0.3, 0.5, 0.7], seeds=False)
    # one seed per cell: nothing to resample at the outer level, the same draws as items alone
    single = {"disc": {1e-4: [_run(0.4, 0.6, "disc", 1e-4, 1)]}, "ft": {1e-4: [_run(0.4, 0.5, "ft", 1e-4, 1)]}}
    a = matched_bootstrap(single, base, "knowledge.mcq_loglik", "ifeval.prompt_strict", [20.0], B=100, seeds=True)["values"]
    b = matched_bootstrap(single, base, "knowledge.mcq_loglik", "ifeval.prompt_strict", [20.0], B=100, seeds=False)["values"]
    assert np.array_equal(a[("ft", 20.0)], b[("ft", 20.0)], equal_nan=True)


def test_a_methods_matched_resamples_do_not_move_when_another_method_joins_the_table():
    """Each (method, lr) cell draws its seeds from its own generator: adding `disc_chat` between `disc` and
    `ft` (alphabetically) leaves FT's resamples, and so DiSC − FT, exactly as they were."""
    from ctxdistill.experiments.study_report import matched_bootstrap

    base = _run(0.2, 0.6, "initial", 0.0, 0, role="baseline")
    cells = {m: {1e-4: [_run(0.4, 0.5 + 0.05 * s, m, 1e-4, s, shift=3 * s) for s in (1, 2, 3)]} for m in ("disc", "disc_chat", "ft")}
    two = matched_bootstrap({m: cells[m] for m in ("disc", "ft")}, base, "knowledge.mcq_loglik", "ifeval.prompt_strict", [10.0], B=200)
    three = matched_bootstrap(cells, base, "knowledge.mcq_loglik", "ifeval.prompt_strict", [10.0], B=200)
    for method in ("disc", "ft"):
        assert np.array_equal(two["values"][(method, 10.0)], three["values"][(method, 10.0)], equal_nan=True)


def test_the_preregistered_primary_reads_the_matched_gain_and_states_the_decision():
    from ctxdistill.experiments.study_report import primary_lines

    base = _run(0.2, 0.6, "initial", 0.0, 0, role="baseline")
    # both methods gain +20 points at 1e-4 and +40 at 3e-4; DiSC keeps IFEval at 0.6, FT drops to 0.4 and 0.2
    groups = {"disc": {lr: [_run(acc, 0.6, "disc", lr, s, shift=s) for s in (1, 2, 3)] for lr, acc in ((1e-4, 0.4), (3e-4, 0.6))},
              "ft": {lr: [_run(acc, f, "ft", lr, s, shift=s) for s in (1, 2, 3)] for lr, acc, f in ((1e-4, 0.4, 0.4), (3e-4, 0.6, 0.2))}}
    primary = {"domain": "news", "a": "disc", "b": "ft", "metric": "ifeval.prompt_strict", "gain": 30, "bootstrap": 300,
               "registered": "docs/study_plan.md (v1)"}
    text = "\n".join(primary_lines(primary, "news", groups, base, "knowledge.mcq_loglik"))
    # at +30 points FT is halfway between 0.4 and 0.2 (0.3), DiSC at 0.6: +30.0 points
    assert "at matched gain (+30 points" in text and "**+30.0 [" in text
    assert "lies above 0: disc keeps it better than ft" in text and "Pre-registered in docs/study_plan.md (v1)." in text
    assert "seeds per learning rate disc [3], ft [3]" in text
    # a gain no curve reaches is said to be out of reach, not estimated
    far = "\n".join(primary_lines(primary | {"gain": 60}, "news", groups, base, "knowledge.mcq_loglik"))
    assert "Not estimable: a curve does not reach the gain" in far
    # without `gain` the comparison stays at one learning rate and says it was designated after the runs
    at_lr = "\n".join(primary_lines({"domain": "news", "a": "disc", "b": "ft", "metric": "ifeval.prompt_strict", "lr": 1e-4}, "news", groups))
    assert "lr 0.0001" in at_lr and "Designated in the study config after this study was run" in at_lr


def test_only_the_preregistered_columns_of_a_paired_table_are_labelled_so(tmp_path, tiny_model_dir, corpus_file):
    """The plan registers some A − B comparisons (e.g. arm B's DiSC − FT on IFEval and chat KL); the report says
    which columns those are and leaves every other pair and column exploratory."""
    from ctxdistill.experiments.study_report import paired_section

    groups = {m: {1e-4: [_run(0.4, 0.5 + 0.05 * s, m, 1e-4, s, shift=s) for s in (1, 2)]} for m in ("disc", "ft", "disc_chat")}
    text = "\n".join(paired_section(groups, registered={("disc", "ft"): ["ifeval.prompt_strict"]}))
    assert "**disc − ft**, same learning rate and seed, paired over the same items (pre-registered secondary endpoint for " \
           "IFEval prompt strict; the other columns exploratory):" in text
    assert "**disc_chat − disc**, same learning rate and seed, paired over the same items (exploratory):" in text
    assert "### Method against method, item by item (exploratory)" in "\n".join(paired_section(groups))
    with pytest.raises(CtxDistillError, match="secondary entry .* needs domain \\(one of news\\), a and b"):
        load_study_config(str(write_study(tmp_path, tiny_model_dir, corpus_file, secondary=[{"domain": "elsewhere", "a": "disc", "b": "ft"}]))).validate()


def test_every_shipped_study_config_validates(monkeypatch):
    """configs/*.yaml are what the docs tell users to run: each must load and validate as it is."""
    from pathlib import Path

    monkeypatch.setattr("ctxdistill.model_sources.fetched_model_dir", lambda alias: Path("/fetched") / alias)  # no 468 MiB download here
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("study.yaml", "study_powered.yaml"):
        cfg = load_study_config(str(root / name))
        assert cfg.stage_order() and all(cfg.sweep_config(d).plan() for d in cfg.domains)
    powered = load_study_config(str(root / "study_powered.yaml"))
    assert powered.primary["gain"] == 16 and powered.primary["bootstrap"] == 2000
    assert {(e["domain"], e["a"], e["b"]) for e in powered.secondary} >= {("news_a", "disc", "ft"), ("news_qwen", "disc", "ft")}
    assert {powered.sweep_config(d).model for d in powered.domains} == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"}


def test_results_count_the_shards_from_their_names_not_from_how_many_wrote_timings():
    """A shard stopped in its first stage writes no timings file; the header still says two processes ran."""
    from ctxdistill.experiments.study_report import shard_count
    assert shard_count({"timings.shard1of2": {"domain:news_a": 60.0}}) == 2
    assert shard_count({"timings.shard0of3": {}, "timings.shard2of3": {}}) == 3
    assert shard_count({"timings": {"domain:news_a": 60.0}}) == 0


def test_only_runs_the_named_stages_in_stage_order_and_keeps_both_processes_timings(tmp_path, tiny_model_dir, corpus_file, monkeypatch):
    """`--only` lets a second process take stages the first has not reached (same shard, other stages); the
    timings file they share keeps both processes' stages."""
    import ctxdistill.experiments.sweep as sweep_module

    ran = []
    monkeypatch.setattr(sweep_module, "run_sweep", lambda sweep, **_: ran.append(sweep.out.rsplit("/", 1)[-1]))
    domains = {name: {"corpus": str(corpus_file), "methods": ["ft"], "lrs": [1e-3]} for name in ("a", "b", "c")}

    def study(only: str):
        path = write_study(tmp_path, tiny_model_dir, corpus_file, continual={}, domains=domains, stages=["a", "b", "c"], shard="0/2", only=only)
        return load_study_config(str(path))

    run_study(study("c,a"), log=lambda *_: None, progress=False)
    run_study(study("b"), log=lambda *_: None, progress=False)
    assert ran == ["a", "c", "b"]
    assert set(json.loads((tmp_path / "study" / "timings.shard0of2.json").read_text())) == {"domain:a", "domain:b", "domain:c"}
    with pytest.raises(CtxDistillError, match="not a stage of this study; choose from a, b, c"):
        study("a,z").validate()
