"""`ctxdistill study`: the whole comparison from one YAML file, resumable, summarised in one JSON.

Stages, each skipped where its outputs already exist (so an interrupted study continues):
1. one sweep per domain (`domains:`), each a `ctxdistill sweep` with its own corpus, probes, methods,
   learning rates and seeds, in `OUT/<domain>/`;
2. continual updates (`continual:`): the corpus cut into rounds applied one after another, each round
   starting from the previous round's model (DiSC's teacher is that model too), evaluated after every
   round on the probes of every round so far, in `OUT/continual/<method>/round<r>/`;
3. `OUT/study_summary.json`: every evaluation trimmed to its metrics, per-item scores and run settings;
4. `RESULTS_DIR/results.md` and its plots, written from the summary alone (`--report-only` rebuilds them
   from a committed summary without training anything).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CtxDistillError
from ..files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from ..models import DEFAULT_MODEL
from ..options import build_config, opt, opt_dict, opt_list, to_dict


@dataclass
class StudyConfig:
    out: str = opt("runs/study", "study directory: one sweep per domain, continual/, study_summary.json")
    model: str = opt(DEFAULT_MODEL, "the initial (post-trained) model every run starts from")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")
    device: str = opt("", "cpu, cuda, cuda:N or auto for every run and evaluation of the study (empty: the `train:`/`eval:` "
                          "device, auto by default); the same study file runs on a CPU or a GPU machine")
    shard: str = opt("", "i/n: run every n-th run from the i-th in this process (see `ctxdistill sweep --shard`); afterwards one "
                         "unsharded call (everything is finished, so it only summarises) writes the summary and results.md")
    train: dict = opt_dict("TrainConfig options shared by every run (a domain's own `train:` adds to them)")
    eval: dict = opt_dict("EvalConfig options shared by every evaluation (a domain's own `eval:` adds to them)")
    domains: dict = opt_dict("name -> sweep: model (default: the study's), corpus, probes (or build: {dataset: pubmedqa, n_docs, seed}), methods, "
                             "lrs, seeds, method_overrides, train, eval, sweep_dir, domain_metric, one_process (true: under --shard, "
                             "shard 0 runs the whole domain and the others skip it, e.g. a model too large for two processes' memory)")
    continual: dict = opt_dict("corpus, probes, rounds, methods: {name: {method, lr, ...TrainConfig options}}, train, eval; empty = skip")
    stages: list = opt_list([], "order of the stages: domain names and `continual` (default: every domain, then continual)")
    only: str = opt("", "comma-separated stages this process runs, in `stages` order (default: all); e.g. arm B's domains on a "
                        "GPU machine first, or a second process on what the first has not reached")
    domain_metric: str = opt("knowledge.mcq_loglik", "the domain score the CP rule maximises and the plots put on the y axis")
    cp_threshold: float = opt(5.0, "CP rule: largest allowed drop (points) on each post-training skill")
    primary: dict = opt_dict("the pre-registered primary comparison, reported apart from the exploratory ones: "
                             "{domain, a, b, metric, lr} (e.g. news, disc, ft, ifeval.prompt_strict, 1.0e-4)")
    secondary: list = opt_list([], "the pre-registered secondary comparisons, [{domain, a, b, metrics: [...]}]: their paired tables "
                                   "(A - B at the same lr and seed) name the registered columns; every other table is exploratory")
    results_dir: str = opt("", "where results.md, results/*.png and results/study_summary.json go (default: OUT)")
    reading: str = opt("", "a hand-written markdown file pasted into results.md as its 'Reading' section (optional)")
    summary_only: bool = opt(False, "write study_summary.json and results.md from the runs finished so far; trains nothing")
    report_only: bool = opt(False, "only rebuild results.md and the plots from --summary (no training, no evaluation)")
    summary: str = opt("", "the study_summary.json to read with --report-only (default: RESULTS_DIR/results/study_summary.json)")

    def validate(self) -> "StudyConfig":
        if self.report_only:
            return self
        if not self.domains and not self.continual:
            raise CtxDistillError("a study needs `domains:` (sweeps) and/or `continual:`; see configs/study.yaml")
        for name, domain in self.domains.items():
            if not isinstance(domain, dict):
                raise CtxDistillError(f"domains.{name} must be a mapping (corpus, probes, methods, lrs, ...)")
            self.sweep_config(name).validate()
        from ..model_sources import FETCHED_MODELS, fetched_model_dir

        for model in {self.model} | {d.get("model", self.model) for d in self.domains.values()}:
            if model in FETCHED_MODELS:
                fetched_model_dir(model)  # one line naming `ctxdistill fetch-model` now, not hours into the study
        for name in self.domains:  # a sweep directory has one baseline: every domain writing there starts from one model
            shared = {self.domains[d].get("model", self.model) for d in self.domains if self.sweep_dir(d) == self.sweep_dir(name)}
            if len(shared) > 1:
                raise CtxDistillError(f"domains writing to {self.sweep_dir(name)}/ name different models ({', '.join(sorted(shared))}); "
                                      "give each model its own sweep_dir")
        self.stages_to_run()
        sweeps = {self.sweep_dir(name) for name in self.domains}
        for entry in self.secondary:
            if not isinstance(entry, dict) or not {"domain", "a", "b"} <= set(entry) or entry["domain"] not in sweeps:
                raise CtxDistillError(f"secondary entry {entry!r} needs domain (one of {', '.join(sorted(sweeps))}), a and b; "
                                      "e.g. {domain: news, a: disc, b: ft, metrics: [drift.chat_kl]}")
        if self.continual:
            rounds = int(self.continual.get("rounds", 3))
            if rounds < 2:
                raise CtxDistillError("continual.rounds must be >= 2")
            if not self.continual.get("methods"):
                raise CtxDistillError("continual.methods is empty; e.g. {disc: {lr: 1.0e-4}, ft: {lr: 1.0e-4}}")
        return self

    def domain_metric_of(self, sweep_dir: str) -> str:
        """The domain score of a sweep directory: `domain_metric:` of a domain writing there, else the study's."""
        for name, domain in self.domains.items():
            if self.sweep_dir(name) == sweep_dir and domain.get("domain_metric"):
                return domain["domain_metric"]
        return self.domain_metric

    def sweep_dir(self, name: str) -> str:
        """A domain's directory under OUT: its name, or `sweep_dir:` to add runs to another domain's sweep
        (a later stage with more seeds or variants, reported in the same tables)."""
        return self.domains[name].get("sweep_dir", name)

    def stage_order(self) -> list[str]:
        everything = list(self.domains) + (["continual"] if self.continual else [])
        if not self.stages:
            return everything
        if sorted(self.stages) != sorted(everything):
            raise CtxDistillError(f"stages {self.stages} must list each of {everything} once")
        return list(self.stages)

    def stages_to_run(self) -> list[str]:
        """The stages this process runs: `stage_order()`, narrowed to `only` when given."""
        order = self.stage_order()
        if not self.only:
            return order
        chosen = [name.strip() for name in self.only.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in order]
        if unknown or not chosen:
            raise CtxDistillError(f"--only {self.only!r}: {', '.join(unknown) or 'no stage'} is not a stage of this study; "
                                  f"choose from {', '.join(order)}")
        return [name for name in order if name in chosen]

    def device_option(self) -> dict:
        """{"device": ...} to merge over every run's and evaluation's options, or {} to leave theirs."""
        return {"device": self.device} if self.device else {}

    def one_process(self, name: str) -> bool:
        """A domain every shard but shard 0 skips (`one_process: true`)."""
        return bool(self.domains.get(name, {}).get("one_process"))

    def sweep_shard(self) -> tuple[int, int]:
        from .sweep import SweepConfig

        return SweepConfig(shard=self.shard).shard_of()

    def results_path(self) -> Path:
        return Path(self.results_dir or self.out)

    def domain_data(self, name: str) -> tuple[str, str]:
        """(corpus, probes) of a domain; `build:` domains are written under OUT/data/<name>/ first."""
        domain = self.domains[name]
        build = domain.get("build")
        if not build:
            return domain.get("corpus", "bundled:news_updates"), domain.get("probes", "bundled:news_updates_probes")
        if build.get("dataset") != "pubmedqa":
            raise CtxDistillError(f"domains.{name}.build.dataset must be pubmedqa (the only built domain so far)")
        target = Path(self.out) / "data" / self.sweep_dir(name)
        return str(target / "corpus.jsonl"), str(target / "probes.jsonl")

    def build_domain_data(self, name: str, log=print) -> None:
        build = self.domains[name].get("build")
        corpus, probes = self.domain_data(name)
        if not build or (Path(corpus).is_file() and Path(probes).is_file()):
            return
        from ..evaluate.domains import build_pubmedqa_domain

        info = build_pubmedqa_domain(Path(corpus).parent, n_docs=int(build.get("n_docs", 40)), seed=int(build.get("seed", 1234)),
                                     data_dir=self.eval.get("data_dir") or None)
        log(f"study: built the {name} domain: {info}")

    def sweep_config(self, name: str):
        from .sweep import SweepConfig

        domain = dict(self.domains[name])
        corpus, probes = self.domain_data(name)
        values = {
            "out": str(Path(self.out) / self.sweep_dir(name)), "model": domain.get("model", self.model), "corpus": corpus, "probes": probes,
            "methods": domain.get("methods", ["ft", "disc"]), "lrs": domain.get("lrs", [1e-5, 3e-5]), "seeds": domain.get("seeds", [1234]),
            "train": dict(self.train) | dict(domain.get("train", {})) | self.device_option(),
            "eval": dict(self.eval) | dict(domain.get("eval", {})) | self.device_option(),
            "method_overrides": {k: dict(v) for k, v in domain.get("method_overrides", {}).items()},
            "threads": self.threads, "report": True, "cp_threshold": self.cp_threshold,
            "shard": "" if domain.get("one_process") else self.shard,
        }
        unknown = set(domain) - {"model", "one_process", "corpus", "probes", "build", "methods", "lrs", "seeds", "train", "eval", "method_overrides",
                                 "sweep_dir", "domain_metric"}
        if unknown:
            raise CtxDistillError(f"domains.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        return build_config(SweepConfig, None, values)


def load_study_config(path: str | None, overrides: dict | None = None) -> StudyConfig:
    return build_config(StudyConfig, path, overrides or {})


# ---------------------------------------------------------------- continual updates


def continual_rounds(documents: list, rounds: int) -> list[list]:
    """The corpus in `rounds` consecutive batches of (nearly) equal size, in corpus order."""
    size, extra = divmod(len(documents), rounds)
    batches, start = [], 0
    for r in range(rounds):
        end = start + size + (1 if r < extra else 0)
        batches.append(documents[start:end])
        start = end
    if any(not b for b in batches):
        raise CtxDistillError(f"continual: {len(documents)} documents cannot fill {rounds} rounds")
    return batches


def prepare_continual_data(cfg: StudyConfig) -> dict:
    """Round corpora and the probes of each round under OUT/continual/data/; returns the round -> doc ids map."""
    from ..inputs.corpus import load_corpus
    from ..evaluate.probes import load_probes

    spec = cfg.continual
    rounds = int(spec.get("rounds", 3))
    documents, _ = load_corpus(spec.get("corpus", "bundled:news_updates"), "text", "id", 20)
    probes_path = spec.get("probes", "bundled:news_updates_probes")
    if probes_path.startswith("bundled:"):
        from ..inputs.corpus import bundled_path

        probes_path = str(bundled_path(probes_path.split(":", 1)[1]))
    probes = load_probes(probes_path)
    data = Path(cfg.out) / "continual" / "data"
    data.mkdir(parents=True, exist_ok=True)
    round_docs = []
    for r, batch in enumerate(continual_rounds(documents, rounds), start=1):
        write_jsonl_atomic(data / f"round{r}.jsonl", [{"id": d.id, "text": d.text} for d in batch])
        round_docs.append([d.id for d in batch])
    doc_round = {doc_id: r for r, ids in enumerate(round_docs, start=1) for doc_id in ids}
    kept = [p for p in probes if p.doc_id in doc_round]
    write_jsonl_atomic(data / "probes.jsonl", [{"id": p.id, "doc_id": p.doc_id, "question": p.question, "options": list(p.options), "answer": p.answer}
                                        for p in kept])
    return {"rounds": rounds, "round_docs": round_docs, "probe_round": {p.id: doc_round[p.doc_id] for p in kept}}


def run_continual(cfg: StudyConfig, log=print, progress: bool = True) -> None:
    from ..config import TrainConfig
    from ..evaluate.suite import EvalConfig, evaluate_model
    from ..models import load_tokenizer
    from ..runtime import resolve_device
    from .runner import Baseline, run_info, train_then_evaluate

    spec = cfg.continual
    layout = prepare_continual_data(cfg)
    root = Path(cfg.out) / "continual"
    data = root / "data"
    write_json_atomic(root / "rounds.json", layout)
    eval_values = dict(cfg.eval) | dict(spec.get("eval", {})) | cfg.device_option() | {"probes": str(data / "probes.jsonl"), "overwrite": True}
    shard, shards = cfg.sweep_shard()
    tokenizer = load_tokenizer(cfg.model)
    baseline = Baseline(cfg.model, root / "baseline", build_config(EvalConfig, None, eval_values | {"out": str(root / "baseline"), "model": cfg.model}),
                        resolve_device((dict(cfg.train) | cfg.device_option()).get("device", "auto")), shard)
    baseline.evaluate_if_needed(tokenizer, log, label="study: continual: ")

    for name, options in list(spec["methods"].items())[shard::shards]:
        options = dict(options)
        model_path = cfg.model
        for r in range(1, layout["rounds"] + 1):
            run_dir = root / name / f"round{r}"
            if (run_dir / "eval.json").is_file() and (run_dir / "model").is_dir():
                log(f"study: continual {name} round {r}: done already, skipped")
                model_path = str(run_dir / "model")
                continue
            values = dict(cfg.train) | dict(spec.get("train", {})) | {k: v for k, v in options.items()} | cfg.device_option()
            values |= {"method": options.get("method", name), "model": model_path, "corpus": str(data / f"round{r}.jsonl"),
                       "out": str(run_dir), "overwrite": True, "save_model": True}
            train_cfg = build_config(TrainConfig, None, values)
            log(f"study: continual {name} round {r}/{layout['rounds']}: training from {model_path}")

            def evaluate(result):
                eval_cfg = build_config(EvalConfig, None, eval_values | {"out": str(run_dir), "model": str(run_dir / "model"),
                                                                          "reference": cfg.model, "corpus": str(data / f"round{r}.jsonl")})
                return evaluate_model(result.model, result.tokenizer, eval_cfg, reference_model=baseline.model,
                                      reference_responses=lambda: baseline.responses(log), log=log,
                                      run_info={"method": name, "round": r, "name": f"{name}_round{r}"} | run_info(train_cfg, result))

            train_then_evaluate(train_cfg, evaluate, progress=progress, log=log)
            model_path = str(run_dir / "model")


# ---------------------------------------------------------------- summary


def trim_eval(data: dict) -> dict:
    """The parts of an eval.json the results need: metrics, per-item scores and item ids, run settings."""
    run = {k: v for k, v in data.get("run", {}).items() if k != "train_config"}
    tc = data.get("run", {}).get("train_config") or {}
    if tc:
        run["train"] = {k: tc[k] for k in ("epochs", "method", "student", "split_strategy", "temperature", "disc_positions", "context_kl_threshold",
                                           "replay_method", "replay_n", "replay_kl_weight", "replay_ce_weight", "kl_beta") if k in tc}
    return {"role": data.get("role"), "model": data.get("model"), "suite": data.get("suite"), "run": run, "metrics": data.get("metrics", {}),
            "item_scores": data.get("item_scores", {}), "item_ids": data.get("item_ids", {}), "tasks": {t: {"ids": v.get("ids")} for t, v in data.get("tasks", {}).items() if isinstance(v, dict)},
            "timings_s": data.get("timings_s", {})}


def with_train_timings(evaluation: dict, run_dir: Path) -> dict:
    """The run's load / generation / training seconds from its run.json, for the study's compute account."""
    if (run_dir / "run.json").is_file():
        evaluation["run"]["timings_s"] = _read(run_dir / "run.json").get("timings_s", {})
    return evaluation


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def summarise(cfg: StudyConfig) -> dict:
    """Every evaluation of the study, trimmed, in one JSON-able dict."""
    import torch

    out = Path(cfg.out)
    summary = {"version": 1, "config": to_dict(cfg), "domain_metric": cfg.domain_metric, "cp_threshold": cfg.cp_threshold,
               "environment": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
                               "torch": torch.__version__, "threads": cfg.threads or torch.get_num_threads(), "cuda": torch.cuda.is_available()},
               "domains": {}, "continual": None}
    for name in dict.fromkeys(cfg.sweep_dir(d) for d in cfg.domains):
        root = out / name
        base = root / "baseline" / "eval.json"
        runs = sorted((root / "runs").glob("*/eval.json"))
        sweep = _read(root / "sweep.json") if (root / "sweep.json").is_file() else {}
        summary["domains"][name] = {"baseline": trim_eval(_read(base)) if base.is_file() else None,
                                    "runs": [with_train_timings(trim_eval(_read(p)), p.parent) for p in runs], "total_s": sweep.get("total_s"),
                                    "domain_metric": cfg.domain_metric_of(name)}
    if cfg.continual and (out / "continual" / "rounds.json").is_file():
        layout = _read(out / "continual" / "rounds.json")
        cont = {"layout": layout, "baseline": None, "methods": {}}
        if (out / "continual" / "baseline" / "eval.json").is_file():
            cont["baseline"] = trim_eval(_read(out / "continual" / "baseline" / "eval.json"))
        for name in cfg.continual["methods"]:
            rounds = []
            for r in range(1, layout["rounds"] + 1):
                path = out / "continual" / name / f"round{r}" / "eval.json"
                if path.is_file():
                    rounds.append(with_train_timings(trim_eval(_read(path)), path.parent))
            cont["methods"][name] = rounds
        summary["continual"] = cont
    summary["timings_s"] = {path.stem: _read(path) for path in sorted(out.glob("timings*.json"))}
    summary["not_finished"] = unfinished(cfg)
    return summary


