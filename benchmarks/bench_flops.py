"""Achieved FLOP/s of a training step against this machine's measured bf16 matmul throughput.

    python benchmarks/bench_flops.py --out benchmarks/results/flops_cpu.json
    python benchmarks/bench_flops.py --device cuda --random-init qwen2.5-1.5b:1x2048,qwen2.5-1.5b:4x2048 \
        --nominal-peak-tflops 989 --out benchmarks/results/flops_h100.json

The peak is the best of several square bf16 matmuls (the number a training step could at most
reach); the step is FT's forward+backward through ctxdistill's own FT loss (`FineTune.loss`;
6·N·tokens FLOPs, N = parameters, attention ignored) and the full step with the fused AdamW update,
on SmolLM2-135M-Instruct or on random-init models of real shapes (`--random-init SHAPE:BATCHxTOKENS,...`),
with bf16 autocast over fp32 master weights (the training default) or, with `:bf16` appended, bf16
weights and no autocast (for shapes whose fp32 weights, gradients and AdamW state do not fit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAPES, random_model, shape_dims, write_result  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(dtype: torch.dtype, size: int, repeats: int, device) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def step_times(model, batch: int, tokens: int, steps: int, device, optimizer_on: bool, autocast_on: bool) -> dict:
    """Median times of FT's forward+backward (ctxdistill's FT loss) and of the whole step with AdamW."""
    import contextlib

    from ctxdistill.config import TrainConfig
    from ctxdistill.methods.ft import FineTune, TokenExample

    cfg = TrainConfig(method="ft")
    method = FineTune(cfg)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type in ("cpu", "cuda")) if optimizer_on else None
    fwd_bwd, full = [], []
    for i in range(steps + 1):
        rows = [TokenExample(f"r{b}", tuple(torch.randint(0, model.config.vocab_size, (tokens,), generator=generator).tolist())) for b in range(batch)]
        sync(device)
        start = time.perf_counter()
        for row in rows:  # FT trains one document per forward pass; a batch of several is accumulated
            with torch.autocast(device.type, dtype=torch.bfloat16) if autocast_on else contextlib.nullcontext():
                loss = method.loss(model, None, row, device).loss
            (loss / batch).backward()
        sync(device)
        middle = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        end = time.perf_counter()
        if i:  # the first step warms up kernels and allocates optimizer state
            fwd_bwd.append(middle - start)
            full.append(end - start)
    out = {"forward_backward_s": sorted(fwd_bwd)[len(fwd_bwd) // 2]}
    if optimizer is not None:
        out["step_with_optimizer_s"] = sorted(full)[len(full) // 2]
    return out


def parse_runs(text: str) -> list[dict]:
    """`shape:BxT[:bf16]` entries."""
    runs = []
    for entry in text.split(","):
        parts = entry.split(":")
        batch, tokens = (int(x) for x in parts[1].lower().split("x")) if len(parts) > 1 else (1, 2048)
        runs.append({"shape": parts[0], "batch": batch, "tokens": tokens, "weights": parts[2] if len(parts) > 2 else "fp32"})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-init", help="SHAPE:BATCHxTOKENS[:bf16],... random-init models of real shapes (see common.SHAPES)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nominal-peak-tflops", type=float, help="the device's datasheet dense bf16 peak, reported beside the measured one")
    parser.add_argument("--out")
    args = parser.parse_args()

    from ctxdistill.models import load_model
    from ctxdistill.runtime import resolve_device

    device = resolve_device(args.device)
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    peaks = {"bf16_tflops": max(matmul_tflops(torch.bfloat16, n, 10, device) for n in sizes),
             "fp32_tflops": max(matmul_tflops(torch.float32, n, 3, device) for n in sizes), "matmul_sizes": list(sizes)}
    if device.type == "cuda":  # what fp32 matmuls (autocast-free code paths) get by default
        peaks["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    if args.nominal_peak_tflops:
        peaks["nominal_bf16_tflops"] = args.nominal_peak_tflops
    runs = parse_runs(args.random_init) if args.random_init else [{"shape": args.model, "batch": 1, "tokens": args.tokens, "weights": "fp32"}]
    results = []
    for run in runs:
        dtype = torch.bfloat16 if run["weights"] == "bf16" else torch.float32
        if args.random_init:
            model = random_model(run["shape"], device, dtype).train()
        else:
            model = load_model(run["shape"]).to(device).train()
        n_params = sum(p.numel() for p in model.parameters())
        # fp32 weights + gradients + two AdamW moments = 16 bytes per parameter; leave room for activations
        room = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else float("inf")
        optimizer_on = run["weights"] == "fp32" and 16 * n_params < 0.8 * room
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = step_times(model, run["batch"], run["tokens"], args.steps, device, optimizer_on, autocast_on=run["weights"] == "fp32")
        flops = 6 * n_params * run["batch"] * run["tokens"]
        achieved = {key.replace("_s", "_tflops"): flops / value / 1e12 for key, value in times.items()}
        fraction = {key.replace("_tflops", "_fraction_of_measured_bf16_peak"): value / peaks["bf16_tflops"] for key, value in achieved.items()}
        if args.nominal_peak_tflops:
            fraction |= {key.replace("_tflops", "_fraction_of_nominal_bf16_peak"): value / args.nominal_peak_tflops for key, value in achieved.items()}
        results.append(run | ({"shape_dims": shape_dims(run["shape"])} if run["shape"] in SHAPES else {}) | {"precision": "bf16 autocast, fp32 master weights" if run["weights"] == "fp32" else "bf16 weights, no autocast",
                              "optimizer": "AdamW fused" if optimizer_on else "none (does not fit)" if run["weights"] == "fp32" else "none",
                              "parameters": n_params, "flops_per_step": flops, "step": times, "achieved": achieved, "fraction": fraction,
                              "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None})
        print(results[-1], file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    settings = {"steps": args.steps, "loss": "ctxdistill FineTune.loss (next-token CE, one document per forward pass)",
                "flops_rule": "6 * parameters * tokens (attention score FLOPs ignored)", "device": args.device}
    if len(results) == 1 and not args.random_init:  # the CPU result's original layout
        r = results[0]
        write_result(args.out, "flops", {"settings": settings | {"model": r["shape"], "tokens": r["tokens"], "precision": r["precision"], "optimizer": r["optimizer"]},
                                         "parameters": r["parameters"], "matmul_peak": peaks, "step": r["step"], "achieved": r["achieved"], "fraction": r["fraction"]})
    else:
        write_result(args.out, "flops", {"settings": settings, "matmul_peak": peaks, "runs": results})


if __name__ == "__main__":
    main()
