"""`TrainConfig`: the options every method shares, and one typed section per method.

Each method owns a small dataclass of its own options with its own validation (`DiscConfig` in
methods/disc.py, `ReplayConfig` in methods/replay.py, ...), the pattern of TRL's per-trainer configs
and litgpt's nested arguments. `TrainConfig` holds the shared options and one section per method,
named after it (`cfg.disc.temperature`).

Option names are unique across the whole config, so the command line and YAML stay flat:
`--temperature 2` and `temperature: 2` set `cfg.disc.temperature`; YAML may also nest a section
(`disc: {temperature: 2}`). `cfg.flat()` is the flat view written to run.json and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import CtxDistillError
from .kernels import KERNELS, check_kernels
from .methods import REGISTRY
from .methods.cd_base import CdBaseConfig
from .methods.disc import DiscConfig
from .methods.ft_kl import FtKlConfig
from .methods.icl_distill import IclDistillConfig
from .methods.mixsd import MixSDConfig
from .methods.rephrase import RephraseConfig
from .methods.replay import ReplayConfig
from .methods.sdft import SdftConfig
from .methods.talr import TalrConfig
from .options import check_choices, coerce, opt, positive_finite, require

METHOD_NAMES = tuple(REGISTRY)


def section(cls):
    return field(default_factory=cls, metadata={"help": cls.__doc__, "choices": None, "section": True})


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
    max_length: int = opt(2048, "longest sequence the model sees; longer documents are cut at sentence boundaries into windows")
    # optimisation (the DiSC authors' defaults)
    lr: float = opt(3e-6, "AdamW learning rate (the peak of --lr-scheduler; constant by default, as the authors)")
    lr_scheduler: str = opt("constant", "learning-rate schedule (transformers' get_scheduler); constant is the authors'",
                            ("constant", "linear", "cosine", "constant_with_warmup"))
    warmup_steps: int = opt(0, "linear warm-up over this many optimizer steps (linear, cosine, constant_with_warmup)")
    warmup_ratio: float = opt(0.0, "warm-up as a fraction of the run's optimizer steps, rounded up; used when --warmup-steps is 0")
    epochs: int = opt(1, "passes over the corpus")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = no limit)")
    docs_per_step: int = opt(1, "documents averaged into one optimizer step")
    batch_tokens: int = opt(4096, "with docs_per_step > 1, pack up to this many tokens of several items into one forward pass of a "
                                  "method with a batched loss (DiSC, FT, FT+KL); 0 = one item per pass; the loss is unchanged")
    packing: str = opt("auto", "batched passes (DiSC, FT, FT+KL) as ONE padding-free packed sequence (per-sequence position ids, "
                               "attention that never crosses a sequence) or right-padded rows, equal losses either way; auto = packed "
                               "with flash-attention (varlen); with SDPA/eager only DiSC's passes of <= 2048 tokens on CUDA (masked "
                               "attention is quadratic in the packed length; on CPU padded, measured no faster packed)",
                       ("auto", "on", "off"))
    pad_to_multiple: int = opt(0, "round batched pass lengths up to a multiple of this, bounding the distinct shapes a run sees "
                                  "(0 = 64 on CUDA, 1 elsewhere)")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(0.0, "clip the gradient norm to this value (0 = no clipping, as the authors)")
    seed: int = opt(1234, "seed for data order, split points, dropout")
    kl_chunk_size: int = opt(1024, "compute LM head + KL / CE in chunks of this many positions, for every method with a plain LM head "
                                   "(0 = all positions in one chunk); the gradient is identical and memory stays flat in length")
    kernels: str = opt("torch", "LM head + loss kernels: torch = the chunked PyTorch path (the reference); liger = Liger's fused linear "
                                "CE / forward KL (CUDA only; pip install 'ctxdistill[liger]')", KERNELS)
    kl_temperature: float = opt(1.0, "ft_kl and replay: softmax temperature of KL(initial model || student) (scaled by T^2)")
    # precision and devices
    precision: str = opt("bf16", "bf16: fp32 master weights with bf16 autocast; fp32: no autocast", ("bf16", "fp32"))
    teacher_model: str = opt("", "the frozen teacher/reference when it is not the model being trained (same tokenizer), e.g. the "
                                 "original model in later rounds of continual updates; empty = the initial model")
    teacher_dtype: str = opt("bf16", "dtype of the frozen teacher copy (full fine-tuning only)", ("bf16", "fp32"))
    gradient_checkpointing: bool = opt(False, "recompute layer activations in the backward pass: less memory, ~30% more compute")
    compile: bool = opt(False, "torch.compile the student's decoder (dynamic shapes), the module both the chunked LM-head path and the "
                               "plain forward call; measure before relying on it, see docs/performance.md")
    threads: int = opt(0, "CPU threads for torch in this process (0 = torch's default); on a shared 2-core machine use 1 per process")
    cudnn_attention: bool = opt(False, "on CUDA, allow cuDNN's attention kernel; off by default because it plans anew for every unseen "
                                       "sequence length (~140 ms on an H100), which documents of varying length hit almost every step")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    # student
    student: str = opt("auto", "full fine-tuning or a LoRA adapter (the teacher is then the adapter-disabled model); auto: the method's "
                               "default (lora for lora and icl_distill, full otherwise)", ("auto", "full", "lora"))
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.1, "LoRA dropout")
    lora_targets: str = opt("all-linear", "LoRA target modules: all-linear or a comma-separated list of module names")
    merge_lora: bool = opt(False, "also write OUT/merged: the LoRA adapter merged into a plain model")
    # text generation before training (rephrase, cd_base, mixsd, replay without responses)
    gen_batch_size: int = opt(8, "prompts generated together (left-padded, KV cache)")
    gen_top_p: float = opt(0.95, "nucleus sampling for rephrase and cd_base generations (1 = off)")
    gen_cache: bool = opt(True, "reuse generations cached on disk under $CTXDISTILL_CACHE/generations, keyed by model, prompt and sampling settings")
    rephrase_system: str = opt("You are a helpful writing assistant.", "rephrase and cd_base document mode: system message ('' = none)")
    # bookkeeping
    save_model: bool = opt(True, "write OUT/model at the end")
    overwrite: bool = opt(False, "replace an existing non-empty output directory")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code (off by default)")
    allow_pickle_weights: bool = opt(False, "allow loading weights from pickle files (pytorch_model.bin); off by default: safetensors only")
    log_every: int = opt(1, "write a losses.jsonl line every N optimizer steps")
    # experiment tracking, evaluation during training, the model card (see docs/ecosystem.md)
    report_to: str = opt("none", "experiment trackers, comma-separated: tensorboard (OUT/tensorboard), wandb (OUT/wandb; offline with "
                                 "WANDB_MODE=offline or HF_HUB_OFFLINE=1), trackio, or none; each needs its extra: pip install 'ctxdistill[NAME]'")
    tracker_project: str = opt("ctxdistill", "wandb / trackio project name (the run is named after --out)")
    eval_every: int = opt(0, "every N optimizer steps, a fast check: chat drift KL(initial || student) on --eval-prompts held-out "
                             "prompts (and --eval-probes accuracy); logged to losses.jsonl and the trackers (0 = off)")
    eval_prompts: int = opt(8, "held-out chat prompts of the check: the first N of the 24 bundled ones (never trained on)")
    eval_max_new_tokens: int = opt(32, "length of the initial model's greedy replies the check scores")
    eval_probes: str = opt("", "knowledge probe JSONL scored by option log-likelihood in the check (empty = none)")
    eval_probe_limit: int = opt(32, "the first N multiple-choice probes of --eval-probes (0 = all)")
    stop_at_drift: float = opt(0.0, "a forgetting budget: end the run once the check's drift KL exceeds this many nats/token, and save "
                                    "the last checkpoint whose drift was under it as the model (needs --eval-every and --out; 0 = off)")
    push_to_hub: str = opt("", "upload OUT/model (with its model card) to this Hub repository at the end (respects HF_HUB_OFFLINE)")
    # distributed training, crash safety (see docs/distributed.md)
    loss_normalization: str = opt("document", "a step's loss is the mean over its global batch (docs_per_step items, across accumulation and "
                                              "processes) of: document = each item's loss; token = each item's loss weighted by its distilled "
                                              "tokens", ("document", "token"))
    checkpoint_every: int = opt(250, "write OUT/checkpoints/step-N every N optimizer steps (0 = only on SIGTERM/SIGINT)")
    keep_checkpoints: int = opt(2, "keep the last K checkpoints")
    resume: bool | None = opt(None, "continue from the latest checkpoint in --out (default: automatically when --out holds one; --no-resume "
                                    "refuses such a directory unless --overwrite)")
    on_nonfinite: str = opt("stop", "a non-finite loss or gradient: stop (naming step and document; the last good state is checkpointed) "
                                    "or skip the step (counted in run.json)", ("stop", "skip"))
    # one section per method with options of its own
    disc: DiscConfig = section(DiscConfig)
    ft_kl: FtKlConfig = section(FtKlConfig)
    talr: TalrConfig = section(TalrConfig)
    rephrase: RephraseConfig = section(RephraseConfig)
    replay: ReplayConfig = section(ReplayConfig)
    cd_base: CdBaseConfig = section(CdBaseConfig)
    icl_distill: IclDistillConfig = section(IclDistillConfig)
    mixsd: MixSDConfig = section(MixSDConfig)
    sdft: SdftConfig = section(SdftConfig)

    # -- flat <-> sections --------------------------------------------------------------------------

    @classmethod
    def sections(cls) -> dict[str, type]:
        return {f.name: f.default_factory for f in dataclasses.fields(cls) if f.metadata.get("section")}

    @classmethod
    def option_home(cls) -> dict[str, str | None]:
        """Every flat option name -> the section holding it (None: a shared option)."""
        home = {f.name: None for f in dataclasses.fields(cls) if not f.metadata.get("section")}
        for name, section_cls in cls.sections().items():
            for f in dataclasses.fields(section_cls):
                home[f.name] = name
        return home

    @classmethod
    def from_options(cls, values: dict) -> "TrainConfig":
        """A config from flat options (CLI, old YAML) and/or nested sections (`disc: {temperature: 2}`)."""
        home, sections = cls.option_home(), cls.sections()
        shared, nested = {}, {name: {} for name in sections}
        for key, value in values.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise CtxDistillError(f"option {key!r} is the {key} section: give a mapping of its options, e.g. "
                                          f"{key}: {{{next(iter(f.name for f in dataclasses.fields(sections[key])), 'option')}: ...}}")
                for sub, sub_value in value.items():
                    sub = str(sub).replace("-", "_")
                    nested[key][sub] = coerce(sections[key], sub, sub_value)
            elif key not in home:
                raise CtxDistillError(f"unknown option {key!r}; valid options: {', '.join(sorted(home))} (see `ctxdistill train --help`)")
            elif home[key] is None:
                shared[key] = coerce(cls, key, value)
            else:
                nested[home[key]][key] = coerce(sections[home[key]], key, value)
        return cls(**shared, **{name: sections[name](**opts) for name, opts in nested.items()})

    @classmethod
    def create(cls, **options) -> "TrainConfig":
        """`TrainConfig.create(method="disc", temperature=1.0, lr=3e-5)`: flat options routed to their sections."""
        return cls.from_options(options)

    def flat(self) -> dict:
        """One key per option, sections spread out: the form of run.json, checkpoints and sweeps."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out.update(dataclasses.asdict(value) if f.metadata.get("section") else {f.name: value})
        return out

    def replace(self, **changes) -> "TrainConfig":
        """A copy with flat options changed (`cfg.replace(temperature=1.0, lr=1e-5)`), not validated."""
        return type(self).from_options(self.flat() | changes)

    # -- checks -------------------------------------------------------------------------------------

    def check_ecosystem_options(self) -> None:
        """Schedules, trackers, evaluation during training (docs/ecosystem.md)."""
        require(self, ("warmup_steps", "eval_every", "eval_probe_limit"), lambda v: v >= 0, ">= 0")
        require(self, ("eval_prompts", "eval_max_new_tokens"), lambda v: v >= 1, ">= 1")
        require(self, ("warmup_ratio",), lambda v: 0 <= v < 1, "in [0, 1)")
        require(self, ("stop_at_drift",), lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
        if self.lr_scheduler == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise CtxDistillError("--lr-scheduler constant has no warm-up; use --lr-scheduler constant_with_warmup (or linear, cosine) "
                                  "with --warmup-steps / --warmup-ratio")
        trackers = [t.strip() for t in self.report_to.split(",") if t.strip()]
        unknown = [t for t in trackers if t not in ("tensorboard", "wandb", "trackio", "none")]
        if unknown or not trackers or ("none" in trackers and len(trackers) > 1):
            raise CtxDistillError(f"report_to {self.report_to!r}: give none, or one or more of tensorboard, wandb, trackio (comma-separated)")
        if self.stop_at_drift and not self.eval_every:
            raise CtxDistillError("--stop-at-drift needs --eval-every N: the drift is measured by that check")
        if self.stop_at_drift and not self.out:
            raise CtxDistillError("--stop-at-drift needs --out: the model kept is the last checkpoint under the budget")
        if (self.stop_at_drift and self.checkpoint_every % self.eval_every
                and (self.checkpoint_every < self.eval_every or self.keep_checkpoints < 2)):
            raise CtxDistillError(f"with --stop-at-drift, --checkpoint-every ({self.checkpoint_every}) must be 0, a multiple of --eval-every "
                                  f"({self.eval_every}), or larger than it with --keep-checkpoints >= 2, so that periodic checkpoints "
                                  f"never prune the last one under the budget")
        if self.push_to_hub and (self.push_to_hub.count("/") != 1 or not all(self.push_to_hub.split("/"))):
            raise CtxDistillError(f"push_to_hub {self.push_to_hub!r}: give a repository id OWNER/NAME")

    def uses(self, method: str) -> bool:
        """The run trains with `method`, directly or as replay's base method."""
        return self.method == method or (self.method == "replay" and self.replay.replay_method == method)

    def validate(self) -> "TrainConfig":
        """Check the shared options and every section; resolve student `auto` to the method's default."""
        from .methods import method_class

        check_choices(self)
        require(self, ("lr",), positive_finite, "a finite number > 0")
        require(self, ("kl_temperature",), positive_finite, "a finite number > 0")
        require(self, ("epochs", "docs_per_step", "max_length", "log_every", "lora_r", "keep_checkpoints", "gen_batch_size"),
                lambda v: v >= 1, ">= 1")
        require(self, ("max_steps", "grad_clip", "weight_decay", "min_chars", "checkpoint_every", "batch_tokens", "kl_chunk_size", "threads",
                       "pad_to_multiple"),
                lambda v: v >= 0, ">= 0")
        require(self, ("seed",), lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)")
        require(self, ("gen_top_p",), lambda v: 0 < v <= 1, "in (0, 1]")
        require(self, ("lora_dropout",), lambda v: 0 <= v < 1, "in [0, 1)")
        self.check_ecosystem_options()
        check_kernels(self.kernels, self.device)
        if self.max_length < 2:
            raise CtxDistillError(f"max_length must be >= 2 (a sequence needs a token to predict from and one to predict), got {self.max_length}")
        for name in self.sections():
            section_cfg = getattr(self, name)
            check_choices(section_cfg)
            section_cfg.validate()
        if self.disc.teacher_cache and self.method != "disc":
            raise CtxDistillError(f"teacher_cache holds DiSC teacher distributions; it cannot serve method {self.method!r} (drop --teacher-cache)")
        if self.disc.disc_positions == "context" and not self.uses("disc"):
            raise CtxDistillError(f"disc_positions context is a DiSC variant; method {self.method!r} does not use it (drop --disc-positions)")
        method = method_class(self.method)
        method.check(self)
        if self.student == "auto":
            self.student = method.student_kind(self)
        return self
