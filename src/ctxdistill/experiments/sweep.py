"""`ctxdistill sweep`: methods x learning rates x seeds, each trained and evaluated; resumable.

Layout of `out`:
    baseline/eval.json                 the initial model, evaluated once (its greedy chat replies are the
    baseline/reference_responses.jsonl   reference every run's drift is measured against)
    runs/<method>_lr<lr>_s<seed>/      the train output (run.json, losses.jsonl[, model/]) and eval.json
    sweep.json                         the sweep's config and the status of every run
    report.md, *.png                   written by `ctxdistill report` at the end

A run whose eval.json exists (for the same method, learning rate and seed) is skipped, so an
interrupted sweep continues where it stopped. Each run is trained and evaluated in memory right after,
against the initial model loaded once (experiments/runner.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from ..errors import CtxDistillError
from ..files import lock_holder, write_json_atomic
from ..models import DEFAULT_MODEL
from ..options import build_config, opt, opt_dict, opt_list, to_dict


@dataclass
class SweepConfig:
    out: str = opt("runs/sweep", "sweep directory (baseline/, runs/, sweep.json, report.md)")
    model: str = opt(DEFAULT_MODEL, "the initial (post-trained) model every run starts from")
    corpus: str = opt("bundled:news_updates", "training documents (also used for the per-token KL)")
    probes: str = opt("bundled:news_updates_probes", "knowledge probes about the corpus (the domain score)")
    methods: list = opt_list(["ft", "disc"], "training methods (or variant names defined in method_overrides) to compare")
    lrs: list = opt_list([1e-5, 3e-5], "learning rates (each method is trained at each)")
    seeds: list = opt_list([1234], "seeds (each method x lr is trained once per seed)")
    train: dict = opt_dict("TrainConfig options shared by every run (e.g. epochs, max_steps)")
    method_overrides: dict = opt_dict("per-method TrainConfig options, e.g. {disc: {temperature: 2.0}}; a variant is a new name with "
                                      "`method:` set, e.g. {disc_all: {method: disc, split_strategy: all_sentences}}; `lrs:` and "
                                      "`seeds:` in an entry replace the sweep's grid for that name")
    eval: dict = opt_dict("EvalConfig options for every evaluation (e.g. suite: quick, n_ifeval: 60)")
    save_models: bool = opt(False, "keep each run's trained weights in runs/<name>/model")
    report: bool = opt(True, "write report.md and the plots when the sweep ends")
    cp_threshold: float = opt(5.0, "CP rule: largest allowed drop (points) on each post-training skill")
    threads: int = opt(0, "CPU threads for torch during training and evaluation (0 = torch's default; 1 on a busy shared CPU)")
    shard: str = opt("", "i/n: this process runs every n-th run of the plan from the i-th (0-based); start n processes with "
                         "i = 0..n-1 on the same `out` (shard 0 evaluates the baseline while the others train; a shard that needs it "
                         "while nobody is evaluating it evaluates it itself)")

    def validate(self) -> "SweepConfig":
        from ..config import METHOD_NAMES

        try:
            self.lrs = [float(x) for x in self.lrs]
            self.seeds = [int(x) for x in self.seeds]
        except (TypeError, ValueError):
            raise CtxDistillError("lrs must be numbers and seeds integers, e.g. lrs: [1.0e-5, 3.0e-5], seeds: [1234]") from None
        for name, entry in self.method_overrides.items():
            if not isinstance(entry, dict):
                raise CtxDistillError(f"method_overrides.{name} must be a mapping of TrainConfig options (e.g. {{lr: 1.0e-5}}), "
                                      f"got {type(entry).__name__} {entry!r}")
        if not self.methods or not self.lrs or not self.seeds:
            raise CtxDistillError("a sweep needs at least one method, one learning rate and one seed")
        unknown = [m for m in self.methods if self.base_method(m) not in METHOD_NAMES]
        if unknown:
            raise CtxDistillError(f"unknown method(s) {', '.join(map(str, unknown))}; choose from: {', '.join(METHOD_NAMES)}, "
                                  "or name a variant in method_overrides with `method:` set")
        bad = [m for m in self.method_overrides if m not in self.methods]
        if bad:
            raise CtxDistillError(f"method_overrides names {', '.join(bad)}, which is not in methods ({', '.join(self.methods)})")
        reserved = {"method", "lr", "seed", "out", "model", "corpus", "overwrite", "save_model"} & set(self.train)
        if reserved:
            raise CtxDistillError(f"train: {', '.join(sorted(reserved))} are set by the sweep itself; use the top-level keys (methods, lrs, seeds, model, corpus)")
        for name, entry in self.method_overrides.items():
            try:
                entry["lrs"] = [float(x) for x in entry.get("lrs", self.lrs)]
                entry["seeds"] = [int(x) for x in entry.get("seeds", self.seeds)]
            except (TypeError, ValueError):
                raise CtxDistillError(f"method_overrides.{name}: lrs must be numbers and seeds integers") from None
        for method in self.methods:  # type-check every run's TrainConfig before anything trains
            self.train_config(method, self.lrs_of(method)[0], self.seeds_of(method)[0])
        self.eval_config("baseline")
        self.shard_of()
        return self

    def shard_of(self) -> tuple[int, int]:
        """(i, n) from `shard` ("" = (0, 1))."""
        if not self.shard:
            return 0, 1
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise CtxDistillError(f"shard {self.shard!r} must look like i/n, e.g. 0/2 and 1/2 for two processes") from None
        if not 0 <= i < n:
            raise CtxDistillError(f"shard {self.shard!r}: i must be in 0..n-1")
        return i, n

    def run_name(self, method: str, lr: float, seed: int) -> str:
        return f"{method}_lr{lr:g}_s{seed}"

    def base_method(self, name: str) -> str:
        """The training method behind a methods entry: itself, or the `method:` of its variant."""
        return self.method_overrides.get(name, {}).get("method", name)

    def lrs_of(self, name: str) -> list:
        return self.method_overrides.get(name, {}).get("lrs", self.lrs)

    def seeds_of(self, name: str) -> list:
        return self.method_overrides.get(name, {}).get("seeds", self.seeds)

    def plan(self) -> list[tuple[str, float, int]]:
        """Every (method, lr, seed) of the sweep, or this shard's share of them.

        Shard i takes every n-th run and starts i/n of the way into its share, so the shards reach a
        method at different times: a method that generates text first (rephrase, cd_base, mixsd)
        generates once and the other shards find its texts in the cache instead of waiting for them."""
        everything = [(m, lr, s) for m in self.methods for lr in self.lrs_of(m) for s in self.seeds_of(m)]
        i, n = self.shard_of()
        share = everything[i::n]
        start = i * len(share) // n
        return share[start:] + share[:start]

    def train_config(self, method: str, lr: float, seed: int) -> TrainConfig:
        overrides = {k: v for k, v in self.method_overrides.get(method, {}).items() if k not in ("method", "lrs", "seeds")}
        values = dict(self.train) | overrides
        values |= {"method": self.base_method(method), "lr": lr, "seed": seed, "model": self.model, "corpus": overrides.get("corpus", self.corpus),
                   "out": str(Path(self.out) / "runs" / self.run_name(method, lr, seed)), "overwrite": True, "save_model": self.save_models}
        return build_config(TrainConfig, None, values)

    def eval_config(self, name: str, **extra):
        from ..evaluate.suite import EvalConfig

        values = dict(self.eval) | {"probes": self.probes, "overwrite": True} | extra
        if name == "baseline":
            values |= {"model": self.model, "out": str(Path(self.out) / "baseline")}
        return build_config(EvalConfig, None, values)


def load_sweep_config(path: str | None, overrides: dict | None = None) -> SweepConfig:
    return build_config(SweepConfig, path, overrides or {})


def _finished(run_dir: Path, method: str, lr: float, seed: int) -> bool:
    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    try:
        run = json.loads(path.read_text(encoding="utf-8")).get("run", {})
    except json.JSONDecodeError:
        return False
    return run.get("method") == method and run.get("seed") == seed and abs(float(run.get("lr", -1)) - lr) <= 1e-12 * max(lr, 1)


def run_sweep(cfg: SweepConfig, log=print, progress: bool = True) -> dict:
    from ..evaluate.suite import evaluate_model
    from ..models import load_tokenizer
    from ..runtime import resolve_device, set_threads
    from .runner import Baseline, run_info, train_then_evaluate

    cfg.validate()
    set_threads(cfg.threads)
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    plan = cfg.plan()
    status = {"config": to_dict(cfg), "runs": {}}
    started = time.perf_counter()

    shard, shards = cfg.shard_of()
    status_path = out / ("sweep.json" if shards == 1 else f"sweep.shard{shard}of{shards}.json")
    tokenizer = load_tokenizer(cfg.model)
    baseline = Baseline(cfg.model, out / "baseline", cfg.eval_config("baseline"), resolve_device(cfg.train_config(*plan[0]).device), shard)
    baseline.evaluate_if_needed(tokenizer, log, label="sweep: ")

    def reference_responses():
        """The other shards train and score their first run while shard 0 evaluates the baseline, and wait only
        here, when that run's drift task (the last) needs the baseline's replies."""
        responses = baseline.responses(log)
        status["baseline"] = str(baseline.eval_path)
        write_json_atomic(status_path, status)
        return responses

    if baseline.eval_path.is_file():
        reference_responses()

    for i, (method, lr, seed) in enumerate(plan, start=1):
        name = cfg.run_name(method, lr, seed)
        run_dir = out / "runs" / name
        if _finished(run_dir, method, lr, seed):
            log(f"sweep: [{i}/{len(plan)}] {name}: done already, skipped")
            status["runs"][name] = "skipped (finished earlier)"
            continue
        holder = lock_holder(run_dir)
        if holder:  # another process (e.g. a second process on the same shard) is training it: leave it to that one
            log(f"sweep: [{i}/{len(plan)}] {name}: process {holder} is running it, skipped (run the sweep again to pick up what it leaves)")
            status["runs"][name] = f"skipped (process {holder} was running it)"
            continue
        log(f"sweep: [{i}/{len(plan)}] {name}: training")
        train_cfg = cfg.train_config(method, lr, seed)

        def evaluate(result):
            eval_cfg = cfg.eval_config(name, model=str(run_dir / "model") if cfg.save_models else name, out=str(run_dir),
                                       reference=cfg.model, corpus=cfg.corpus, text_field=train_cfg.text_field)
            log(f"sweep: [{i}/{len(plan)}] {name}: evaluating")
            return evaluate_model(result.model, result.tokenizer, eval_cfg, reference_model=baseline.model,
                                  reference_responses=reference_responses, log=log,
                                  run_info={"method": method, "name": name} | run_info(train_cfg, result))

        train_then_evaluate(train_cfg, evaluate, progress=progress, log=log)
        status["runs"][name] = "finished"
        write_json_atomic(status_path, status)
    status["total_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(status_path, status)
    if cfg.report and shards == 1:
        from .report import ReportConfig, write_report

        paths = write_report(ReportConfig(runs_dir=str(out), cp_threshold=cfg.cp_threshold))
        log(f"sweep: report -> {paths['report']}")
    return status
