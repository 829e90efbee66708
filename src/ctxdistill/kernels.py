"""Optional fused kernels for the LM head + loss (`--kernels liger`, extra `ctxdistill[liger]`).

The PyTorch chunked path (`losses.chunked_head_kl_ce`) is the reference and the default. With `--kernels liger`
the same weighted sums run through Liger's fused linear losses, which never hold more than a block of logits:
`LigerFusedLinearCrossEntropyLoss` (reduction "sum") for the CE term and `LigerFusedLinearJSD` with beta = 0
(forward KL(teacher ‖ student) at temperature T) for the KL term. Liger reduces a call to one number, while
ctxdistill's losses are weighted sums over positions (DiSC: a mean over split points of per-split means, not a
token mean), so positions are grouped by their weight and each group is one call, scaled by its weight and size.
Liger's kernels are Triton, so they need CUDA; equivalence with the chunked path is tested only there
(tests/test_chunked_losses.py, marked for CUDA + liger; benchmarks/gpu_suite.sh runs them).
"""

from __future__ import annotations

import importlib.util

import torch

from .errors import CtxDistillError

KERNELS = ("torch", "liger")


def check_kernels(kernels: str, device: str) -> None:
    """Refuse `--kernels liger` where it cannot run (no CUDA, a CPU device, Liger not installed): one line, before any model loads."""
    if kernels != "liger":
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise CtxDistillError("--kernels liger needs the Liger kernels: pip install 'ctxdistill[liger]' (or liger-kernel); "
                              "or drop --kernels for the PyTorch chunked path")
    if device == "cpu" or not torch.cuda.is_available():
        raise CtxDistillError("--kernels liger needs a CUDA GPU (Liger's kernels are Triton); this machine has none, "
                              "or --device is cpu: drop --kernels for the PyTorch chunked path")


def _groups(weights: torch.Tensor):
    values, group = torch.unique(weights, return_inverse=True)
    for g, value in enumerate(values):
        yield value, (group == g).nonzero()[:, 0]


def liger_head_kl_ce(student_hidden, student_head, targets=None, ce_weights=None, teacher_hidden=None, teacher_head=None,
                     kl_weights=None, temperature: float = 1.0, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.chunked_head_kl_ce` through Liger's fused linear losses (same arguments and result; `chunk_size` unused)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    kl = ce = student_hidden.new_zeros((), dtype=torch.float32)
    head = student_head.to(student_hidden.dtype)
    if teacher_hidden is not None:
        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)  # beta 0: forward KL, mean over the rows of a call
        t_head = teacher_head.to(teacher_hidden.dtype)
        for weight, rows in _groups(kl_weights):
            part = jsd(student_hidden[rows].contiguous(), head, teacher_hidden[rows].detach().contiguous(), t_head, None)
            kl = kl + part.float() * (weight * len(rows) * temperature**2)
    if targets is not None:
        cross_entropy = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        for weight, rows in _groups(ce_weights):
            ce = ce + cross_entropy(head, student_hidden[rows].contiguous(), targets[rows].contiguous()).float() * weight
    return kl, ce


def head_kl_ce(kernels: str, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head + weighted KL / CE sums with the chosen kernels (`torch`: the chunked reference)."""
    from .losses import chunked_head_kl_ce

    return (liger_head_kl_ce if kernels == "liger" else chunked_head_kl_ce)(*args, **kwargs)
