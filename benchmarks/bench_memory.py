"""Peak memory of one DiSC step vs document length and vocabulary size, dense vs chunked KL.

    python benchmarks/bench_memory.py --lengths 1024,2048,4096,8192 --out benchmarks/results/memory_cpu.json

Each (length, vocabulary, mode) runs in its own process on a random-init model of SmolLM2-135M's
shape: one forward+backward of DiSC's loss over a document whose suffixes (64 tokens each) cover
every position, under bf16 autocast. `baseline` runs the same teacher and student passes but with a
loss on the hidden states (no LM head, no KL), so `step - baseline` is the memory the logits and the
KL take: flat in length with chunking, linear without.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_memory_mb, run_child, write_result  # noqa: E402


def build_model(vocab: int, length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=vocab, max_position_embeddings=max(length, 8192), tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def child(args) -> dict:
    import copy
    import random

    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.methods.disc import Disc, DiscItem, suffix_batch, teacher_positions
    from ctxdistill.models import Teacher, final_hidden_states
    from ctxdistill.segment import SegmentedDoc
    from ctxdistill.train import resolve_device

    device = resolve_device(args.device)
    student = build_model(args.vocab, args.length).to(device)
    teacher = Teacher(model=copy.deepcopy(student).to(torch.bfloat16))
    rng = random.Random(0)
    tokens = [rng.randrange(args.vocab) for _ in range(args.length)]
    doc = SegmentedDoc("synthetic", tuple(tuple(tokens[i : i + 64]) for i in range(0, args.length, 64)))
    item = DiscItem(doc, tuple((s, min(s + 64, args.length)) for s in range(64, args.length, 64)))
    before = peak_memory_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if args.mode == "baseline":
            ids = torch.tensor([tokens], device=device)
            teacher_hidden = teacher.hidden_states(input_ids=ids, use_cache=False)[0, teacher_positions(item.spans)]
            input_ids, attention, keep = suffix_batch(tokens, item.spans, 0, device)
            student_hidden = final_hidden_states(student, input_ids=input_ids, attention_mask=attention, use_cache=False)[keep]
            loss = ((student_hidden.float() - teacher_hidden.float()) ** 2).mean()
        else:
            cfg = TrainConfig(kl_chunk_size=1024 if args.mode == "chunked" else 0)
            loss, _ = Disc().loss(student, teacher, item, cfg, 0, device)
    loss.backward()
    peak = peak_memory_mb(device)
    return {"length": args.length, "vocab": args.vocab, "mode": args.mode, "distilled_positions": item.student_tokens,
            "peak_mb": round(peak, 1), "step_mb": round(peak - before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--mode", choices=("dense", "chunked", "baseline"))
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--vocabs", default="49152,262144", help="vocabulary sizes for the vocabulary sweep (at --vocab-length)")
    parser.add_argument("--vocab-length", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for length in map(int, args.lengths.split(",")):
        for mode in ("baseline", "dense", "chunked"):
            rows.append(run_child(__file__, ["--length", str(length), "--vocab", "49152", "--mode", mode, "--device", args.device]))
    vocab_rows = []
    for vocab in (int(v) for v in args.vocabs.split(",") if v):
        for mode in ("baseline", "dense", "chunked"):
            vocab_rows.append(run_child(__file__, ["--length", str(args.vocab_length), "--vocab", str(vocab), "--mode", mode, "--device", args.device]))

    def logits_memory(table, key):
        by = {(r[key], r["mode"]): r["step_mb"] for r in table}
        return {f"{value}": {mode: round(by[(value, mode)] - by[(value, "baseline")], 1) for mode in ("dense", "chunked")}
                for value in sorted({r[key] for r in table})}

    by_length = logits_memory(rows, "length")
    lengths = sorted(int(x) for x in by_length)
    growth = None
    if 1024 in lengths and lengths[-1] > 1024:
        first, last = by_length["1024"]["chunked"], by_length[str(lengths[-1])]["chunked"]
        growth = {"from": 1024, "to": lengths[-1], "chunked_logits_mb": [first, last],
                  "relative_growth": (last - first) / max(abs(first), 1.0)}
    write_result(args.out, "memory", {"settings": {"model": "random-init SmolLM2-135M shape", "suffix_tokens": 64, "chunk": 1024,
                                                   "precision": "bf16 autocast", "device": args.device},
                                      "by_length": rows, "by_vocab": vocab_rows,
                                      "logits_memory_mb_by_length": by_length,
                                      "logits_memory_mb_by_vocab": logits_memory(vocab_rows, "vocab") if vocab_rows else {},
                                      "chunked_growth": growth})


if __name__ == "__main__":
    main()
