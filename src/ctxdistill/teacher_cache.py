"""The teacher top-k cache: DiSC without a teacher in memory.

Because DiSC's teacher reads the document itself (no generated text), its next-token distribution at
every position of every document is fixed before training starts. `ctxdistill cache-teacher` runs
the frozen teacher once over each (windowed) document and stores, for every position, the top-k token
ids and log-probabilities at the distillation temperature, plus the tail mass. Every split strategy
and seed reads its positions from the same cache.

Layout: `manifest.json` (format version, the key it was built for, shard list with sizes and sha256)
and `shard-NNNNN.safetensors` files holding `ids` (int32 [P, k]), `logprobs` (float32 [P, k]) and
`tail` (float32 [P]). The key hashes the initial weights, the tokenised corpus (which covers the
tokenizer, the windowing and the text), the temperature and k; a cache built for anything else, or a
truncated one, is refused with a message that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CtxDistillError
from .models import sha256_of

CACHE_FORMAT = 1
SHARD_POSITIONS = 1 << 16


@dataclass(frozen=True)
class CacheKey:
    weights_sha256: str
    corpus_sha256: str
    temperature: float
    k: int
    vocab_size: int

    def differences(self, other: "CacheKey") -> list[str]:
        return [name for name, value in asdict(self).items() if asdict(other)[name] != value]


def weights_fingerprint(model) -> str:
    """sha256 over the parameter tensors (name, dtype, shape, bytes) of the initial model."""
    digest = hashlib.sha256()
    state = model.get_base_model().state_dict() if hasattr(model, "get_base_model") else model.state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name.replace('base_layer.', '')}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def corpus_fingerprint(examples) -> str:
    """sha256 over every window's id and per-sentence token ids."""
    digest = hashlib.sha256()
    for doc in examples:
        digest.update(json.dumps([doc.doc_id, doc.sentence_ids]).encode())
    return digest.hexdigest()


