"""Achieved FLOP/s of a training step against this machine's measured bf16 matmul throughput.

    python benchmarks/bench_flops.py --out benchmarks/results/flops_cpu.json

The peak is the best of several square bf16 matmuls (the number a training step could at most
reach); the step is FT's forward+backward (6·N·tokens FLOPs, N = parameters, attention ignored) and the
full step with the optimizer, on SmolLM2-135M-Instruct with bf16 autocast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def matmul_tflops(dtype: torch.dtype, size: int, repeats: int, device) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def step_times(model, tokens: int, steps: int, device) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    fwd_bwd, full = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if i:  # the first step warms up kernels and allocates optimizer state
            fwd_bwd.append(middle - start)
            full.append(end - start)
    return {"forward_backward_s": sorted(fwd_bwd)[len(fwd_bwd) // 2], "step_with_optimizer_s": sorted(full)[len(full) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out")
    args = parser.parse_args()

    from ctxdistill.models import load_model
    from ctxdistill.train import resolve_device

    device = resolve_device(args.device)
    peaks = {"bf16_tflops": max(matmul_tflops(torch.bfloat16, n, 5, device) for n in (1024, 2048)),
             "fp32_tflops": max(matmul_tflops(torch.float32, n, 3, device) for n in (1024, 2048))}
    model = load_model(args.model).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    times = step_times(model, args.tokens, args.steps, device)
    flops = 6 * n_params * args.tokens
    achieved = {key.replace("_s", "_tflops"): flops / value / 1e12 for key, value in times.items()}
    fraction = {key.replace("_tflops", "_fraction_of_bf16_peak"): value / peaks["bf16_tflops"] for key, value in achieved.items()}
    write_result(args.out, "flops", {"settings": {"model": args.model, "tokens": args.tokens, "steps": args.steps, "precision": "bf16 autocast",
                                                  "optimizer": "AdamW fused"},
                                     "parameters": n_params, "matmul_peak": peaks, "step": times, "achieved": achieved, "fraction": fraction})


if __name__ == "__main__":
    main()
