"""How the demo's learning rates and epochs were chosen: FT and DiSC over a small grid, same evaluation.

    python scripts/sweep_demo.py --lrs 1e-5,3e-5,1e-4 --epochs 3 --out runs/demo_sweep.json

Evaluates the initial model once, then trains each (method, lr) from the initial model on the bundled
corpus and scores knowledge probes, general probes and chat drift KL, as `ctxdistill demo` does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ctxdistill.config import TrainConfig
from ctxdistill.inputs.corpus import bundled_path
from ctxdistill.experiments.demo import evaluate_model
from ctxdistill.evaluate.drift import greedy_responses, load_chat_prompts
from ctxdistill.evaluate.probes import load_probes
from ctxdistill.models import load_model, load_tokenizer
from ctxdistill.runtime import autocast
from ctxdistill.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--methods", default="ft,disc")
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--split-strategy", default="sentence_boundary")
    parser.add_argument("--out", default="runs/demo_sweep.json")
    args = parser.parse_args()

    knowledge, general = load_probes(bundled_path("news_updates_probes")), load_probes(bundled_path("general_probes"))
    prompts = load_chat_prompts()
    tokenizer, initial = load_tokenizer(args.model), load_model(args.model)
    with autocast(next(initial.parameters()).device, "bf16"):
        responses = greedy_responses(initial, tokenizer, prompts)
    strip = lambda row: {k: ({kk: vv for kk, vv in v.items() if kk != "predictions"} if isinstance(v, dict) else v) for k, v in row.items()}
    rows = [strip({"method": "initial"} | evaluate_model(initial, tokenizer, knowledge, general))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        for lr in map(float, args.lrs.split(",")):
            started = time.perf_counter()
            cfg = TrainConfig.create(method=method, lr=lr, epochs=args.epochs, split_strategy=args.split_strategy, out="", save_model=False)
            result = train(cfg, progress=False, log=lambda *_: None)
            row = {"method": method, "lr": lr, "epochs": args.epochs, "train_s": result.summary["timings_s"]["train"]}
            row |= evaluate_model(result.model, tokenizer, knowledge, general, initial, prompts, responses)
            row["wall_s"] = time.perf_counter() - started
            rows.append(strip(row))
            print(json.dumps(rows[-1]), flush=True)
            out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
