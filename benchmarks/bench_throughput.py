"""DiSC training throughput: the authors' per-split loop vs ctxdistill's default vs the teacher cache vs FT.

    python benchmarks/bench_throughput.py --docs 12 --out benchmarks/results/throughput_cpu.json

Each variant trains the same documents (one document per optimizer step, bf16 autocast, fp32 master
weights) in its own process; throughput is measured after `--warmup` steps. Also reported: the loss
agreement of the default path with the per-split reference (fp32, first documents, identical weights),
the teacher cache's size and build time, and the top-k + tail KL's gap to the full-vocabulary KL.
On a GPU machine, `--random-init qwen2.5-1.5b` measures a random-init model of that shape instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_memory_mb, run_child, write_result  # noqa: E402

SHAPES = {  # real model shapes for random-init runs (hidden, intermediate, layers, heads, kv heads, vocab)
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064),
}
VARIANTS = ("ft", "disc_reference", "disc", "disc_cache")


def random_init_model(shape: str, out_dir: Path) -> str:
    """Save a random-init Qwen2 of a real shape (weights cannot travel; shapes can) with the SmolLM2 tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ctxdistill.models import load_tokenizer

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=32768, tie_word_embeddings=shape != "qwen2.5-7b")
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(out_dir)
    return str(out_dir)


