"""The one home of the environment: device, dtypes, autocast, threads, library versions, cache root.

Nothing deeper in the library reads environment variables or picks a device on its own; it asks here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import time
from pathlib import Path

import torch

from .errors import CtxDistillError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def cache_root() -> Path:
    """User cache for ctxdistill (models, Punkt tables, generations); override with CTXDISTILL_CACHE."""
    root = os.environ.get("CTXDISTILL_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctxdistill"


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`; anything else is refused in one line."""
    kind, _, index = name.partition(":")
    if kind not in DEVICE_KINDS or (index and not (kind == "cuda" and index.isdigit())) or (kind == "auto" and index):
        raise CtxDistillError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CtxDistillError(f"device {name} requested but CUDA is not available; use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise CtxDistillError(f"device {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CtxDistillError(f"device {name} requested but MPS is not available; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast over fp32 master weights (sound on CPUs with bf16 matmuls and on GPUs)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(threads: int) -> None:
    """Torch CPU threads for this process (0 = torch's default). One thread per process on a shared CPU."""
    if threads < 0:
        raise CtxDistillError(f"threads must be >= 0, got {threads}")
    if threads > 0:
        torch.set_num_threads(threads)


def release_memory() -> None:
    """Collect Python's reference cycles, then hand the heap's freed pages back to the OS.

    After a tensor larger than 128 KB is freed, glibc raises its mmap threshold to that size (up to 32 MB), so
    later tensors of that size come from the heap, and heap pages freed in the middle stay in the process's
    resident memory. A sweep process that trains and evaluates one Qwen2.5-0.5B full fine-tune after another
    grew that way from run to run; `malloc_trim(0)` returns those pages. A no-op where libc is not glibc."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.cache
def _glibc():
    """The C library when it is glibc (it alone has malloc_trim), else None."""
    name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
    lib = ctypes.CDLL(name) if name else None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def versions() -> dict:
    """Library versions recorded with every run and evaluation."""
    import accelerate
    import peft
    import transformers

    from . import __version__

    return {"ctxdistill": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}


def launched_world_size() -> int:
    """Processes started by torchrun / accelerate launch (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class Timer:
    """`with Timer() as t: ...` then `t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


class PhaseTimer:
    """Wall-clock and CPU seconds (all threads of this process) per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start
                timer.cpu_seconds[name] = timer.cpu_seconds.get(name, 0.0) + time.process_time() - self.cpu

        return _Phase()
