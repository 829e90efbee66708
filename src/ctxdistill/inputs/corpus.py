"""Read documents from JSONL, .txt files, directories or anything `datasets` reads from local files.

Structural problems (missing file, a line that is not JSON, a missing text field) are errors that
name the file and line. Content problems (empty, duplicate, non-UTF-8, shorter than `min_chars`)
skip the document and are reported with a count and the first offenders; if nothing is left, that
is an error too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import CtxDistillError
from .hub import is_dataset_spec, read_dataset

DATASETS_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".tsv": "csv", ".arrow": "arrow"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class CorpusReport:
    """What was read and what was skipped, by reason, with the first few offenders per reason."""

    read: int = 0
    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason].append(where)

    def summary(self, show: int = 3) -> list[str]:
        lines = []
        for reason, where in self.skipped.items():
            more = f" (+{len(where) - show} more)" if len(where) > show else ""
            lines.append(f"skipped {len(where)} {reason} document(s): {', '.join(where[:show])}{more}")
        return lines

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": {k: len(v) for k, v in self.skipped.items()},
                "first_skipped": {k: v[:5] for k, v in self.skipped.items()}}


def bundled_path(name: str) -> Path:
    """Path of a bundled data file, e.g. `news_updates` -> data/news_updates.jsonl."""
    path = Path(str(resources.files("ctxdistill") / "data" / f"{name}.jsonl"))
    if not path.is_file():
        available = sorted(p.stem for p in Path(str(resources.files("ctxdistill") / "data")).glob("*.jsonl"))
        raise CtxDistillError(f"no bundled data named {name!r}; available: {', '.join(available)}")
    return path


MAX_LINE_BYTES = 64 * 2**20  # one JSONL line or one .txt document; far above any real document


def resolve_path(spec: str) -> Path:
    if spec.startswith("bundled:"):
        return bundled_path(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if not path.exists():
        raise CtxDistillError(f"corpus {spec} does not exist; pass a JSONL file, a .txt file, a directory of .txt files, or bundled:news_updates")
    if not (path.is_file() or path.is_dir()):  # a device (/dev/zero), FIFO or socket would be read without end
        raise CtxDistillError(f"{spec} is not a regular file or a directory; pass a JSONL or .txt file, or a directory of them")
    return path


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as exc:
        raise CtxDistillError(f"cannot read {path}: {exc.strerror}") from None


def _too_long(where: str) -> CtxDistillError:
    return CtxDistillError(f"{where}: longer than {MAX_LINE_BYTES // 2**20} MiB; split it into smaller documents")


def _has_lone_surrogate(record) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a "\ud800" escape: text no tokenizer or file can encode
        return True
    return False


def read_jsonl(path: Path) -> list[tuple[str, dict | None]]:
    """(location, record) per non-blank line; a record is None when the line is not valid UTF-8 (or holds a lone surrogate)."""
    rows = []
    with _open(path) as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path.name}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise _too_long(f"{path}:{number}")
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                rows.append((where, None))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CtxDistillError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            except RecursionError:
                raise CtxDistillError(f"{path}:{number}: JSON nested too deeply to read; each line must be one flat JSON object") from None
            if not isinstance(record, dict):
                raise CtxDistillError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            rows.append((where, None if _has_lone_surrogate(record) else record))
    return rows


def read_text(path: Path) -> bytes:
    """A whole .txt document, refused beyond MAX_LINE_BYTES."""
    with _open(path) as f:
        data = f.read(MAX_LINE_BYTES + 1)
    if len(data) > MAX_LINE_BYTES:
        raise _too_long(str(path))
    return data


def load_records(spec: str) -> list[tuple[str, dict | None]]:
    """Raw records of any supported corpus format, with a location string for error messages."""
    if is_dataset_spec(spec):  # hf:OWNER/NAME[:CONFIG][@SPLIT] and save_to_disk directories, streamed (inputs/hub.py)
        return read_dataset(spec)
    path = resolve_path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise CtxDistillError(f"directory {path} holds no .txt or .jsonl files")
        rows = []
        for p in files:
            rows.extend(load_records(str(p)))
        return rows
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix in (".txt", ".md", ""):
        try:
            return [(path.name, {"id": path.stem, "text": read_text(path).decode("utf-8")})]
        except UnicodeDecodeError:
            return [(path.name, None)]
    if path.suffix in DATASETS_SUFFIXES:
        import datasets

        try:
            table = datasets.load_dataset(DATASETS_SUFFIXES[path.suffix], data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types; the message is what matters
            raise CtxDistillError(f"cannot read {path} with datasets: {str(exc).splitlines()[0][:200]}") from None
        return [(f"{path.name}:{i + 1}", dict(row)) for i, row in enumerate(table)]
    raise CtxDistillError(f"unsupported corpus file type {path.suffix!r}; use .jsonl, .txt, .csv, .json or .parquet")


def load_corpus(spec: str, text_field: str = "text", id_field: str = "id", min_chars: int = 20) -> tuple[list[Document], CorpusReport]:
    report = CorpusReport()
    documents: list[Document] = []
    seen: set[str] = set()
    for where, record in load_records(spec):
        report.read += 1
        if record is None:
            report.skip("non-UTF-8", where)
            continue
        if text_field not in record:
            raise CtxDistillError(f"{where}: no field {text_field!r} (fields: {', '.join(record)}); set text_field to the field that holds the text")
        text = record[text_field]
        if not isinstance(text, str):
            raise CtxDistillError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        text = text.strip()
        if not text:
            report.skip("empty", where)
        elif len(text) < min_chars:
            report.skip(f"too-short (<{min_chars} chars)", where)
        elif text in seen:
            report.skip("duplicate", where)
        else:
            seen.add(text)
            documents.append(Document(str(record.get(id_field, where)), text))
    report.kept = len(documents)
    if not documents:
        detail = "; ".join(report.summary()) or "the corpus is empty"
        raise CtxDistillError(f"no usable documents in {spec}: {detail}")
    return documents, report