def subset_corpus(n_docs: int, path: Path) -> str:
    from ctxdistill.corpus import bundled_path

    lines = bundled_path("news_updates").read_text(encoding="utf-8").splitlines()[:n_docs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def child(args) -> dict:
    """One variant: train `warmup + docs` steps, time the last `docs` from losses.jsonl."""
    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.teacher_cache import cache_teacher
    from ctxdistill.train import resolve_device, train

    work = Path(args.work)
    base = dict(model=args.model, corpus=args.corpus, lr=1e-5, epochs=args.epochs, max_steps=args.warmup + args.docs,
                save_model=False, overwrite=True, seed=0, device=args.device, split_strategy=args.split_strategy)
    result = {"variant": args.variant}
    if args.variant == "ft":
        cfg = TrainConfig(method="ft", out=str(work / "ft"), **base)
    elif args.variant == "disc_reference":
        cfg = TrainConfig(method="disc", teacher_mode="per_split", out=str(work / "ref"), **base)
    elif args.variant == "disc":
        cfg = TrainConfig(method="disc", out=str(work / "disc"), **base)
    else:
        cache_dir = work / "cache"
        manifest = cache_teacher(TrainConfig(method="disc", **base), str(cache_dir), k=args.k, progress=False, log=lambda *_: None)
        result["cache"] = {"k": args.k, "positions": manifest["positions"], "bytes": manifest["bytes"],
                           "bytes_per_position": manifest["bytes"] / manifest["positions"], "build_s": manifest["build_seconds"]}
        cfg = TrainConfig(method="disc", teacher_cache=str(cache_dir), out=str(work / "cached"), **base)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    summary = train(cfg, progress=False, log=lambda *_: None).summary
    steps = [json.loads(line) for line in (Path(cfg.out) / "losses.jsonl").read_text().splitlines()]
    timed = steps[args.warmup :]
    seconds = timed[-1]["elapsed_s"] - steps[args.warmup - 1]["elapsed_s"] if args.warmup else timed[-1]["elapsed_s"]
    tokens = sum(s["tokens"] for s in timed)
    result |= {"steps_timed": len(timed), "seconds": round(seconds, 3), "documents_per_s": len(timed) / seconds,
               "student_tokens_per_s": tokens / seconds, "student_tokens": tokens,
               "teacher_tokens_per_s": summary["counts"]["teacher_tokens"] * len(timed) / len(steps) / seconds,
               "peak_memory_mb": round(peak_memory_mb(device), 1), "memory_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS"}
    return result


def loss_agreement(model: str, corpus: str, n_docs: int = 4) -> dict:
    """fp32: the default single-pass loss vs the authors' per-split loss on the same weights."""
    import random

    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.corpus import load_corpus
    from ctxdistill.methods.disc import Disc
    from ctxdistill.models import Teacher, load_model, load_tokenizer

    tokenizer, student = load_tokenizer(model), load_model(model)
    teacher = Teacher(model=load_model(model))
    with torch.no_grad():  # a student that differs from its teacher, as after some training
        for p in student.parameters():
            p.mul_(1 + 0.01 * torch.randn_like(p))
    method, cfg = Disc(), TrainConfig()
    docs, _ = load_corpus(corpus)
    rel = []
    for example in method.prepare(docs, tokenizer, cfg).examples[:n_docs]:
        item = method.plan(example, random.Random(0), cfg)
        with torch.no_grad():
            fast = method.loss(student, teacher, item, cfg, 0, "cpu")[0].item()
            ref = method.reference_loss(student, teacher, item, cfg, "cpu")[0].item()
        rel.append(abs(fast - ref) / abs(ref))
    return {"documents": len(rel), "max_relative_difference": max(rel), "precision": "fp32"}


def topk_gap(model: str, corpus: str, ks=(16, 64, 256)) -> dict:
    """Top-k + tail KL vs the full-vocabulary KL on real teacher/student distributions."""
    import random

    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.corpus import load_corpus
    from ctxdistill.losses import forward_kl_per_position, topk_tail_kl_per_position
    from ctxdistill.methods.disc import Disc, per_split_teacher_logits
    from ctxdistill.models import load_model, load_tokenizer

    tokenizer, model_ = load_tokenizer(model), load_model(model)
    docs, _ = load_corpus(corpus)
    method, cfg = Disc(), TrainConfig()
    item = method.plan(method.prepare(docs[:1], tokenizer, cfg).examples[0], random.Random(0), cfg)
    with torch.no_grad():
        t = per_split_teacher_logits(model_, item.doc.token_ids, item.spans, "cpu")
        s = torch.cat([model_(torch.tensor([item.doc.token_ids[a:b]])).logits[0, : b - a - 1] for a, b in item.spans])
        full = forward_kl_per_position(t, s, 2.0).mean().item()
        logp = torch.log_softmax(t / 2.0, -1)
        out = {"full_kl": full}
        for k in ks:
            values, ids = logp.topk(k)
            out[f"top{k}_kl"] = topk_tail_kl_per_position(values, ids, s, 2.0).mean().item()
            out[f"top{k}_relative_gap"] = (full - out[f"top{k}_kl"]) / full
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-init", choices=sorted(SHAPES), help="benchmark a random-init model of this shape")
    parser.add_argument("--corpus")
    parser.add_argument("--docs", type=int, default=12, help="timed documents (= optimizer steps) per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--split-strategy", default="sentence_boundary")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = random_init_model(args.random_init, work / "model") if args.random_init else args.model
        corpus = subset_corpus(args.docs + args.warmup, work / "corpus.jsonl")
        common = ["--model", model, "--corpus", corpus, "--docs", str(args.docs), "--warmup", str(args.warmup), "--epochs", "1",
                  "--k", str(args.k), "--device", args.device, "--work", str(work), "--split-strategy", args.split_strategy]
        results = {v: run_child(__file__, ["--variant", v, *common]) for v in args.variants.split(",")}
        ratios = {}
        if "disc" in results and "disc_reference" in results:
            ratios["disc_vs_reference_documents_per_s"] = results["disc"]["documents_per_s"] / results["disc_reference"]["documents_per_s"]
        if "ft" in results:
            for v in ("disc", "disc_cache"):
                if v in results:
                    ratios[f"{v}_vs_ft_student_tokens_per_s"] = results[v]["student_tokens_per_s"] / results["ft"]["student_tokens_per_s"]
        extra = {}
        if not args.random_init:
            extra = {"loss_agreement": loss_agreement(model, corpus), "topk_gap": topk_gap(model, corpus)}
    settings = {"model": args.random_init or args.model, "docs": args.docs, "warmup": args.warmup, "precision": "bf16 autocast, fp32 master weights",
                "split_strategy": args.split_strategy, "docs_per_step": 1, "k": args.k, "device": args.device}
    write_result(args.out, "throughput", {"settings": settings, "variants": results, "ratios": ratios, **extra})


if __name__ == "__main__":
    main()