def unfinished(cfg: StudyConfig) -> list[str]:
    """Planned runs without an evaluation yet (the study was stopped early or is still running)."""
    from dataclasses import replace

    missing = []
    for name in cfg.domains:
        sweep = replace(cfg.sweep_config(name), shard="")
        for method, lr, seed in sweep.plan():
            run = sweep.run_name(method, lr, seed)
            if not (Path(sweep.out) / "runs" / run / "eval.json").is_file():
                missing.append(f"{name}/{run}")
    for method in (cfg.continual or {}).get("methods", {}):
        for r in range(1, int(cfg.continual.get("rounds", 3)) + 1):
            if not (Path(cfg.out) / "continual" / method / f"round{r}" / "eval.json").is_file():
                missing.append(f"continual/{method}/round{r}")
    return missing


def count_evaluations(summary: dict) -> int:
    """Baselines, runs and continual rounds with an evaluation in a study summary."""
    count = sum(bool(d.get("baseline")) + len(d.get("runs") or []) for d in (summary.get("domains") or {}).values())
    cont = summary.get("continual") or {}
    return count + bool(cont.get("baseline")) + sum(len(r) for r in (cont.get("methods") or {}).values())


def refuse_shrinking(summary_path: Path, summary: dict, out: str) -> None:
    """A summary already at `summary_path` holding more evaluations than the new one is someone's results (a
    committed summary, say, while OUT is a fresh directory): never replaced by a smaller one."""
    if not summary_path.is_file():
        return
    try:
        before = count_evaluations(_read(summary_path))
    except (json.JSONDecodeError, OSError, AttributeError):
        return  # not a summary we could read: written over, as before
    after = count_evaluations(summary)
    if after < before:
        raise CtxDistillError(f"{summary_path} holds {before} evaluations and the runs in {out} only {after}: not replacing it; "
                              "point --out at the study's runs, or --results-dir somewhere else")


