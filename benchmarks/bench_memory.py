"""Peak memory of one DiSC step vs document length and vocabulary size, dense vs chunked KL.

    python benchmarks/bench_memory.py --lengths 1024,2048,4096,8192 --out benchmarks/results/memory_cpu.json

Each (length, vocabulary, mode) runs in its own process on a random-init model of SmolLM2-135M's
shape: one forward+backward of DiSC's loss over a document whose suffixes (64 tokens each) cover
every position, under bf16 autocast. `baseline` runs the same teacher and student passes but with a
loss on the hidden states (no LM head, no KL), so `step - baseline` is the memory the logits and the
KL take: flat in length with chunking, linear without.

On CUDA the peak is `torch.cuda.max_memory_allocated` (live tensors only, no allocator caching), so
every case runs in one process (`--in-process`, the default there), and `--shape qwen2.5-1.5b` uses a
random-init model of that real shape (its own vocabulary) instead of SmolLM2-135M's:

    python benchmarks/bench_memory.py --device cuda --shape qwen2.5-1.5b --vocabs "" --out benchmarks/results/memory_qwen1.5b_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPES, peak_memory_mb, random_model, run_child, shape_dims, write_result  # noqa: E402

DEFAULT_SHAPE = "smollm2-135m"


def build_model(vocab: int, length: int, shape: str = DEFAULT_SHAPE, device="cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape != DEFAULT_SHAPE:
        return random_model(shape, device)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=vocab, max_position_embeddings=max(length, 8192), tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def build_pair(args, device):
    import copy

    import torch

    from ctxdistill.teachers import Teacher

    student = build_model(args.vocab, args.length, args.shape, device)
    return student, Teacher(model=copy.deepcopy(student).to(torch.bfloat16))


def child(args, pair=None) -> dict:
    import random

    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.methods.disc import Disc, DiscItem, suffix_batch, teacher_positions
    from ctxdistill.models import final_hidden_states
    from ctxdistill.inputs.segment import SegmentedDoc
    from ctxdistill.runtime import resolve_device

    device = resolve_device(args.device)
    student, teacher = pair or build_pair(args, device)
    student.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
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
            loss = Disc(cfg).loss(student, teacher, item, device).loss
    loss.backward()
    peak = peak_memory_mb(device)
    del loss
    student.zero_grad(set_to_none=True)
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
    parser.add_argument("--shape", default=DEFAULT_SHAPE, choices=[DEFAULT_SHAPE, *SHAPES],
                        help="model shape (a random-init Qwen2.5 shape uses its own vocabulary; --vocab/--vocabs then do not apply)")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                        help="every case in this process (default on CUDA, where max_memory_allocated is exact per case)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from ctxdistill.runtime import resolve_device

    device = resolve_device(args.device)
    in_process = args.in_process if args.in_process is not None else device.type == "cuda"
    if in_process and device.type != "cuda":
        raise SystemExit("--in-process needs CUDA: peak RSS cannot be reset between cases")
    if args.shape != DEFAULT_SHAPE:
        args.vocab, args.vocabs = SHAPES[args.shape][5], ""
    pairs = {}

    def case(length: int, vocab: int, mode: str) -> dict:
        if not in_process:
            return run_child(__file__, ["--length", str(length), "--vocab", str(vocab), "--mode", mode, "--device", args.device, "--shape", args.shape])
        case_args = argparse.Namespace(**(vars(args) | {"length": length, "vocab": vocab, "mode": mode}))
        if vocab not in pairs:  # one student/teacher pair per vocabulary, reused across lengths (gradients dropped between cases)
            pairs.clear()
            import torch

            torch.cuda.empty_cache()
            pairs[vocab] = build_pair(case_args, device)
        row = child(case_args, pairs[vocab])
        print(row, file=sys.stderr, flush=True)
        return row

    rows = []
    for length in map(int, args.lengths.split(",")):
        for mode in ("baseline", "dense", "chunked"):
            rows.append(case(length, args.vocab, mode))
    vocab_rows = []
    for vocab in (int(v) for v in args.vocabs.split(",") if v):
        for mode in ("baseline", "dense", "chunked"):
            vocab_rows.append(case(args.vocab_length, vocab, mode))

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
    model = "random-init SmolLM2-135M shape" if args.shape == DEFAULT_SHAPE else f"random-init {args.shape} shape"
    dims = shape_dims(args.shape) if args.shape in SHAPES else {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3,
                                                                 "vocab": args.vocab, "tied_embeddings": True}
    write_result(args.out, "memory", {"settings": {"model": model, "shape": args.shape, "shape_dims": dims, "suffix_tokens": 64, "chunk": 1024,
                                                   "precision": "bf16 autocast, fp32 student, bf16 teacher", "device": args.device,
                                                   "peak": "max_memory_allocated" if device.type == "cuda" else "peak RSS",
                                                   "processes": "one for all cases" if in_process else "one per case"},
                                      "by_length": rows, "by_vocab": vocab_rows,
                                      "logits_memory_mb_by_length": by_length,
                                      "logits_memory_mb_by_vocab": logits_memory(vocab_rows, "vocab") if vocab_rows else {},
                                      "chunked_growth": growth})


if __name__ == "__main__":
    main()
