"""The teacher top-k cache: DiSC without a teacher in memory.

Because DiSC's teacher reads the document itself (no generated text), its next-token distribution at
every position of every document is fixed before training starts. `ctxdistill cache-teacher` runs
the frozen teacher once over each (windowed) document and stores, for every position, the top-k token
ids and log-probabilities at the distillation temperature, plus the tail mass. Every split strategy
and seed reads its positions from the same cache.

Layout: `manifest.json` (format version, the key it was built for, shard list with sizes and sha256)
and `shard-NNNNN.safetensors` files holding `ids` (int32 [P, k]), `logprobs` (float32 [P, k]) and
`tail` (float32 [P]). The key hashes the initial weights, the tokenised corpus (which covers the
tokenizer, the windowing and the text; `files.fingerprint`), the temperature and k; a cache built for anything else, or a
truncated one, is refused with a message that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CtxDistillError
from .files import sha256_of

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


def check_cache_destination(out: Path, overwrite: bool) -> Path:
    """Where a cache may be written: a new path, an existing cache (replaced only with --overwrite), or an
    empty directory. Anything else -- a directory holding the user's files, `.`, a file -- is refused."""
    from .files import check_writable_location, dangerous_to_delete

    check_writable_location(out)
    if not out.exists():
        return out
    if not out.is_dir():
        raise CtxDistillError(f"--out {out} exists and is not a directory; choose a new directory for the teacher cache")
    if not any(out.iterdir()):
        return out
    why = dangerous_to_delete(out)
    if why:
        raise CtxDistillError(f"refusing to write the teacher cache into {out}: {why}; choose a new directory for --out")
    if not (out / "manifest.json").is_file() or any(not (p.name == "manifest.json" or p.name.startswith("shard-")) for p in out.iterdir()):
        raise CtxDistillError(f"--out {out} is not empty and is not a teacher cache; choose a new directory (nothing was changed)")
    if not overwrite:
        raise CtxDistillError(f"--out {out} already holds a teacher cache; pass --overwrite to rebuild it, or choose another --out")
    return out


def build_cache(teacher, examples, key: CacheKey, out_dir: str | Path, device, progress: bool = True) -> dict:
    """Write the cache for `examples` (SegmentedDoc windows) to `out_dir`, atomically: a kill or a full
    disk leaves the previous cache (or nothing) and no temporary files."""
    from tqdm.auto import tqdm

    from .files import atomic_directory, sha256_of, write_json_atomic

    out = Path(out_dir)
    started = time.perf_counter()
    with atomic_directory(out, f"the teacher cache {out}", "no cache was written") as tmp:
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
        write_json_atomic(tmp / "manifest.json", manifest, indent=1)
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
        manifest = cls.read_manifest(path)
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
            try:
                with safe_open(file, framework="pt") as f:
                    tensors[shard["file"]] = {name: f.get_tensor(name) for name in ("ids", "logprobs", "tail")}
            except (SafetensorError, OSError, KeyError) as exc:
                raise CtxDistillError(f"teacher cache {path}: {shard['file']} is damaged ({type(exc).__name__}); rebuild it with "
                                      f"`ctxdistill cache-teacher --overwrite`") from None
            if len(tensors[shard["file"]]["ids"]) != shard["positions"]:
                raise CtxDistillError(f"teacher cache {path}: {shard['file']} holds the wrong number of positions; rebuild it")
        return cls(path, manifest, tensors)

    @staticmethod
    def read_manifest(path: Path) -> dict:
        """The cache's manifest, checked for shape; a missing, truncated or foreign one is one clear error."""
        manifest_path = Path(path) / "manifest.json"
        rebuild = "rebuild the cache with `ctxdistill cache-teacher --overwrite`"
        if not manifest_path.is_file():
            raise CtxDistillError(f"{path} is not a teacher cache (no manifest.json); build one with `ctxdistill cache-teacher`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CtxDistillError(f"{manifest_path} is corrupt (not valid JSON); {rebuild}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise CtxDistillError(f"teacher cache {path} has format {found}, expected {CACHE_FORMAT}; {rebuild}")
        try:
            CacheKey(**manifest["key"])
            for shard in manifest["shards"]:
                for name in ("file", "bytes", "positions", "documents"):
                    shard[name]
        except (KeyError, TypeError):
            raise CtxDistillError(f"{manifest_path} is incomplete (missing key or shard fields); {rebuild}") from None
        return manifest

    def lookup(self, doc_id: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if doc_id not in self._where:
            raise CtxDistillError(f"teacher cache {self.path} has no entry for document {doc_id}; rebuild it for this corpus")
        file, offset, count = self._where[doc_id]
        if int(positions.max()) >= count:
            raise CtxDistillError(f"teacher cache {self.path}: document {doc_id} is shorter in the cache than in training; rebuild it")
        rows = positions.cpu() + offset
        shard = self._tensors[file]
        return shard["logprobs"][rows], shard["ids"][rows]
