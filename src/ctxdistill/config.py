"""Typed configuration: one dataclass per command, loadable from YAML, overridable from the CLI.

Every field carries its help text, so `ctxdistill train --help` and the YAML schema cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import CtxDistillError
from .segment import SPLIT_STRATEGIES


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with CLI help (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


METHOD_NAMES = ("disc", "ft", "ft_kl", "lora", "rephrase", "talr", "replay", "cd_base", "icl_distill", "mixsd")
REPLAY_BASE_METHODS = ("ft", "ft_kl", "lora", "rephrase", "talr", "disc")
DEFAULT_REPHRASE_PROMPT = "Below is a article. Rewrite it in your own words  \n\n{document}\n\nContinuation:"
DEFAULT_CD_PROMPT = "Below is a article.\n\n{document}\n\nContinuation:"
DEFAULT_MIXSD_EXPERT_PROMPT = ("{question}\nThis question is from a new knowledge base. Here is the answer to this question:\n"
                               "{context}\nNow answer the question.")


@dataclass
class TrainConfig:
    # what to train
    method: str = opt("disc", "training method", METHOD_NAMES)
    model: str = opt("smollm2-135m-instruct", "alias, local model directory, .gguf file or HF id")
    corpus: str = opt("bundled:news_updates", "JSONL / .txt / directory / any local file datasets can read; bundled:NAME for package data")
    out: str = opt("runs/train", "output directory (model/, run.json, losses.jsonl)")
    text_field: str = opt("text", "JSONL/dataset field holding the document text")
    id_field: str = opt("id", "JSONL/dataset field holding the document id (row number when absent)")
    min_chars: int = opt(20, "documents shorter than this many characters are skipped and reported")
    # optimisation (the DiSC authors' defaults)
    lr: float = opt(3e-6, "AdamW learning rate (constant, no warm-up)")
    epochs: int = opt(1, "passes over the corpus")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = no limit)")
    docs_per_step: int = opt(1, "documents averaged into one optimizer step")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(0.0, "clip the gradient norm to this value (0 = no clipping, as the authors)")
    seed: int = opt(1234, "seed for data order, split points, dropout")
    # DiSC
    temperature: float = opt(2.0, "distillation temperature T (loss is scaled by T^2)")
    split_strategy: str = opt("sentence_boundary", "how documents are split into prefix/suffix pairs", SPLIT_STRATEGIES)
    num_splits: int = opt(5, "split points per document (k) for sentence_boundary and token strategies")
    suffix_tokens: int = opt(0, "suffix length for token_random_variable_suffix (0 = to the document end)")
    min_suffix_tokens: int = opt(2, "suffixes shorter than this are dropped")
    teacher_mode: str = opt("single_pass", "single_pass: one teacher forward per document; per_split: the authors' reference (one per split point)", ("single_pass", "per_split"))
    batch_tokens: int = opt(4096, "with docs_per_step > 1, pack up to this many tokens of several documents into one DiSC forward pass (0 = one document per pass); the loss is unchanged")
    kl_chunk_size: int = opt(1024, "compute LM head + KL in chunks of this many positions (0 = dense); identical gradient, memory flat in document length")
    teacher_cache: str = opt("", "read the teacher's top-k distributions from this cache (built by `ctxdistill cache-teacher`) instead of running a teacher")
    max_length: int = opt(2048, "longest sequence the model sees; longer documents are cut at sentence boundaries into windows")
    disc_positions: str = opt("all", "DiSC positions distilled: all (the paper); context = ctxdistill variant, not in the paper: only the suffix positions where the prefix changes the teacher's prediction by more than context_kl_threshold (needs a live teacher)", ("all", "context"))
    context_kl_threshold: float = opt(0.05, "disc_positions context (ctxdistill variant): keep a position when KL(teacher with prefix || teacher on the suffix alone) at the distillation temperature, in nats, exceeds this; a negative value keeps every position")
    # precision and devices
    precision: str = opt("bf16", "bf16: fp32 master weights with bf16 autocast; fp32: no autocast", ("bf16", "fp32"))
    teacher_model: str = opt("", "the frozen teacher/reference when it is not the model being trained (same tokenizer), e.g. the "
                                 "original model in later rounds of continual updates; empty = the initial model")
    teacher_dtype: str = opt("bf16", "dtype of the frozen teacher copy (full fine-tuning only)", ("bf16", "fp32"))
    gradient_checkpointing: bool = opt(False, "recompute layer activations in the backward pass: less memory, ~30% more compute")
    compile: bool = opt(False, "torch.compile the student (dynamic shapes); measure before relying on it, see docs/performance.md")
    cudnn_attention: bool = opt(False, "on CUDA, allow cuDNN's attention kernel; off by default because it plans anew for every unseen "
                                       "sequence length (~140 ms on an H100), which documents of varying length hit almost every step")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    # student
    student: str = opt("auto", "full fine-tuning or a LoRA adapter (the teacher is then the adapter-disabled model); auto: the method's default (lora for lora and icl_distill, full otherwise)", ("auto", "full", "lora"))
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.1, "LoRA dropout")
    lora_targets: str = opt("all-linear", "LoRA target modules: all-linear or a comma-separated list of module names")
    merge_lora: bool = opt(False, "also write OUT/merged: the LoRA adapter merged into a plain model")
    # FT variants: ft_kl, talr (DiSC paper baselines)
    kl_beta: float = opt(0.1, "ft_kl: weight of KL(initial model || student) added to the CE")
    kl_temperature: float = opt(1.0, "ft_kl and replay KL: softmax temperature of that KL (scaled by T^2)")
    talr_tau: float = opt(0.0, "talr: fixed temperature tau of the weights p^(1/tau); 0 = the batch median of per-sequence mean NLL, recomputed every step")
    talr_floor: float = opt(0.01, "talr: lower clamp of the token weights")
    # text generation (rephrase, cd_base, mixsd)
    gen_batch_size: int = opt(8, "prompts generated together (left-padded, KV cache)")
    gen_top_p: float = opt(0.95, "nucleus sampling for rephrase and cd_base generations (1 = off)")
    gen_cache: bool = opt(True, "reuse generations cached on disk under $CTXDISTILL_CACHE/generations, keyed by model, prompt and sampling settings")
    # rephrase (FT on self-paraphrases)
    rephrase_prompt: str = opt(DEFAULT_REPHRASE_PROMPT, "rephrase: user message; {document} is replaced by the document (the authors' KUP prompt, verbatim)")
    rephrase_system: str = opt("You are a helpful writing assistant.", "rephrase and cd_base document mode: system message ('' = none)")
    rephrase_temperature: float = opt(1.0, "rephrase: sampling temperature (0 = greedy)")
    rephrase_max_new_tokens: int = opt(2048, "rephrase: longest paraphrase in tokens")
    # replay
    replay_method: str = opt("ft", "replay: the method applied to the documents", REPLAY_BASE_METHODS)
    replay_source: str = opt("bundled:gsm8k_train", "replay: JSONL of {prompt, response} pairs mixed into the stream; records without a response get the initial model's greedy reply (ctxdistill variant, e.g. bundled:chat_retention)")
    replay_n: int = opt(100, "replay: number of replay examples drawn (seeded) from replay_source")
    replay_kl_weight: float = opt(0.0, "replay: if > 0, replay items get replay_ce_weight x CE + this weight x KL(initial model || student)")
    replay_ce_weight: float = opt(1.0, "replay: weight of the CE on replay items (1 = the paper); ctxdistill variant, not in the paper: 0 with replay_kl_weight > 0 makes replay items a pure KL retention term")
    replay_max_new_tokens: int = opt(96, "replay (ctxdistill variant): longest greedy reply generated by the initial model for replay records without a `response`")
    replay_format: str = opt("plain", "replay: plain = f'{prompt}\\n{response}', CE on all tokens (the authors'); chat = chat template, CE on the response", ("plain", "chat"))
    # cd_base
    cd_mode: str = opt("document", "cd_base: document (the DiSC paper's CD-base) or entity (arXiv 2306.09306: {entity, definition} records)", ("document", "entity"))
    cd_temperature: float = opt(1.0, "cd_base document mode: distillation temperature (the authors' help says 1.0, their code passed 2.0: set it explicitly)")
    cd_prompt: str = opt(DEFAULT_CD_PROMPT, "cd_base document mode: user message for the continuation; {document} is replaced by the document")
    cd_sample_temperature: float = opt(1.0, "cd_base document mode: sampling temperature of the continuation")
    cd_max_new_tokens: int = opt(1000, "cd_base document mode: longest continuation (the KL is truncated to 1000 tokens)")
    cd_chunk: int = opt(64, "cd_base document mode: KL chunk length in positions")
    cd_reduction: str = opt("chunk_sum", "cd_base document mode: chunk_sum = the authors' code (sum of KL within each chunk, mean over chunks); mean = mean over positions", ("chunk_sum", "mean"))
    entity_sentences: int = opt(5, "cd_base entity mode: transfer sentences per entity")
    entity_steps: int = opt(5, "cd_base entity mode: optimizer steps per transfer sentence")
    entity_temperature: float = opt(2.0, "cd_base entity mode: distillation temperature")
    entity_after_span: bool = opt(False, "cd_base entity mode: KL only on tokens after the entity mention (the paper's option; the released configs use the whole sentence)")
    entity_reset_optimizer: bool = opt(True, "cd_base entity mode: fresh AdamW state for each transfer sentence, as in the authors' code")
    entity_sample_temperature: float = opt(0.9, "cd_base entity mode: sampling temperature of the transfer sentences")
    entity_top_k: int = opt(50, "cd_base entity mode: top-k of the transfer-sentence sampling")
    entity_max_new_tokens: int = opt(40, "cd_base entity mode: transfer-sentence length in tokens")
    entity_rounds: int = opt(4, "cd_base entity mode: sampling rounds to find continuations that mention the entity")
    entity_seed_mention: bool = opt(False, "cd_base entity mode: start every sampled continuation with the entity name, so each one mentions it (raises the yield of small models; not in the paper)")
    # icl_distill
    icl_k: int = opt(4, "icl_distill: demonstrations in the teacher's context")
    icl_temperature: float = opt(1.0, "icl_distill: distillation temperature")
    icl_ce_weight: float = opt(0.0, "icl_distill: weight of CE on the gold answer added to the KL")
    icl_format: str = opt("chat", "icl_distill: chat = demonstrations as chat turns; plain = 'prompt\\nanswer' blocks", ("chat", "plain"))
    # mixsd
    mixsd_lambda: float = opt(0.3, "mixsd: probability that a target token comes from the naive conditional (0 = pure expert, 1 = pure naive)")
    mixsd_retries: int = opt(10, "mixsd: regenerations of a target whose answer does not match")
    mixsd_temperature: float = opt(0.0, "mixsd: 0 = greedy; > 0 samples from the top-k softmax(logits / T)")
    mixsd_top_k: int = opt(64, "mixsd: top-k when sampling")
    mixsd_max_new_tokens: int = opt(128, "mixsd: longest target in tokens")
    mixsd_expert_prompt: str = opt(DEFAULT_MIXSD_EXPERT_PROMPT, "mixsd: expert user message with {question} and {context} (the record's fact, else its answer)")
    # bookkeeping
    save_model: bool = opt(True, "write OUT/model at the end")
    overwrite: bool = opt(False, "replace an existing non-empty output directory")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code (off by default)")
    log_every: int = opt(1, "write a losses.jsonl line every N optimizer steps")
    # distributed training, crash safety (see docs/distributed.md)
    loss_normalization: str = opt("document", "a step's loss is the mean over its global batch (docs_per_step items, across accumulation and processes) of: document = each item's loss; token = each item's loss weighted by its distilled tokens", ("document", "token"))
    checkpoint_every: int = opt(250, "write OUT/checkpoints/step-N every N optimizer steps (0 = only on SIGTERM/SIGINT)")
    keep_checkpoints: int = opt(2, "keep the last K checkpoints")
    resume: bool | None = opt(None, "continue from the latest checkpoint in --out (default: automatically when --out holds one; --no-resume refuses such a directory unless --overwrite)")
    on_nonfinite: str = opt("stop", "a non-finite loss or gradient: stop (naming step and document; the last good state is checkpointed) or skip the step (counted in run.json)", ("stop", "skip"))

    def validate(self) -> "TrainConfig":
        check_choices(self)
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CtxDistillError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("epochs", "docs_per_step", "num_splits", "min_suffix_tokens", "max_length", "log_every", "lora_r"):
            if getattr(self, name) < 1:
                raise CtxDistillError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.keep_checkpoints < 1:
            raise CtxDistillError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints!r}")
        for name in ("max_steps", "grad_clip", "weight_decay", "suffix_tokens", "min_chars", "checkpoint_every", "batch_tokens", "kl_chunk_size"):
            if not getattr(self, name) >= 0:
                raise CtxDistillError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("gen_batch_size", "rephrase_max_new_tokens", "cd_max_new_tokens", "cd_chunk", "entity_sentences", "entity_steps",
                     "entity_max_new_tokens", "entity_rounds", "icl_k", "mixsd_max_new_tokens", "replay_max_new_tokens"):
            if getattr(self, name) < 1:
                raise CtxDistillError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("kl_temperature", "cd_temperature", "entity_temperature", "icl_temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise CtxDistillError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("kl_beta", "talr_tau", "talr_floor", "replay_n", "replay_kl_weight", "replay_ce_weight", "rephrase_temperature", "cd_sample_temperature",
                     "entity_sample_temperature", "entity_top_k", "icl_ce_weight", "mixsd_retries", "mixsd_temperature", "mixsd_top_k"):
            if not getattr(self, name) >= 0:
                raise CtxDistillError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (0 < self.gen_top_p <= 1):
            raise CtxDistillError(f"gen_top_p must be in (0, 1], got {self.gen_top_p!r}")
        if not (0 <= self.mixsd_lambda <= 1):
            raise CtxDistillError(f"mixsd_lambda must be in [0, 1], got {self.mixsd_lambda!r}")
        for name, keys in (("rephrase_prompt", ("{document}",)), ("cd_prompt", ("{document}",)), ("mixsd_expert_prompt", ("{question}", "{context}"))):
            missing = [k for k in keys if k not in getattr(self, name)]
            if missing:
                raise CtxDistillError(f"{name} must contain {' and '.join(missing)}")
        if self.teacher_cache and self.method != "disc":
            raise CtxDistillError(f"teacher_cache holds DiSC teacher distributions; it cannot serve method {self.method!r} (drop --teacher-cache)")
        if self.method == "replay" and self.replay_ce_weight == 0 and self.replay_kl_weight == 0:
            raise CtxDistillError("replay_ce_weight and replay_kl_weight are both 0: replay items would carry no loss")
        if not math.isfinite(self.context_kl_threshold):
            raise CtxDistillError(f"context_kl_threshold must be a finite number, got {self.context_kl_threshold!r}")
        if self.disc_positions == "context":
            if not (self.method == "disc" or (self.method == "replay" and self.replay_method == "disc")):
                raise CtxDistillError(f"disc_positions context is a DiSC variant; method {self.method!r} does not use it (drop --disc-positions)")
            if self.teacher_cache:
                raise CtxDistillError("disc_positions context needs a live teacher (it runs the teacher on the suffix alone); drop --teacher-cache")
            if self.teacher_mode == "per_split":
                raise CtxDistillError("disc_positions context is implemented for teacher_mode single_pass only; drop --teacher-mode per_split")
        if not (0 <= self.lora_dropout < 1):
            raise CtxDistillError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        return self


def check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise CtxDistillError(f"unknown {f.name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def field_type(cls, f: dataclasses.Field) -> type:
    """The plain Python type of a field (str, int, float, bool)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def coerce(cls, name: str, value):
    """Check a YAML value's type against the field; ints are accepted where floats are expected."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise CtxDistillError(f"unknown option {name!r}; valid options: {', '.join(sorted(fields))}")
    kind = field_type(cls, fields[name])
    if value is None and fields[name].default is None:  # optional settings (resume) accept null
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 3e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CtxDistillError(f"option {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CtxDistillError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise CtxDistillError(f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CtxDistillError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls, yaml_path: str | None = None, overrides: dict | None = None):
    """YAML values first, then explicit overrides; every value type-checked, then validated."""
    values = {}
    if yaml_path:
        values.update({k: coerce(cls, k, v) for k, v in load_yaml(yaml_path).items()})
    for k, v in (overrides or {}).items():
        values[k] = coerce(cls, k, v)
    cfg = cls(**values)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
