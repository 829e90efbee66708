"""DiSC training throughput: the authors' per-split loop vs ctxdistill's default vs the teacher cache vs FT.

    python benchmarks/bench_throughput.py --docs 12 --out benchmarks/results/throughput_cpu.json

Each variant trains the same documents (one document per optimizer step, bf16 autocast, fp32 master
weights) in its own process; throughput is measured after `--warmup` steps. Also reported: the loss
agreement of the default path with the per-split reference (fp32, first documents, identical weights),
the teacher cache's size and build time, and the top-k + tail KL's gap to the full-vocabulary KL.
On a GPU machine, `--random-init qwen2.5-1.5b` measures a random-init model of that shape instead, and
`--synthetic-docs` trains on documents of random token ids (lengths in `--doc-tokens`, cut into
sentence-like segments of `--sentence-tokens`) fed to the real training loop in place of a text corpus:

    python benchmarks/bench_throughput.py --random-init qwen2.5-1.5b --synthetic-docs --device cuda \
        --variants ft,disc_reference,disc,disc_all_sentences --docs 24 --warmup 4 --out benchmarks/results/throughput_h100.json

Variants beyond the four above: `disc_all_sentences` (DiSC with `--split-strategy all_sentences`: every
sentence but the first is a suffix), `ft_compile` and `disc_compile` (`--compile`); `ft_packed`, `ft_padded`,
`disc_packed`, `disc_padded` (`--docs-per-step` documents per optimizer step in one pass, `--packing on` / `off`;
the warm-up is rounded up to whole steps); `authors` and `authors_bf16`: the authors' per-document step rebuilt
outside ctxdistill's loop (per-split backward, plain foreach AdamW; benchmarks/authors_disc.py), fp32 / bf16; and `sdft` (on-policy
self-distillation: one question per document generated before training, then every step draws a rollout of
up to `--sdft-completion-tokens` from the student and distils the document-conditioned teacher on it; its
result adds the share of the timed steps spent generating). DiSC, FT and SDFT side by side:

    python benchmarks/bench_throughput.py --variants ft,disc,sdft --docs 6 --out benchmarks/results/throughput_sdft_cpu.json

    python benchmarks/bench_throughput.py --threads 1 --variants ft_padded,ft_packed --docs 16 --docs-per-step 8 \
        --out benchmarks/results/packing_ft_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (SHAPES, minimal_tokenizer, parse_range, peak_memory_mb, random_model, run_child,  # noqa: E402
                    synthetic_documents, write_result)

VARIANTS = ("ft", "disc_reference", "disc", "disc_cache", "disc_all_sentences", "ft_compile", "disc_compile",
            "ft_packed", "ft_padded", "disc_packed", "disc_padded", "authors", "authors_bf16", "sdft")
BATCHED = ("ft_packed", "ft_padded", "disc_packed", "disc_padded")  # --docs-per-step documents per step, --packing on / off
DEFAULT_VARIANTS = ("ft", "disc_reference", "disc", "disc_cache")


def random_init_model(shape: str, out_dir: Path, synthetic: bool) -> str:
    """Save a random-init Qwen2 of a real shape (weights cannot travel; shapes can), in bf16 (training loads
    fp32 master weights from it, exactly), with the SmolLM2 tokenizer, or a pad/eos-only one for token-id
    documents. Built on the GPU when there is one."""
    import torch

    from ctxdistill.models import load_tokenizer

    model = random_model(shape, "cuda" if torch.cuda.is_available() else "cpu")
    model.to(torch.bfloat16).save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    (minimal_tokenizer() if synthetic else load_tokenizer("smollm2-135m-instruct")).save_pretrained(out_dir)
    return str(out_dir)


def use_synthetic_documents(args) -> None:
    """Make `train()` read random-token documents (see common.synthetic_documents) instead of a corpus:
    the methods' load/prepare are replaced, everything after them (plan, loss, step) is the real code."""
    from transformers import AutoConfig

    import ctxdistill.training.loop as loop_module
    from ctxdistill.inputs.corpus import CorpusReport, Document
    from ctxdistill.methods import PreparedCorpus, get_method
    from ctxdistill.methods.ft import TokenExample

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    docs = synthetic_documents(args.warmup + args.docs, vocab, parse_range(args.doc_tokens), parse_range(args.sentence_tokens))

    def synthetic_method(cfg):
        method = get_method(cfg)

        def load():
            return [Document(d.doc_id, "") for d in docs], CorpusReport(read=len(docs), kept=len(docs))

        def prepare(documents, ctx):
            method.pad_id = ctx.pad_id
            examples = [TokenExample(d.doc_id, tuple(d.token_ids)) for d in docs] if cfg.method == "ft" else list(docs)
            return PreparedCorpus(examples)

        method.load, method.prepare = load, prepare
        return method

    loop_module.get_method = synthetic_method