@torch.no_grad()
def teacher_topk(teacher, token_ids: list[int], k: int, temperature: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs (at T) of the teacher's prediction at positions 0..L-2, and the tail mass."""
    ids = torch.tensor([token_ids], device=device)
    positions = torch.arange(len(token_ids) - 1, device=device)
    logits = teacher(input_ids=ids, logits_to_keep=positions, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    top_logprobs, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    tail = (1 - top_logprobs.exp().sum(-1)).clamp_min(0)
    return top_ids.int().cpu(), top_logprobs.cpu(), tail.cpu()


def build_cache(teacher, examples, key: CacheKey, out_dir: str | Path, device, progress: bool = True) -> dict:
    """Write the cache for `examples` (SegmentedDoc windows) to `out_dir`, atomically."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    shards, buffer, documents, buffered = [], [], [], 0

    def flush():
        nonlocal buffer, documents, buffered
        if not buffer:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {"ids": torch.cat([b[0] for b in buffer]), "logprobs": torch.cat([b[1] for b in buffer]),
                   "tail": torch.cat([b[2] for b in buffer])}
        save_file(tensors, tmp / name)
        shards.append({"file": name, "bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name),
                       "positions": buffered, "documents": documents})
        buffer, documents, buffered = [], [], 0

    for doc in tqdm(examples, desc="cache-teacher", unit="doc", disable=not progress):
        token_ids = doc.token_ids
        if len(token_ids) < 2:
            continue
        top_ids, top_logprobs, tail = teacher_topk(teacher, token_ids, key.k, key.temperature, device)
        documents.append({"id": doc.doc_id, "offset": buffered, "positions": len(token_ids) - 1})
        buffer.append((top_ids, top_logprobs, tail))
        buffered += len(token_ids) - 1
        if buffered >= SHARD_POSITIONS:
            flush()
    flush()
    manifest = {"format": CACHE_FORMAT, "key": asdict(key), "shards": shards,
                "positions": sum(s["positions"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
                "build_seconds": round(time.perf_counter() - started, 3)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


class TeacherCache:
    """Read side of the cache: `lookup(doc_id, positions)` -> (top-k log-probs, top-k ids)."""

    def __init__(self, path: Path, manifest: dict, tensors: dict[str, dict[str, torch.Tensor]]):
        self.path = path
        self.manifest = manifest
        self.key = CacheKey(**manifest["key"])
        self._tensors = tensors
        self._where = {d["id"]: (s["file"], d["offset"], d["positions"]) for s in manifest["shards"] for d in s["documents"]}

    @classmethod
    def open(cls, path: str | Path, expected: CacheKey | None = None, verify_checksums: bool = False) -> "TeacherCache":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise CtxDistillError(f"{path} is not a teacher cache (no manifest.json); build one with `ctxdistill cache-teacher`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise CtxDistillError(f"{manifest_path} is corrupt; rebuild the cache with `ctxdistill cache-teacher`") from None
        if manifest.get("format") != CACHE_FORMAT:
            raise CtxDistillError(f"teacher cache {path} has format {manifest.get('format')}, expected {CACHE_FORMAT}; rebuild it")
        if expected is not None:
            different = expected.differences(CacheKey(**manifest["key"]))
            if different:
                raise CtxDistillError(f"teacher cache {path} was built for different settings ({', '.join(different)} differ); "
                                      f"rebuild it with `ctxdistill cache-teacher` using this run's model, corpus and settings")
        tensors = {}
        for shard in manifest["shards"]:
            file = path / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                raise CtxDistillError(f"teacher cache {path} is truncated or damaged ({shard['file']} missing or wrong size); rebuild it")
            if verify_checksums and sha256_of(file) != shard["sha256"]:
                raise CtxDistillError(f"teacher cache {path}: checksum mismatch in {shard['file']}; rebuild it")
            with safe_open(file, framework="pt") as f:
                tensors[shard["file"]] = {name: f.get_tensor(name) for name in ("ids", "logprobs", "tail")}
            if len(tensors[shard["file"]]["ids"]) != shard["positions"]:
                raise CtxDistillError(f"teacher cache {path}: {shard['file']} holds the wrong number of positions; rebuild it")
        return cls(path, manifest, tensors)

    def lookup(self, doc_id: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if doc_id not in self._where:
            raise CtxDistillError(f"teacher cache {self.path} has no entry for document {doc_id}; rebuild it for this corpus")
        file, offset, count = self._where[doc_id]
        if int(positions.max()) >= count:
            raise CtxDistillError(f"teacher cache {self.path}: document {doc_id} is shorter in the cache than in training; rebuild it")
        rows = positions.cpu() + offset
        shard = self._tensors[file]
        return shard["logprobs"][rows], shard["ids"][rows]


def open_for_run(path: str | Path, student, examples, temperature: float) -> TeacherCache:
    """Open a cache for a training run, refusing it unless it was built for this exact teacher and data."""
    manifest_path = Path(path) / "manifest.json"
    k = json.loads(manifest_path.read_text())["key"]["k"] if manifest_path.is_file() else 0
    expected = CacheKey(weights_fingerprint(student), corpus_fingerprint(examples), float(temperature), k,
                        student.get_output_embeddings().weight.shape[0])
    return TeacherCache.open(path, expected)


def cache_teacher(cfg, out_dir: str, k: int = 64, progress: bool = True, log=print) -> dict:
    """Build the cache for the documents a DiSC run with `cfg` (a TrainConfig) would train on."""
    from .corpus import load_corpus
    from .methods.disc import Disc
    from .models import Teacher, load_model, load_tokenizer
    from .train import DTYPES, autocast, resolve_device

    if k < 1:
        raise CtxDistillError(f"k must be >= 1, got {k}")
    device = resolve_device(cfg.device)
    documents, _ = load_corpus(cfg.corpus, cfg.text_field, cfg.id_field, cfg.min_chars)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    examples = Disc().prepare(documents, tokenizer, cfg).examples
    vocab = model.get_output_embeddings().weight.shape[0]
    key = CacheKey(weights_fingerprint(model), corpus_fingerprint(examples), float(cfg.temperature), min(k, vocab), vocab)
    teacher = Teacher(model=model.to(device=device, dtype=DTYPES[cfg.teacher_dtype]))
    with autocast(device, cfg.precision):
        manifest = build_cache(teacher, examples, key, out_dir, device, progress)
    log(f"cache-teacher: {len(examples)} documents, {manifest['positions']} positions, "
        f"{manifest['bytes'] / max(manifest['positions'], 1):.0f} bytes/position, {manifest['build_seconds']:.1f} s -> {out_dir}")
    return manifest
