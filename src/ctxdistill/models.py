"""Load causal LMs by alias, local directory, HF id or GGUF file; wrap students in LoRA; LM-head helpers.

Aliases and GGUF files become cached model directories first (model_sources.py: the embedded
SmolLM2, aliases fetched with `ctxdistill fetch-model`, any FILE.gguf dequantized once, keyed by hash).

Weights load from safetensors only (`use_safetensors=True`): nothing is unpickled unless the caller
passes `allow_pickle_weights=True` for a model saved only as `pytorch_model.bin`. A damaged weight
file, a pickle-only model or an unknown LoRA target is one CtxDistillError naming the fix.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .errors import CtxDistillError
from .files import sha256_of  # noqa: F401  (also imported from here by evaluate/data.py)
from .model_sources import DEFAULT_MODEL, EMBEDDED_MODELS, gguf_model_dir, resolve_alias  # noqa: F401  (DEFAULT_MODEL, EMBEDDED_MODELS re-exported)


def resolve_model(name: str) -> str:
    """The directory (or HF id) to load for an alias, local dir, .gguf file or HF id.

    Aliases and GGUF files resolve to their dequantized directory in the cache (model_sources.py)."""
    aliased = resolve_alias(name)
    if aliased is not None:
        return str(aliased)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise CtxDistillError(f"GGUF file {name} does not exist; pass an existing .gguf path")
        return str(gguf_model_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise CtxDistillError(f"{name} is not a model directory (no config.json); pass a save_pretrained directory")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CtxDistillError(f"model path {name} does not exist; pass an existing directory, a .gguf file or an HF id")
    return name


def _hub_error(name: str, exc: Exception) -> CtxDistillError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = " (HF_HUB_OFFLINE is set)" if offline else ""
    return CtxDistillError(
        f"cannot load model {name!r}{hint}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
        f"pass a local directory, a .gguf file, or an HF id that is in the local cache"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _pickle_refusal(name: str, found: str) -> CtxDistillError:
    return CtxDistillError(
        f"{name} holds its weights only as {found}, a pickle, and ctxdistill loads safetensors only; convert it once "
        f"(AutoModelForCausalLM.from_pretrained(PATH, use_safetensors=False).save_pretrained(NEW_PATH) in a Python you trust) "
        f"or, if you trust the file, pass --allow-pickle-weights"
    )


def check_weight_files(name: str, source: str, allow_pickle_weights: bool = False) -> None:
    """Refuse a local model directory whose only weights are pickles, unless they are allowed."""
    path = Path(source)
    if not path.is_dir() or any((path / f).is_file() for f in SAFE_WEIGHTS):
        return
    pickled = [f for f in PICKLE_WEIGHTS if (path / f).is_file()]
    if pickled and not allow_pickle_weights:
        raise _pickle_refusal(name, pickled[0])


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, allow_pickle_weights: bool = False):
    """A causal LM in `dtype`, eval mode, from safetensors (pickles only when allowed). GGUF inputs are dequantized once."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source = resolve_model(name)
    try:
        check_weight_files(name, source, allow_pickle_weights)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if allow_pickle_weights else True)
    except SafetensorError as exc:
        raise CtxDistillError(f"the weights of {name} are damaged ({str(exc).splitlines()[0][:120]}): a .safetensors file was "
                              f"probably cut short by an interrupted copy, download or save; copy, download or save it again") from None
    except pickle.UnpicklingError as exc:  # only reachable with allow_pickle_weights (torch.load, weights_only)
        raise CtxDistillError(f"cannot load the pickled weights of {name} ({str(exc).splitlines()[0][:120]}); "
                              f"convert the model to safetensors with the tool that made it") from None
    except (OSError, ValueError) as exc:
        error = _hub_error(name, exc)
        if not allow_pickle_weights and "safetensors" in str(exc):
            error = CtxDistillError(f"{error}; if it has only pytorch_model.bin (a pickle), convert it to safetensors, "
                                    f"or pass --allow-pickle-weights if you trust it")
        raise error from exc
    return model.eval()


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.1, target_modules: str | list[str] = "all-linear"):
    """Wrap a model in a PEFT LoRA adapter; only the adapter weights train. Unknown target names are refused."""
    from peft import LoraConfig, get_peft_model

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})

    def refuse(what: str) -> CtxDistillError:
        return CtxDistillError(f"LoRA target module(s) {what} not in the model; its linear modules are: {', '.join(linear)}; "
                               f"set --lora-targets to a comma-separated subset of them, or all-linear")

    if not isinstance(target_modules, str):  # names; a string is all-linear or a regular expression
        names = [n for n, _ in model.named_modules() if n]
        unknown = [t for t in target_modules if not t or not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            raise refuse(", ".join(repr(t) for t in unknown))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        if "not found" not in str(exc):
            raise
        raise refuse(repr(target_modules)) from None


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


def choose_attention(model, device) -> str:
    """The attention that packed passes run with, set on `model` and returned (run.json reports it).

    flash-attention 2 on CUDA where the `flash_attn` package is installed (its varlen kernel reads the segment
    boundaries from the position ids as `cu_seqlens`); otherwise the model's own implementation, normally SDPA,
    for which transformers builds a block-diagonal causal mask from the position ids (eager gets the same mask).
    """
    import importlib.util

    current = getattr(model.config, "_attn_implementation", None) or "eager"
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None and current != "flash_attention_2":
        try:
            model.set_attn_implementation("flash_attention_2")
            return "flash_attention_2"
        except (ValueError, ImportError, AttributeError):  # the model or the installed kernel does not support it
            return current
    return current
