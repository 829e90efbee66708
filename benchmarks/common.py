"""Shared helpers for the benchmarks: machine description, peak memory, JSON output, child processes.

Each variant of a benchmark runs in its own child process, so its peak RSS is its own, and the
variants of one benchmark run back to back in the same invocation so their ratios are comparable.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0]
        info["cpu_model"] = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(": \t")
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags
    except (OSError, IndexError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def run_child(script: str, args: list[str], timeout: int = 3600) -> dict:
    """Run `script --child ARGS` and return the JSON object it prints on its last stdout line."""
    cmd = [sys.executable, script, "--child", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = round(time.perf_counter() - started, 2)
    return result


def write_result(path: str | None, name: str, result: dict) -> None:
    result = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    text = json.dumps(result, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)
