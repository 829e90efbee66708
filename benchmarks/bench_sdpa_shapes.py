"""Cost of a new sequence length for scaled_dot_product_attention, per attention backend (CUDA).

    python benchmarks/bench_sdpa_shapes.py --out benchmarks/results/sdpa_shapes_h100.json

Training on documents of varying length hands attention a new shape at almost every step. Some
kernels (cuDNN's) build and cache a plan per shape; this times one forward+backward of a Qwen2.5-1.5B-
shaped attention (12 heads, head dim 128, causal, bf16) at lengths never seen before and again at a
length already seen, for PyTorch's default choice and for each backend forced.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def fwd_bwd_ms(length: int, heads: int = 12, dim: int = 128) -> float:
    q, k, v = (torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fwd_bwd_ms(64)  # CUDA context, cuBLAS handles
    flags = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "flash": torch.backends.cuda.flash_sdp_enabled(),
             "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
    rows = {}
    for i, (name, backends) in enumerate([("default", None), ("cudnn_attention", [SDPBackend.CUDNN_ATTENTION]),
                                          ("flash_attention", [SDPBackend.FLASH_ATTENTION]),
                                          ("efficient_attention", [SDPBackend.EFFICIENT_ATTENTION])]):
        lengths = [1000 + 1000 * i + j for j in (1, 7, 13, 29, 31)]  # lengths no earlier backend saw
        try:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                new = [fwd_bwd_ms(n) for n in lengths]
                seen = [fwd_bwd_ms(lengths[-1]) for _ in range(5)]
            rows[name] = {"new_length_ms": [round(x, 2) for x in new], "seen_length_ms": [round(x, 2) for x in seen],
                          "median_new_ms": sorted(new)[len(new) // 2], "median_seen_ms": sorted(seen)[len(seen) // 2]}
        except RuntimeError as exc:
            rows[name] = {"error": str(exc).splitlines()[0][:300]}
        print(name, rows[name], file=sys.stderr, flush=True)
    write_result(args.out, "sdpa_shapes", {"settings": {"heads": 12, "head_dim": 128, "batch": 1, "causal": True, "dtype": "bf16",
                                                        "timing": "one forward+backward, synchronised, wall clock"},
                                           "default_flags": flags, "backends": rows})


if __name__ == "__main__":
    main()
