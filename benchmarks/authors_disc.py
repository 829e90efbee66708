"""The DiSC authors' per-document training step, rebuilt outside ctxdistill's loop for bench_throughput.py's
`authors` variants: for each split point, a teacher forward over prefix + suffix (no gradient) and a student
forward over the suffix alone (batch 1), the split's mean forward KL at temperature T (x T^2) divided by the
number of splits and back-propagated at once (per-split backward), then one plain `torch.optim.AdamW` step
(PyTorch's default foreach kernel, not fused) per document. The documents and split points are ctxdistill's own
(same segmentation and `choose_spans` draw), so both sides train on identical work.

Precision (`--authors-precision`): fp32 (student and teacher in fp32, no autocast) or bf16 (student fp32 under
bf16 autocast, teacher in bf16).
"""

from __future__ import annotations

import random
import time


def authors_child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from ctxdistill.config import TrainConfig
    from ctxdistill.inputs.corpus import load_corpus
    from ctxdistill.methods import PrepareContext
    from ctxdistill.methods.disc import Disc
    from ctxdistill.models import load_model, load_tokenizer

    bf16 = args.authors_precision == "bf16"
    tokenizer = load_tokenizer(args.model)
    student = load_model(args.model).train()
    teacher = load_model(args.model, dtype=torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)  # foreach, as torch's default; no fused kernel
    cfg = TrainConfig.create(split_strategy=args.split_strategy)
    method = Disc(cfg)
    docs, _ = load_corpus(args.corpus)
    rng = random.Random(0)
    examples = method.prepare(docs, PrepareContext(tokenizer, cfg)).examples[: args.warmup + args.docs]
    temperature = cfg.disc.temperature
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    times, student_tokens = [], 0
    for n, example in enumerate(examples):
        items = method.plan(example, rng)
        if not items:
            continue
        ids, spans = items[0].doc.token_ids, items[0].spans
        start = time.perf_counter()
        for s, e in spans:
            with torch.no_grad(), autocast:
                t_logits = teacher(input_ids=torch.tensor([ids[:e]])).logits[0, s : e - 1].float()
            with autocast:
                s_logits = student(input_ids=torch.tensor([ids[s:e]])).logits[0, : e - s - 1].float()
            kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                          log_target=True, reduction="batchmean") * temperature**2
            (kl / len(spans)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if n >= args.warmup:
            times.append(time.perf_counter() - start)
            student_tokens += sum(e - s - 1 for s, e in spans)
    seconds = sum(times)
    return {"variant": args.variant, "precision": args.authors_precision, "optimizer": "torch.optim.AdamW (foreach, not fused)",
            "steps_timed": len(times), "seconds": round(seconds, 3), "documents_per_s": len(times) / seconds,
            "step_s_median": sorted(times)[len(times) // 2], "student_tokens_per_s": student_tokens / seconds,
            "parameters": sum(p.numel() for p in student.parameters())}
