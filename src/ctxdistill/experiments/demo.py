"""`ctxdistill demo`: FT vs DiSC on the bundled news-update corpus with the embedded default model.

Scores the knowledge probes (about the corpus), general probes (unrelated knowledge) and the chat
drift KL before and after each method, and prints one table. The learning rates and epochs were
picked by the sweep described in the README (both methods must visibly learn on 2 CPU cores).
`--also sdft` trains the optional methods after them (not in the default demo: SDFT generates).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import CtxDistillError
from ..evaluate.drift import greedy_responses, load_chat_prompts, response_kl, save_responses
from ..evaluate.probes import load_probes, score_mcq_loglik
from ..files import LOCK_NAME, OutputLock, check_writable_location, dangerous_to_delete, write_json_atomic, write_text_atomic
from ..inputs.corpus import bundled_path
from ..models import DEFAULT_MODEL, load_model, load_tokenizer
from ..options import opt
from ..runtime import autocast, set_threads
from .runner import train_then_evaluate

DEMO_FILES = {"demo.json", "demo.md", "reference_responses.jsonl", "ft", "disc", "sdft", LOCK_NAME}
OPTIONAL_METHODS = ("sdft",)  # trained after FT and DiSC with --also
LABELS = {"ft": "FT", "disc": "DiSC", "sdft": "SDFT"}


@dataclass
class DemoConfig:
    model: str = opt(DEFAULT_MODEL, "model to update (alias, directory, .gguf or HF id)")
    out: str = opt("runs/demo", "output directory (demo.json, demo.md, ft/, disc/, and sdft/ with --also sdft)")
    ft_lr: float = opt(3e-5, "FT learning rate")
    ft_epochs: int = opt(3, "FT epochs")
    disc_lr: float = opt(3e-5, "DiSC learning rate")
    disc_epochs: int = opt(3, "DiSC epochs")
    split_strategy: str = opt("sentence_boundary", "DiSC split strategy")
    temperature: float = opt(2.0, "DiSC temperature")
    also: str = opt("", "extra methods trained after FT and DiSC, comma-separated: sdft")
    sdft_lr: float = opt(3e-5, "SDFT learning rate (with --also sdft)")
    sdft_epochs: int = opt(1, "SDFT epochs (with --also sdft; each step generates, so it is slower per epoch)")
    max_new_tokens: int = opt(48, "length of the initial model's reference chat replies (drift KL)")
    save_models: bool = opt(False, "also write ft/model and disc/model")
    overwrite: bool = opt(True, "replace an earlier demo's outputs in --out (a directory holding anything else is refused)")
    seed: int = opt(1234, "seed")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default; 1 per process on a busy shared CPU)")


def prepare_demo_dir(out: str, overwrite: bool) -> Path:
    """--out for the demo: new, empty, or an earlier demo's outputs (replaced with --overwrite). Never the user's files."""
    path = Path(out).expanduser()
    check_writable_location(path)
    if path.exists() and not path.is_dir():
        raise CtxDistillError(f"--out {path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
        foreign = sorted(p.name for p in path.iterdir() if p.name not in DEMO_FILES)
        why = dangerous_to_delete(path)
        if foreign or why:
            raise CtxDistillError(f"--out {path} holds files that are not a demo's ({', '.join(foreign[:3]) or why}); choose a new directory")
        if not overwrite:
            raise CtxDistillError(f"--out {path} holds an earlier demo; pass --overwrite or choose another --out")
    return path


def clear_demo_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.name in DEMO_FILES and child.name != LOCK_NAME:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def evaluate_model(model, tokenizer, knowledge, general, reference=None, prompts=None, responses=None) -> dict:
    """Probe accuracies under bf16 autocast (fast on this CPU); the drift KL in fp32, where small changes matter."""
    with autocast(next(model.parameters()).device, "bf16"):
        row = {"knowledge": score_mcq_loglik(model, tokenizer, knowledge), "general": score_mcq_loglik(model, tokenizer, general)}
    row["chat_kl"] = response_kl(reference, model, tokenizer, prompts, responses) if reference is not None else 0.0
    return row


def format_table(rows: list[dict]) -> str:
    header = "| model | knowledge probes acc | gold option log-prob | general probes acc | chat drift KL (nats/token) | train time |"
    lines = [header, "|" + "---|" * 6]
    for r in rows:
        k, g = r["knowledge"], r["general"]
        train_time = f"{r['train_s']:.0f} s" if r.get("train_s") else "-"
        lines.append(f"| {r['name']} | {k['accuracy']:.3f} ± {k['stderr']:.3f} (n={k['n']}) | {k['mean_gold_logprob']:.2f} "
                     f"| {g['accuracy']:.3f} ± {g['stderr']:.3f} (n={g['n']}) | {r['chat_kl']:.4f} | {train_time} |")
    return "\n".join(lines)


def extra_methods(also: str) -> list[str]:
    """The --also names, checked before anything loads: one line naming an unknown one."""
    names = [n.strip() for n in also.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONAL_METHODS]
    if unknown:
        raise CtxDistillError(f"--also {unknown[0]!r} is not an optional demo method; choose from {', '.join(OPTIONAL_METHODS)}")
    return list(dict.fromkeys(names))


def demo_runs(cfg: DemoConfig, base: TrainConfig, out: Path) -> dict[str, TrainConfig]:
    runs = {
        "ft": base.replace(method="ft", lr=cfg.ft_lr, epochs=cfg.ft_epochs, out=str(out / "ft")),
        "disc": base.replace(method="disc", lr=cfg.disc_lr, epochs=cfg.disc_epochs, out=str(out / "disc"),
                             split_strategy=cfg.split_strategy, temperature=cfg.temperature),
    }
    for name in extra_methods(cfg.also):  # only sdft so far
        runs[name] = base.replace(method="sdft", lr=cfg.sdft_lr, epochs=cfg.sdft_epochs, sdft_questions_per_document=2,
                                  sdft_max_completion_tokens=64, out=str(out / "sdft"))
    return runs


def run_demo(cfg: DemoConfig, log=print) -> dict:
    extra_methods(cfg.also)
    set_threads(cfg.threads)
    out = prepare_demo_dir(cfg.out, cfg.overwrite)
    with OutputLock(out, "demo output directory"):
        clear_demo_dir(out)
        return demo(cfg, out, log)


def demo(cfg: DemoConfig, out: Path, log=print) -> dict:
    started = time.perf_counter()
    knowledge = load_probes(bundled_path("news_updates_probes"))
    general = load_probes(bundled_path("general_probes"))
    prompts = load_chat_prompts()
    log(f"demo: {cfg.model}; {len(knowledge)} knowledge probes, {len(general)} general probes, {len(prompts)} chat prompts")

    tokenizer = load_tokenizer(cfg.model)
    initial = load_model(cfg.model)
    with autocast(next(initial.parameters()).device, "bf16"):
        responses = greedy_responses(initial, tokenizer, prompts, cfg.max_new_tokens)
    save_responses(out / "reference_responses.jsonl", prompts, responses, tokenizer)
    rows = [{"name": "initial"} | evaluate_model(initial, tokenizer, knowledge, general)]
    log(f"initial: knowledge {rows[0]['knowledge']['accuracy']:.3f}, general {rows[0]['general']['accuracy']:.3f}")

    base = TrainConfig(model=cfg.model, corpus="bundled:news_updates", seed=cfg.seed, save_model=cfg.save_models, overwrite=True)
    for name, run_cfg in demo_runs(cfg, base, out).items():
        label = f"{LABELS[name]} (lr {run_cfg.lr:g}, {run_cfg.epochs} ep)"

        def evaluate(result):
            return {"name": label, "train_s": result.summary["timings_s"]["train"]} | evaluate_model(
                result.model, tokenizer, knowledge, general, initial, prompts, responses)

        row = train_then_evaluate(run_cfg, evaluate, log=log)
        rows.append(row)
        log(f"{label}: knowledge {row['knowledge']['accuracy']:.3f}, general {row['general']['accuracy']:.3f}, chat KL {row['chat_kl']:.4f}")

    table = format_table(rows)
    total = time.perf_counter() - started
    write_text_atomic(out / "demo.md", table + f"\n\nTotal time: {total:.0f} s on {torch.get_num_threads()} CPU threads.\n")
    for r in rows:  # keep the JSON small: per-probe predictions go to their own file
        for key in ("knowledge", "general"):
            r[key] = {k: v for k, v in r[key].items() if k != "predictions"}
    write_json_atomic(out / "demo.json", {"config": asdict(cfg), "rows": rows, "total_s": total})
    return {"table": table, "rows": rows, "total_s": total}
