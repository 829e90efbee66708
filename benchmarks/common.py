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
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": torch.cuda.get_device_name(), "gpu_memory_mb": props.total_memory // 2**20,
                 "gpu_multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}
    return info


# Real model shapes for random-init runs (weights cannot travel; shapes can):
# (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "tiny": (64, 128, 2, 4, 2, 1000, True),  # smoke tests of the benchmarks on a CPU
}


def shape_dims(shape: str) -> dict:
    return dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "tied_embeddings"), SHAPES[shape]))


def shape_config(shape: str, max_positions: int = 32768):
    """transformers' Qwen2Config of a real Qwen2.5 shape."""
    from transformers import Qwen2Config

    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    return Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max_positions, tie_word_embeddings=tied)


def random_model(shape: str, device, dtype=None, seed: int = 0):
    """A random-init model of a real shape, built directly on `device` (AutoModelForCausalLM.from_config)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=dtype or torch.float32)
    return model


def minimal_tokenizer():
    """A tokenizer with only pad/eos tokens, for runs that feed token ids directly (nothing is tokenised)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def synthetic_documents(n: int, vocab: int, doc_tokens=(512, 2048), sentence_tokens=(8, 48), seed: int = 0) -> list:
    """`n` documents of random token ids, lengths uniform in `doc_tokens`, cut into sentence-like segments
    of lengths uniform in `sentence_tokens` (the last one takes the remainder): ctxdistill SegmentedDocs,
    the form DiSC's prepare() produces, so the real training loop runs on them unchanged."""
    import random

    from ctxdistill.inputs.segment import SegmentedDoc

    rng = random.Random(seed)
    docs = []
    for d in range(n):
        length = rng.randint(*doc_tokens)
        tokens = [rng.randrange(3, vocab) for _ in range(length)]
        sentences, pos = [], 0
        while pos < length:
            size = rng.randint(*sentence_tokens)
            if length - pos - size < sentence_tokens[0]:
                size = length - pos
            sentences.append(tuple(tokens[pos : pos + size]))
            pos += size
        docs.append(SegmentedDoc(f"synthetic-{d}", tuple(sentences)))
    return docs


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


def write_result(path: str | None, name: str, result: dict, echo: bool = True) -> None:
    result = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    text = json.dumps(result, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    if echo:
        print(text)