def run_study(cfg: StudyConfig, log=print, progress: bool = True, config_path: str = "configs/study.yaml") -> dict:
    """Every stage of `cfg` (skipping what is finished), then the summary and results.md; `config_path` is the
    file the results page names as its source."""
    cfg.validate()
    if cfg.report_only:
        summary_path = Path(cfg.summary) if cfg.summary else cfg.results_path() / "results" / "study_summary.json"
        if not summary_path.is_file():
            raise CtxDistillError(f"{summary_path} not found; run the study first or pass --summary PATH")
        from .study_report import write_results

        return write_results(_read(summary_path), cfg.results_path(), cfg.reading, log=log, primary=cfg.primary, secondary=cfg.secondary, config_path=config_path)

    from ..runtime import set_threads
    from .sweep import run_sweep

    set_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shard, shards = cfg.sweep_shard()
    timings_path = out / ("timings.json" if shards == 1 else f"timings.shard{shard}of{shards}.json")

    def timed(stage: str, fn):
        started = time.perf_counter()
        try:
            fn()
        finally:  # a stage stopped part-way (Ctrl-C, SIGTERM) still counts the time it ran
            # re-read first: another process with the same shard (`--only` other stages) may have written since
            timings = _read(timings_path) if timings_path.is_file() else {}
            timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - started, 1)  # summed over resumed sessions
            write_json_atomic(timings_path, timings)

    for stage in [] if cfg.summary_only else cfg.stages_to_run():
        if stage == "continual":
            timed("continual", lambda: run_continual(cfg, log=log, progress=progress))
            continue
        if cfg.one_process(stage) and shard != 0:
            log(f"study: domain {stage} runs in shard 0 alone (one_process); shard {shard} skips it")
            continue
        log(f"study: domain {stage}")
        cfg.build_domain_data(stage, log=log)
        timed(f"domain:{stage}", lambda: run_sweep(cfg.sweep_config(stage), log=log, progress=progress))
    if shards > 1:
        log(f"study: shard {shard}/{shards} finished; when every shard has, run the study once without --shard to write the summary")
        return {"results": None, "shard": cfg.shard}
    summary = summarise(cfg)
    results = cfg.results_path()
    summary_path = results / "results" / "study_summary.json"
    refuse_shrinking(summary_path, summary, cfg.out)
    (results / "results").mkdir(parents=True, exist_ok=True)
    write_text_atomic(summary_path, json.dumps(summary, default=_json_default) + "\n")
    log(f"study: summary -> {summary_path}")
    from .study_report import write_results

    return write_results(summary, results, cfg.reading, log=log, primary=cfg.primary, secondary=cfg.secondary, config_path=config_path)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