def subset_corpus(n_docs: int, path: Path) -> str:
    from ctxdistill.inputs.corpus import bundled_path

    lines = bundled_path("news_updates").read_text(encoding="utf-8").splitlines()[:n_docs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def child(args) -> dict:
    """One variant: train `warmup + docs` steps, time the last `docs` from losses.jsonl."""
    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.runtime import resolve_device
    from ctxdistill.teachers import cache_teacher
    from ctxdistill.training import train

    work = Path(args.work)
    torch.set_num_threads(args.threads) if args.threads else None
    if args.variant in ("authors", "authors_bf16"):
        from authors_disc import authors_child

        args.authors_precision = "bf16" if args.variant == "authors_bf16" else "fp32"
        return authors_child(args)
    batched = args.variant in BATCHED
    dps = args.docs_per_step if batched else 1
    warmup_steps = -(-args.warmup // dps)
    if args.synthetic_docs:
        if args.variant == "disc_cache":
            raise SystemExit("disc_cache reads a text corpus; not available with --synthetic-docs")
        use_synthetic_documents(args)
    base = dict(model=args.model, corpus=args.corpus, lr=1e-5, epochs=args.epochs, max_steps=args.warmup + args.docs,
                save_model=False, overwrite=True, seed=0, device=args.device, split_strategy=args.split_strategy)
    if batched:
        base |= {"max_steps": warmup_steps + args.docs // dps, "docs_per_step": dps,
                 "packing": "on" if args.variant.endswith("packed") else "off"}
    result = {"variant": args.variant, "docs_per_step": dps}
    if batched:
        cfg = TrainConfig.create(method=args.variant.split("_")[0], out=str(work / args.variant), **base)
    elif args.variant in ("ft", "ft_compile"):
        cfg = TrainConfig.create(method="ft", out=str(work / args.variant), compile=args.variant == "ft_compile", **base)
    elif args.variant == "disc_all_sentences":
        cfg = TrainConfig.create(method="disc", out=str(work / args.variant), **(base | {"split_strategy": "all_sentences"}))
    elif args.variant == "disc_compile":
        cfg = TrainConfig.create(method="disc", out=str(work / args.variant), compile=True, **base)
    elif args.variant == "disc_reference":
        cfg = TrainConfig.create(method="disc", teacher_mode="per_split", out=str(work / "ref"), **base)
    elif args.variant == "disc":
        cfg = TrainConfig.create(method="disc", out=str(work / "disc"), **base)
    elif args.variant == "sdft":
        if args.synthetic_docs:
            raise SystemExit("sdft generates questions and rollouts as text; not available with --synthetic-docs")
        cfg = TrainConfig.create(method="sdft", out=str(work / "sdft"), sdft_questions_per_document=1,
                                 sdft_max_completion_tokens=args.sdft_completion_tokens, gen_cache=False, **base)
    else:
        cache_dir = work / "cache"
        manifest = cache_teacher(TrainConfig.create(method="disc", **base), str(cache_dir), k=args.k, progress=False, log=lambda *_: None)
        result["cache"] = {"k": args.k, "positions": manifest["positions"], "bytes": manifest["bytes"],
                           "bytes_per_position": manifest["bytes"] / manifest["positions"], "build_s": manifest["build_seconds"]}
        cfg = TrainConfig.create(method="disc", teacher_cache=str(cache_dir), out=str(work / "cached"), **base)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    backends = contextlib.nullcontext()
    if args.sdpa_backends:  # restrict scaled_dot_product_attention to these kernels for the whole run
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = sdpa_kernel([getattr(SDPBackend, name.strip().upper()) for name in args.sdpa_backends.split(",")])
        result["sdpa_backends"] = args.sdpa_backends
    with backends:
        trained = profiled_train(cfg, args) if args.profile else train(cfg, progress=False, log=lambda *_: None)
    summary = trained.summary
    result["parameters"] = sum(p.numel() for p in trained.model.parameters())
    result["split_strategy"] = cfg.disc.split_strategy
    result["compile"] = cfg.compile
    steps = [json.loads(line) for line in (Path(cfg.out) / "losses.jsonl").read_text().splitlines()]
    timed = steps[warmup_steps:]
    seconds = timed[-1]["elapsed_s"] - steps[warmup_steps - 1]["elapsed_s"] if warmup_steps else timed[-1]["elapsed_s"]
    tokens = sum(s["tokens"] for s in timed)
    documents = sum(len(s["documents"]) for s in timed)
    result |= {"steps_timed": len(timed), "documents_timed": documents, "seconds": round(seconds, 3), "documents_per_s": documents / seconds,
               "step_s_median": sorted(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps[warmup_steps - 1 :], timed))[len(timed) // 2]
               if warmup_steps else None, "packing": summary.get("packing"),
               "student_tokens_per_s": tokens / seconds, "student_tokens": tokens,
               "teacher_tokens_per_s": summary["counts"]["teacher_tokens"] * len(timed) / len(steps) / seconds,
               "peak_memory_mb": round(peak_memory_mb(device), 1), "memory_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS"}
    if args.variant == "sdft":  # on-policy rollouts are drawn inside the steps: how much of the step time they take
        generating = sum(s.get("generation_s", s.get("metrics", {}).get("generation_s", 0.0)) for s in timed)
        result |= {"generation_s": round(generating, 3), "generation_share": generating / seconds, "training_share": 1 - generating / seconds,
                   "rollout_tokens_mean": sum(s.get("completion_tokens", s.get("metrics", {}).get("completion_tokens", 0.0)) for s in timed) / len(timed),
                   "question_generation": summary.get("generation", {})}
    return result


def profiled_train(cfg, args):
    """train() with the steps after the warm-up under cProfile (where the host's time goes, waits for
    the GPU included) and 3 of them under the torch profiler (device time by kernel); both tables are
    written to `--profile`."""
    import cProfile
    import io
    import pstats

    import torch

    import ctxdistill.training.loop as train_module

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(wait=args.warmup, warmup=1, active=3, repeat=1))
    profiler, done = cProfile.Profile(), [0]
    original = train_module.Trainer.step

    def step(self, group, epoch):
        timed = done[0] >= args.warmup
        if timed:
            profiler.enable()
        record = original(self, group, epoch)
        if timed:
            profiler.disable()
        done[0] += 1
        prof.step()
        return record

    train_module.Trainer.step = step
    with prof:
        trained = train_module.train(cfg, progress=False, log=lambda *_: None)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    Path(args.profile).write_text(f"# {args.variant}: torch profiler, 3 steps after {args.warmup + 1} unprofiled steps\n{table}\n"
                                  f"# cProfile of the steps after the {args.warmup} warm-up steps, by own time\n{text.getvalue()}")
    return trained


def loss_agreement(model: str, corpus: str, n_docs: int = 4) -> dict:
    """fp32: the default single-pass loss vs the authors' per-split loss on the same weights."""
    import random

    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.inputs.corpus import load_corpus
    from ctxdistill.methods.disc import Disc
    from ctxdistill.methods import PrepareContext
    from ctxdistill.models import load_model, load_tokenizer
    from ctxdistill.teachers import Teacher

    tokenizer, student = load_tokenizer(model), load_model(model)
    teacher = Teacher(model=load_model(model))
    with torch.no_grad():  # a student that differs from its teacher, as after some training
        for p in student.parameters():
            p.mul_(1 + 0.01 * torch.randn_like(p))
    cfg = TrainConfig.create()
    method = Disc(cfg)
    docs, _ = load_corpus(corpus)
    rel = []
    for example in method.prepare(docs, PrepareContext(tokenizer, cfg)).examples[:n_docs]:
        [item] = method.plan(example, random.Random(0))
        with torch.no_grad():
            fast = method.loss(student, teacher, item, "cpu").loss.item()
            ref = method.reference_loss(student, teacher, item, "cpu").loss.item()
        rel.append(abs(fast - ref) / abs(ref))
    return {"documents": len(rel), "max_relative_difference": max(rel), "precision": "fp32"}


def topk_gap(model: str, corpus: str, ks=(16, 64, 256)) -> dict:
    """Top-k + tail KL vs the full-vocabulary KL on real teacher/student distributions."""
    import random

    import torch

    from ctxdistill.config import TrainConfig
    from ctxdistill.inputs.corpus import load_corpus
    from ctxdistill.losses import forward_kl_per_position, topk_tail_kl_per_position
    from ctxdistill.methods import PrepareContext
    from ctxdistill.methods.disc import Disc, per_split_teacher_logits
    from ctxdistill.models import load_model, load_tokenizer

    tokenizer, model_ = load_tokenizer(model), load_model(model)
    docs, _ = load_corpus(corpus)
    cfg = TrainConfig.create()
    method = Disc(cfg)
    [item] = method.plan(method.prepare(docs[:1], PrepareContext(tokenizer, cfg)).examples[0], random.Random(0))
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
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-init", choices=sorted(SHAPES), help="benchmark a random-init model of this shape")
    parser.add_argument("--corpus")
    parser.add_argument("--docs", type=int, default=12, help="timed documents (= optimizer steps) per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--split-strategy", default="sentence_boundary")
    parser.add_argument("--sdft-completion-tokens", type=int, default=128, help="sdft variant: longest rollout per step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--synthetic-docs", action="store_true", help="documents of random token ids instead of the bundled articles")
    parser.add_argument("--doc-tokens", default="512-2048", help="with --synthetic-docs: document length range")
    parser.add_argument("--sentence-tokens", default="8-48", help="with --synthetic-docs: sentence-like segment length range")
    parser.add_argument("--child-timeout", type=int, default=3600, help="seconds per variant; a variant that fails or runs over is recorded as an error")
    parser.add_argument("--profile", help=argparse.SUPPRESS)  # child: write the profile tables to this file
    parser.add_argument("--profile-dir", help="profile each variant (cProfile + torch profiler) into DIR/profile_VARIANT.txt; "
                                              "profiling slows the steps, so time without it")
    parser.add_argument("--sdpa-backends", help="only these attention kernels, e.g. flash_attention,efficient_attention,math "
                                                "(torch.nn.attention.SDPBackend names); default: PyTorch's choice")
    parser.add_argument("--docs-per-step", type=int, default=8, help="documents per optimizer step of the *_packed / *_padded variants")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0 = torch's default)")
    parser.add_argument("--work")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    settings = {"model": args.random_init or args.model, "docs": args.docs, "warmup": args.warmup, "precision": "bf16 autocast, fp32 master weights",
                "teacher_dtype": "bf16", "optimizer": "AdamW fused", "split_strategy": args.split_strategy, "k": args.k,
                "docs_per_step": f"1; {args.docs_per_step} for {', '.join(BATCHED)}", "torch_threads": args.threads or "default",
                "device": args.device, "sdpa_backends": args.sdpa_backends or "PyTorch default",
                "documents": (f"random token ids, {args.doc_tokens} tokens, sentence-like segments of {args.sentence_tokens} tokens"
                              if args.synthetic_docs else "bundled news_updates articles")}
    if args.random_init:
        from common import shape_config

        settings["shape"] = shape_config(args.random_init).to_diff_dict() | {"name": args.random_init}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = random_init_model(args.random_init, work / "model", args.synthetic_docs) if args.random_init else args.model
        corpus = subset_corpus(args.docs + max(args.warmup, args.docs_per_step), work / "corpus.jsonl")
        common = ["--model", model, "--corpus", corpus, "--docs", str(args.docs), "--warmup", str(args.warmup), "--epochs", "1",
                  "--k", str(args.k), "--device", args.device, "--sdft-completion-tokens", str(args.sdft_completion_tokens), "--work", str(work), "--split-strategy", args.split_strategy,
                  "--doc-tokens", args.doc_tokens, "--sentence-tokens", args.sentence_tokens,
                  "--docs-per-step", str(args.docs_per_step), "--threads", str(args.threads)] + (["--synthetic-docs"] if args.synthetic_docs else []) \
            + (["--sdpa-backends", args.sdpa_backends] if args.sdpa_backends else [])
        results = {}
        for v in args.variants.split(","):  # the JSON is rewritten after each variant, so a cut-off run keeps what it measured
            try:
                profile = ["--profile", str(Path(args.profile_dir).resolve() / f"profile_{v}.txt")] if args.profile_dir else []
                results[v] = run_child(__file__, ["--variant", v, *common, *profile], timeout=args.child_timeout)
            except Exception as exc:  # noqa: BLE001  (recorded, the other variants still run)
                results[v] = {"variant": v, "error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
            print(f"{v}: {json.dumps(results[v])}", file=sys.stderr, flush=True)
            ratios = compute_ratios(results)
            write_result(args.out, "throughput", {"settings": settings, "variants": results, "ratios": ratios}, echo=False)
        extra = {}
        if not args.random_init:
            extra = {"loss_agreement": loss_agreement(model, corpus), "topk_gap": topk_gap(model, corpus)}
    write_result(args.out, "throughput", {"settings": settings, "variants": results, "ratios": compute_ratios(results), **extra})


def compute_ratios(results: dict) -> dict:
    ok = {v: r for v, r in results.items() if "error" not in r}
    ratios = {}
    if "disc" in ok and "disc_reference" in ok:
        ratios["disc_vs_reference_documents_per_s"] = ok["disc"]["documents_per_s"] / ok["disc_reference"]["documents_per_s"]
    if "ft" in ok:
        for v in ("disc", "disc_cache", "disc_all_sentences"):
            if v in ok:
                ratios[f"{v}_vs_ft_student_tokens_per_s"] = ok[v]["student_tokens_per_s"] / ok["ft"]["student_tokens_per_s"]
        # FT's model FLOP rate in training, optimizer step included: 6 * parameters * trained tokens per second
        ratios["ft_training_tflops"] = 6 * ok["ft"]["parameters"] * ok["ft"]["student_tokens_per_s"] / 1e12
    for name in ("ft", "disc"):
        if f"{name}_packed" in ok and f"{name}_padded" in ok:
            ratios[f"{name}_packed_vs_padded_documents_per_s"] = ok[f"{name}_packed"]["documents_per_s"] / ok[f"{name}_padded"]["documents_per_s"]
    for reference in ("authors", "authors_bf16"):
        for v in ("disc", "disc_packed", "disc_padded", "disc_reference"):
            if v in ok and reference in ok:
                ratios[f"{v}_vs_{reference}_documents_per_s"] = ok[v]["documents_per_s"] / ok[reference]["documents_per_s"]
    for v in ("ft", "disc"):
        if v in ok and "sdft" in ok:
            ratios[f"sdft_vs_{v}_documents_per_s"] = ok["sdft"]["documents_per_s"] / ok[v]["documents_per_s"]
    for plain, compiled in (("ft", "ft_compile"), ("disc", "disc_compile")):
        if plain in ok and compiled in ok:
            ratios[f"{compiled}_vs_{plain}_documents_per_s"] = ok[compiled]["documents_per_s"] / ok[plain]["documents_per_s"]
    return ratios


if __name__ == "__main__":
    main()
