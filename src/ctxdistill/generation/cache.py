"""The generation cache: generated texts on disk, keyed by model, prompt and sampling settings.

Reused across runs (and shared by the processes of a study, which generate each text once: the first
takes an exclusive lock on the cache file while it generates, the others wait and read). With sampling,
an output depends on the random stream of the batch it was drawn in; the cache returns whatever was
generated first under the same (model, prompt, settings, seed).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..runtime import cache_root


def model_fingerprint(name: str) -> str:
    """Identity of a model for cache keys: the name, plus size and mtime of local weight files."""
    from ..models import EMBEDDED_MODELS

    if name in EMBEDDED_MODELS:
        return f"embedded:{name}"
    path = Path(name).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return f"path:{path.resolve()}:{stamp}"
    return f"hub:{name}"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


class GenerationCache:
    """Outputs on disk under `root/<key of model + settings>.jsonl`, one line per prompt.

    A line is {"key": digest(prompt), "value": ...}; appends are flushed after every batch, so an
    interrupted run keeps what it generated. Disabled when `root` is None.

    Used as a context manager, it holds an exclusive lock on the file (`<file>.lock`) and re-reads it
    once the lock is held: processes that need the same generations (e.g. the shards of one study)
    then generate them once, and the others wait and read them from the cache.
    """

    def __init__(self, root: Path | None, model: str, settings: dict):
        self.path = None
        self.entries: dict[str, object] = {}
        self._lock_file = None
        if root is None:
            return
        self.path = Path(root) / f"{digest({'model': model_fingerprint(model), 'settings': settings})[:24]}.jsonl"
        self._read()

    def _read(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                self.entries[record["key"]] = record["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from an interrupted write

    def __enter__(self) -> "GenerationCache":
        if self.path is not None:
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path.with_suffix(".lock"), "w")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)  # released by __exit__ or when the process dies
            self._read()  # what another process generated while this one waited
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    @staticmethod
    def key(prompt) -> str:
        return digest(prompt)

    def get(self, prompt):
        return self.entries.get(self.key(prompt))

    def put_many(self, items: list[tuple[object, object]]) -> None:
        for prompt, value in items:
            self.entries[self.key(prompt)] = value
        if self.path is None or not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for prompt, value in items:
                f.write(json.dumps({"key": self.key(prompt), "value": value}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def cache_dir(enabled: bool) -> Path | None:
    return cache_root() / "generations" if enabled else None
