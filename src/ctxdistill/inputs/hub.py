"""Corpora from the Hugging Face Hub (`hf:OWNER/NAME[:CONFIG][@SPLIT]`) and `save_to_disk` directories.

- `hf:OWNER/NAME[:CONFIG][@SPLIT]` goes through `datasets.load_dataset(OWNER/NAME, CONFIG, split=SPLIT)`
  (split `train` by default): downloaded once into the datasets cache, then read from it, also offline
  (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); a dataset that is not cached while offline is one error line
  naming the cache directories.
- A directory written by `Dataset.save_to_disk` (recognised by its `dataset_info.json` + `state.json`)
  or `DatasetDict.save_to_disk` (`dataset_dict.json`; its `train` split, or its only split) is read
  with `datasets.load_from_disk`.

Both are memory-mapped Arrow tables, iterated in batches of `BATCH` rows: a corpus larger than memory
is streamed through, row by row, into the document reader (`inputs/corpus.py`, where `--text-field`,
`--id-field` and the skip rules apply), never loaded whole as Python objects first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ..errors import CtxDistillError

PREFIX = "hf:"
BATCH = 1000


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (((path / "dataset_info.json").is_file() and (path / "state.json").is_file())
                              or (path / "dataset_dict.json").is_file())


def is_dataset_spec(spec: str) -> bool:
    """An `hf:` corpus or a save_to_disk directory (read here rather than by the file readers)."""
    return spec.startswith(PREFIX) or is_saved_dataset(Path(spec).expanduser())


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:OWNER/NAME[:CONFIG][@SPLIT]` -> (repository, config or None, split)."""
    body, at, split = spec[len(PREFIX):].partition("@")
    repo, colon, config = body.partition(":")
    if not repo or repo.count("/") > 1 or not all(repo.split("/")) or (colon and not config) or (at and not split):
        raise CtxDistillError(f"corpus {spec!r}: write a Hub dataset as hf:OWNER/NAME, hf:OWNER/NAME:CONFIG or hf:OWNER/NAME:CONFIG@SPLIT")
    return repo, config or None, split or "train"


def offline() -> bool:
    return any(os.environ.get(name, "") not in ("", "0", "false", "False") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hub(spec: str):
    import datasets

    repo, config, split = parse_hub_spec(spec)
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # datasets raises many types; the first line says what happened
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if offline() or "offline" in first.lower():
            from huggingface_hub import constants

            raise CtxDistillError(f"corpus {spec}: offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and {repo} is not in the datasets "
                                  f"cache ({datasets.config.HF_DATASETS_CACHE}) nor the Hub cache ({constants.HF_HUB_CACHE}); load it "
                                  f"once online, or pass a save_to_disk directory") from None
        raise CtxDistillError(f"corpus {spec}: datasets.load_dataset({repo!r}, {config!r}, split={split!r}) failed: {first}") from None


def load_saved(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise CtxDistillError(f"corpus {path}: not a readable save_to_disk dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise CtxDistillError(f"corpus {path}: a DatasetDict with splits {', '.join(splits)} and no 'train'; save the split to train on")
        loaded = loaded["train"] if "train" in loaded else loaded[splits[0]]
    return loaded


def read_dataset(spec: str) -> Iterator[tuple[str, dict]]:
    """(location, row) for every row, in order; locations are `NAME:ROW` (1-based)."""
    table = load_hub(spec) if spec.startswith(PREFIX) else load_saved(Path(spec).expanduser())
    name = spec if spec.startswith(PREFIX) else Path(spec).name
    row = 0
    for batch in table.iter(batch_size=BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            yield f"{name}:{row}", dict(zip(columns, values))
