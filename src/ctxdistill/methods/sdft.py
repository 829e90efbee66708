"""SDFT: on-policy self-distillation with a privileged-context teacher (Shenfeld, Damani, Hübotter, Agrawal,
"Self-Distillation Enables Continual Learning", arXiv 2601.19897; reference code idanshen/Self-Distillation).

The student samples a completion y ~ π_θ(·|x) from the plain prompt x with its CURRENT weights; the teacher,
the same network shown x plus a privileged context c (a demonstration, or the source document), re-scores
y, and the student is trained to match the teacher on its own tokens. DiSC, by contrast, generates nothing
and distils on the document's own tokens.

Divergence. The paper minimises the REVERSE KL D_KL(π_θ(·|x) ‖ π(·|x,c)) per token over the full
vocabulary, on the student's rollout (the hugocisneros.com note and its §3 "on-policy RL with implicit
reward log π(y|x,c) − log π(y|x)"; the Tinker recipe describes a forward KL instead). TRL's SDFTTrainer
exposes the whole generalized-JSD family through `distillation_alpha` (0 = forward KL(teacher ‖ student),
1 = reverse KL(student ‖ teacher), between: β·KL(t‖m) + (1−β)·KL(s‖m), m = β·t + (1−β)·s) and defaults to
0.5 on the student's top-100 tokens. ctxdistill defaults to the paper: `sdft_beta 1` (reverse KL), full
vocabulary through the chunked LM-head path (`losses.chunked_head_sdft`, no [tokens, vocab] tensor);
`--sdft-beta 0.5 --sdft-topk 100` is TRL's default objective.

Transcribed from TRL commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 (2026-07-24; identical in trl 1.16.0):
`trl/experimental/sdft/loss_utils.py` (compute_divergence, add_tail_bucket, the top-k support, the clipped
importance ratio) and `sdft_trainer.py` (`_compute_teacher_student_logits`: logits / temperature, the first
`num_loss_tokens_to_skip` completion tokens dropped, the end-of-turn token kept in the completion;
`_compute_self_distillation_loss`: mean over each sequence's loss tokens, then over sequences;
`DemonstrationTeacherContextBuilder`: the teacher prompt template, chat prompts keep their system turns and
get the template in their last user turn). No T² factor (TRL has none).

Teacher (`sdft_teacher`): `base` (TRL's default; the initial weights; the adapter-disabled model under
LoRA), `ema` (TRL `teacher_update_rate` 0.05 every `teacher_sync_steps` 1; the Tinker recipe reports α 0.01
for the paper; full FT: the loop's frozen copy moved towards the student; LoRA: a shadow adapter started at
zero as TRL's PEFTAdapterEMACallback), `live` (the current student, no gradient).

Teacher prompt (`sdft_teacher_template`): TRL's "{prompt}\\n\\n{privileged_context}". The paper's code uses
"{prompt}\\n\\nThis is an example for a response to the question:\\n{privileged_context}\\n\\nNow answer with a
response of your own, including the thinking process." (as transcribed in tinker-cookbook's sdft.py).
Text prompts are tokenised as text (as TRL); chat prompts through the tokenizer's chat template.

Sampling (TRL's defaults): T 1.0, top-p 1, no top-k, 256 completion tokens; one completion per prompt per
step (`sdft_num_generations`; TRL's 8 rollouts of one prompt per step is `--sdft-num-generations 8`).
Rollouts come from the student's current weights at the step that trains on them (or, with
`sdft_generate_every N`, at the first of N steps), in KV-cached batches (`sample_rows`). Each row draws
from its own generator, seeded by the item's seed from the data order (`plan`): a resumed run, another
process count or another packing draws the same rollouts, and the training RNG is not touched.

State through the method contract (methods/base.py): `after_step` moves the EMA teacher; `state_dict` /
`load_state_dict` carry the EMA weights (method.safetensors) and the rollouts drawn but not trained on yet
(per process, state.json `method_state`) across a resume; `LossOutput.seconds["rollouts"]` is the time spent
drawing them (run.json `timings_s.rollouts`, a part of `train`), while counts stay deterministic. Sharded
engines (FSDP/DeepSpeed ZeRO-3) would have to gather the weights for sampling (TRL's
unwrap_model_for_generation); until then SDFT is for single-process and data-parallel runs.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CtxDistillError
from ..losses import chunked_head_sdft, chunked_token_logprobs, clipped_importance_ratio, sdft_per_position
from ..options import opt, positive_finite, require
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register

RECORDS_FORMAT = ("records {prompt, privileged_context} (prompt: text or chat messages; privileged_context: text or messages), "
                  "or {prompt, document_id} with --sdft-documents; example bundled:sdft_example")
DOCUMENTS_FORMAT = "documents (JSONL field `text`): the initial model writes questions about each one, the document is the privileged context"
INPUT_FORMAT = f"{RECORDS_FORMAT}; or {DOCUMENTS_FORMAT}"
TRL_TEMPLATE = "{prompt}\n\n{privileged_context}"
PAPER_TEMPLATE = ("{prompt}\n\nThis is an example for a response to the question:\n{privileged_context}\n\n"
                  "Now answer with a response of your own, including the thinking process.")
QUESTION_PROMPT = ("Write one question that a reader can answer after reading the article below. Reply with the question only.\n\n"
                   "{document}")
PLACEHOLDER = re.compile(r"\{(prompt|privileged_context)\}")


@dataclass
class SdftConfig:
    """sdft: on-policy self-distillation with a privileged-context teacher (Shenfeld et al. 2026; TRL SDFTTrainer)"""

    sdft_input: str = opt("auto", "records ({prompt, privileged_context} or {prompt, document_id}) or documents (questions are "
                                  "generated); auto: records when the first record has `prompt` or `privileged_context`",
                          ("auto", "records", "documents"))
    sdft_documents: str = opt("", "documents whose text is the privileged context of records {prompt, document_id} (same formats as --corpus)")
    sdft_teacher_template: str = opt(TRL_TEMPLATE, "teacher prompt: {prompt} and {privileged_context} are filled in (TRL's default); the "
                                                   "paper's code: '{prompt}\\n\\nThis is an example for a response to the question:\\n"
                                                   "{privileged_context}\\n\\nNow answer with a response of your own, including the "
                                                   "thinking process.'")
    sdft_teacher: str = opt("base", "base: the initial weights (TRL's default; adapter disabled under LoRA); ema: a moving average of "
                                    "the student; live: the current student", ("base", "ema", "live"))
    sdft_ema_rate: float = opt(0.05, "ema teacher: teacher <- (1 - rate) * teacher + rate * student (TRL 0.05; the paper 0.01 per the "
                                     "Tinker recipe); use --teacher-dtype fp32 with full fine-tuning, bf16 loses small updates")
    sdft_teacher_sync_steps: int = opt(1, "ema teacher: update it every N optimizer steps (TRL teacher_sync_steps)")
    sdft_beta: float = opt(1.0, "divergence: 0 forward KL(teacher || student), 1 reverse KL(student || teacher) (the paper), between: "
                                "generalized JSD (TRL distillation_alpha, default 0.5)")
    sdft_topk: int = opt(0, "0: the full vocabulary; k: the student's top-k tokens, renormalised (TRL topk_logits, default 100)")
    sdft_add_tail: bool = opt(False, "with sdft_topk: add one bucket for the mass outside the top-k instead of renormalising (TRL distillation_add_tail)")
    sdft_loss_tokens_to_skip: int = opt(0, "leave the first N completion tokens out of the loss (TRL num_loss_tokens_to_skip)")
    sdft_temperature: float = opt(1.0, "sampling temperature; the loss divides both models' logits by it too (TRL)")
    sdft_top_p: float = opt(1.0, "nucleus sampling of the rollouts (1 = off, TRL)")
    sdft_sample_top_k: int = opt(0, "top-k sampling of the rollouts (0 = off, TRL)")
    sdft_max_completion_tokens: int = opt(256, "longest rollout (TRL max_completion_length); also capped by max_length")
    sdft_num_generations: int = opt(1, "rollouts per prompt and step; the item's loss is their mean (TRL: 8 rollouts of one prompt per step)")
    sdft_generate_every: int = opt(1, "draw the rollouts of N consecutive steps at once, from the weights at the first of them, and "
                                      "train on them over the N steps (TRL steps_per_generation); 1 = fully on-policy")
    sdft_is_clip: float = opt(2.0, "with sdft_generate_every > 1: scale each token's loss by min(p_now / p_rollout, clip) (TRL "
                                   "distillation_is_clip); 0 = off")
    sdft_generate_from_teacher: bool = opt(False, "sample the rollouts from the teacher-conditioned prompt (TRL generate_from_teacher)")
    sdft_questions_per_document: int = opt(4, "documents input: questions the initial model writes about each document")
    sdft_question_prompt: str = opt(QUESTION_PROMPT, "documents input: the user message that asks for a question; {document} is filled in")
    sdft_question_max_tokens: int = opt(64, "documents input: longest generated question")
    sdft_question_temperature: float = opt(1.0, "documents input: sampling temperature of the questions (top-p is --gen-top-p)")

    def validate(self) -> None:
        require(self, ("sdft_ema_rate",), lambda v: 0 < v <= 1, "in (0, 1]")
        require(self, ("sdft_beta",), lambda v: 0 <= v <= 1, "in [0, 1]")
        require(self, ("sdft_temperature", "sdft_question_temperature"), positive_finite, "a finite number > 0")
        require(self, ("sdft_top_p",), lambda v: 0 < v <= 1, "in (0, 1]")
        require(self, ("sdft_teacher_sync_steps", "sdft_max_completion_tokens", "sdft_num_generations", "sdft_generate_every",
                       "sdft_questions_per_document", "sdft_question_max_tokens"), lambda v: v >= 1, ">= 1")
        require(self, ("sdft_topk", "sdft_loss_tokens_to_skip", "sdft_sample_top_k", "sdft_is_clip"), lambda v: v >= 0, ">= 0")
        missing = [p for p in ("{prompt}", "{privileged_context}") if p not in self.sdft_teacher_template]
        if missing:
            raise CtxDistillError(f"sdft_teacher_template must contain {{prompt}} and {{privileged_context}}; it lacks {missing[0]}")
        if "{document}" not in self.sdft_question_prompt:
            raise CtxDistillError("sdft_question_prompt must contain {document}")
        if self.sdft_add_tail and not self.sdft_topk:
            raise CtxDistillError("sdft_add_tail needs sdft_topk > 0 (the tail is the mass outside the top-k)")


# -- input --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SdftRecord:
    """One validated input: the student's prompt (text or chat messages) and the teacher's privileged context."""

    id: str
    prompt: Any
    privileged_context: str


def message_text(content) -> str:
    if isinstance(content, list):  # multimodal-style parts: keep the text ones (as TRL)
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return str(content)


def context_text(context) -> str:
    """A privileged context as text: a string, or chat messages whose contents are joined by newlines (as TRL)."""
    if isinstance(context, str):
        return context
    if isinstance(context, list) and all(isinstance(m, dict) for m in context):
        return "\n".join(t for t in (message_text(m.get("content", "")) for m in context) if t)
    raise CtxDistillError(f"privileged_context must be text or a list of chat messages, got {type(context).__name__}")


def check_prompt(where: str, prompt) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CtxDistillError(f"{where}: field 'prompt' is empty")
        return
    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)):
        raise CtxDistillError(f"{where}: field 'prompt' must be text or a non-empty list of chat messages {{role, content}}")
    if prompt[-1]["role"] != "user":
        raise CtxDistillError(f"{where}: a chat prompt must end with a user turn (the teacher's context is added to it), "
                              f"got role {prompt[-1]['role']!r}")


def fill_template(template: str, prompt: str, context: str) -> str:
    """The template with {prompt} and {privileged_context} replaced in one pass (other braces stay as they are)."""
    values = {"prompt": prompt, "privileged_context": context}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def teacher_prompt(prompt, context: str, template: str):
    """TRL's composition: a text prompt becomes the filled template; a chat prompt keeps its earlier turns and
    its last user turn becomes the filled template."""
    if isinstance(prompt, list):
        return prompt[:-1] + [{"role": "user", "content": fill_template(template, message_text(prompt[-1]["content"]), context)}]
    return fill_template(template, prompt, context)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Chat messages through the chat template (with the generation prompt); text as text (TRL)."""
    from ..generation.sampling import chat_ids

    if isinstance(prompt, list):
        return chat_ids(tokenizer, prompt)
    return list(tokenizer(prompt)["input_ids"])


@dataclass(frozen=True)
class SdftExample:
    """A prompt tokenised for the student, the teacher and generation, and its longest allowed rollout."""

    doc_id: str
    prompt_ids: tuple[int, ...]
    teacher_prompt_ids: tuple[int, ...]
    generation_prompt_ids: tuple[int, ...]
    max_completion: int


@dataclass(eq=False)
class RolloutWindow:
    """The items of `sdft_generate_every` consecutive steps: their rollouts are drawn together, once."""

    items: list = field(default_factory=list)
    rollouts: dict = field(default_factory=dict)  # item key -> Rollout, removed once trained on
    drawn: set = field(default_factory=set)  # keys of the items whose rollouts were drawn (or restored)


@dataclass(frozen=True)
class SdftItem:
    example: SdftExample
    seed: int  # drawn in `plan` from the data-order RNG: the rollout's random stream
    position: int  # in the epoch's item order
    window: RolloutWindow = field(compare=False, repr=False, hash=False)

    @property
    def doc_id(self) -> str:
        return self.example.doc_id

    @property
    def key(self) -> tuple[str, int]:
        return (self.example.doc_id, self.seed)

    # upper bounds (the rollout's length is known only once drawn), used to pack items into forward passes
    @property
    def student_tokens(self) -> int:
        return len(self.example.prompt_ids) + self.example.max_completion

    @property
    def teacher_tokens(self) -> int:
        return len(self.example.teacher_prompt_ids) + self.example.max_completion


@dataclass
class Rollout:
    completions: list[tuple[int, ...]]  # the end-of-turn token kept when the rollout stopped (as TRL)
    old_logprobs: list[torch.Tensor] | None = None  # per completion token, at drawing time (for the IS correction)


# -- the method -----------------------------------------------------------------------------------------


@register
class Sdft(Method):
    name = "sdft"
    input_format = INPUT_FORMAT
    config_class = SdftConfig
    batched = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stop_ids: list[int] = []
        self.ema_shadow: dict[str, torch.Tensor] | None = None  # LoRA + ema: the shadow adapter
        self.pending_rollouts: dict = {}  # restored from a checkpoint, used before drawing anew
        self.open_windows: dict[int, RolloutWindow] = {}  # windows holding rollouts not trained on yet
        self.rollout_seconds = 0.0  # spent drawing rollouts in the current loss call
        self._planning_rng = None
        self._position = 0
        self._window: RolloutWindow | None = None
        self._tokenizer = None

    # -- decided from the config ----------------------------------------------------------------------

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.teacher_model and cfg.sdft.sdft_teacher != "base":
            raise CtxDistillError(f"teacher_model names a frozen teacher; sdft_teacher {cfg.sdft.sdft_teacher} is built from the student "
                                  f"itself (use sdft_teacher base, or drop --teacher-model)")

    def needs_teacher(self) -> bool:
        return self.config.sdft_teacher in ("base", "ema")

    def input_mode(self, rows) -> str:
        if self.config.sdft_input != "auto":
            return self.config.sdft_input
        first = next((r for _, r in rows if r is not None), {})
        return "records" if "prompt" in first or "privileged_context" in first else "documents"

    def tokenizer(self):
        if self._tokenizer is None:
            from ..models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model, trust_remote_code=self.cfg.trust_remote_code)
        return self._tokenizer

    # -- input ----------------------------------------------------------------------------------------

    def load(self):
        """Records checked field by field, and every prompt measured against max_length, before a model loads."""
        from ..inputs.corpus import CorpusReport, load_corpus, load_records

        cfg, c = self.cfg, self.config
        rows = load_records(cfg.corpus)
        if self.input_mode(rows) == "documents":
            return load_corpus(cfg.corpus, cfg.text_field, cfg.id_field, cfg.min_chars)
        documents = {}
        if c.sdft_documents:
            docs, _ = load_corpus(c.sdft_documents, cfg.text_field, cfg.id_field, cfg.min_chars)
            documents = {d.id: d.text for d in docs}
        report, records = CorpusReport(), []
        for where, raw in rows:
            report.read += 1
            if raw is None:
                report.skip("non-UTF-8", where)
                continue
            records.append(self.check_record(where, raw, documents))
        report.kept = len(records)
        if not records:
            raise CtxDistillError(f"no records in {cfg.corpus}; sdft expects {RECORDS_FORMAT}")
        self.check_lengths(records)
        return records, report

    def check_record(self, where: str, raw: dict, documents: dict[str, str]) -> SdftRecord:
        fields = ", ".join(raw) or "none"
        if "prompt" not in raw:
            raise CtxDistillError(f"{where}: sdft needs field 'prompt' in every record, but it is missing (fields present: {fields}); "
                                  f"expected {RECORDS_FORMAT}")
        check_prompt(where, raw["prompt"])
        if raw.get("privileged_context") is not None:
            try:
                context = context_text(raw["privileged_context"])
            except CtxDistillError as exc:
                raise CtxDistillError(f"{where}: {exc}") from None
        elif raw.get("document_id") is not None:
            if not documents:
                raise CtxDistillError(f"{where}: the record names document_id {raw['document_id']!r}; pass the documents with --sdft-documents")
            if str(raw["document_id"]) not in documents:
                raise CtxDistillError(f"{where}: document_id {raw['document_id']!r} is not in --sdft-documents {self.config.sdft_documents}")
            context = documents[str(raw["document_id"])]
        else:
            raise CtxDistillError(f"{where}: sdft needs field 'privileged_context' (or 'document_id' with --sdft-documents) in every "
                                  f"record, but it is missing (fields present: {fields}); expected {RECORDS_FORMAT}")
        if not context.strip():
            raise CtxDistillError(f"{where}: field 'privileged_context' is empty; the teacher needs something the student does not see")
        return SdftRecord(str(raw.get(self.cfg.id_field, where)), raw["prompt"], context)

    def check_lengths(self, records: list[SdftRecord]) -> None:
        """Every student and teacher prompt must leave room for at least one completion token within max_length."""
        tokenizer, limit = self.tokenizer(), self.cfg.max_length
        for record in records:
            student = len(prompt_ids(tokenizer, record.prompt))
            teacher = len(prompt_ids(tokenizer, teacher_prompt(record.prompt, record.privileged_context, self.config.sdft_teacher_template)))
            if max(student, teacher) >= limit:
                which = "prompt" if student >= limit else "teacher prompt (prompt + privileged_context)"
                raise CtxDistillError(f"record {record.id}: the {which} is {max(student, teacher)} tokens, which leaves no room for a "
                                      f"completion within max_length {limit}; shorten it or raise --max-length")

    def prepare(self, records, ctx: PrepareContext) -> PreparedCorpus:
        from ..generation.sampling import stop_token_ids

        self._tokenizer = ctx.tokenizer
        self.pad_id = ctx.pad_id
        self.stop_ids = stop_token_ids(ctx.tokenizer)
        generation, skipped = {}, {}
        if records and not isinstance(records[0], SdftRecord):  # documents: ask the initial model for questions
            records, generation, skipped = self.questions_for_documents(records, ctx)
        examples = []
        for record in records:
            example = self.example(record, ctx.tokenizer)
            if example is None:
                skipped.setdefault("prompt-longer-than-max-length", []).append(record.id)
            else:
                examples.append(example)
        return PreparedCorpus(examples, skipped, generation)

    def example(self, record: SdftRecord, tokenizer) -> SdftExample | None:
        c = self.config
        student = tuple(prompt_ids(tokenizer, record.prompt))
        teacher = tuple(prompt_ids(tokenizer, teacher_prompt(record.prompt, record.privileged_context, c.sdft_teacher_template)))
        room = self.cfg.max_length - max(len(student), len(teacher))
        if room < 1:
            return None
        return SdftExample(record.id, student, teacher, teacher if c.sdft_generate_from_teacher else student,
                           min(c.sdft_max_completion_tokens, room))

    def questions_for_documents(self, documents, ctx: PrepareContext):
        """`sdft_questions_per_document` questions per document from the initial model (chat template, seeded,
        cached like rephrase's paraphrases), written to OUT/generations.jsonl; the document is the privileged context."""
        from ..generation.cache import GenerationCache, cache_dir
        from ..generation.sampling import GenerationStats, chat_ids, sample_cached, stop_token_ids
        from .rephrase import write_generations

        cfg, c = self.cfg, self.config
        if ctx.model is None:
            raise CtxDistillError("sdft on documents generates questions with the initial model, but prepare got no model")
        prompts, keys, owners = [], [], []
        for doc in documents:
            ids = chat_ids(ctx.tokenizer, [{"role": "user", "content": c.sdft_question_prompt.replace("{document}", doc.text)}])
            for j in range(c.sdft_questions_per_document):
                prompts.append(ids)
                keys.append({"prompt": ids, "sample": j})
                owners.append(doc)
        settings = {"kind": "sdft-questions", "temperature": c.sdft_question_temperature, "top_p": cfg.gen_top_p,
                    "max_new_tokens": c.sdft_question_max_tokens, "seed": cfg.seed, "precision": cfg.precision}
        stats = GenerationStats()
        with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache:
            outputs = sample_cached(ctx.model, prompts, cache, stats, keys=keys, max_new_tokens=c.sdft_question_max_tokens,
                                    stop_ids=stop_token_ids(ctx.tokenizer), pad_id=ctx.pad_id, temperature=c.sdft_question_temperature,
                                    top_p=cfg.gen_top_p, seed=cfg.seed, batch_size=cfg.gen_batch_size, precision=cfg.precision,
                                    progress=ctx.progress, desc="sdft questions")
        records, rows, seen = [], [], set()
        for j, (doc, out) in enumerate(zip(owners, outputs)):
            lines = [line.strip() for line in ctx.tokenizer.decode(out.tokens, skip_special_tokens=True).splitlines() if line.strip()]
            question = lines[0] if lines else ""
            if question and (doc.id, question) not in seen:
                seen.add((doc.id, question))
                rid = f"{doc.id}-q{j % c.sdft_questions_per_document}"
                records.append(SdftRecord(rid, [{"role": "user", "content": question}], doc.text))
                rows.append({"id": rid, "document_id": doc.id, "question": question, "tokens": len(out.tokens), "finished": out.stopped})
        asked = {doc_id for doc_id, _ in seen}
        no_question = [doc.id for doc in documents if doc.id not in asked]
        write_generations(ctx, rows, stats)
        stats.extra |= {"settings": settings, "cache_file": str(cache.path) if cache.path else None, "questions": len(records)}
        ctx.log(f"sdft: {len(records)} questions for {len(documents)} documents in {stats.seconds:.1f} s ({stats.cached} from the cache)")
        return records, stats.to_dict(), {"no-usable-question": no_question}

    def plan(self, example: SdftExample, rng: random.Random) -> list:
        """One item per example and epoch, with its rollout seed; consecutive items share a rollout window of
        `sdft_generate_every` steps. A new `rng` is a new epoch's order (the loop draws one per epoch)."""
        if rng is not self._planning_rng:
            self._planning_rng, self._position, self._window = rng, 0, None
        span = self.config.sdft_generate_every * self.cfg.docs_per_step
        if self._window is None or self._position % span == 0:
            self._window = RolloutWindow()
        item = SdftItem(example, rng.getrandbits(40), self._position, self._window)
        self._window.items.append(item)
        self._position += 1
        return [item]

    # -- rollouts -------------------------------------------------------------------------------------

    def my_items(self, window: RolloutWindow) -> list[SdftItem]:
        """The window's items this process trains on (slot rank, rank + world, ... of every step's group)."""
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        return [i for i in window.items if (i.position % self.cfg.docs_per_step) % world == rank]

    def rollouts(self, student, items: list[SdftItem], device) -> tuple[list[Rollout], dict]:
        """The items' rollouts: drawn now from the student's current weights for every item of their windows
        that has none yet (one batched, KV-cached generation), or taken from the buffer."""
        todo: list[SdftItem] = []
        for item in items:
            for other in self.my_items(item.window) + [item]:
                # earlier items of the window were trained on already (items come in epoch order; a resumed run starts mid-window)
                if other.position < item.position or other.key in other.window.drawn and other is not item or other in todo:
                    continue
                if other.key in self.pending_rollouts:
                    other.window.rollouts[other.key] = self.pending_rollouts.pop(other.key)
                    other.window.drawn.add(other.key)
                elif other.key not in other.window.rollouts:
                    todo.append(other)
        counts = {}
        if todo:
            counts = self.draw(student, todo, device)
        taken = [item.window.rollouts.pop(item.key) for item in items]
        self.open_windows = {k: w for k, w in self.open_windows.items() if w.rollouts}
        return taken, counts

    @torch.no_grad()
    def draw(self, student, items: list[SdftItem], device) -> dict:
        """Rollouts of `items` in batches of `gen_batch_size` (left-padded, KV cache), each row seeded by its
        item's seed alone: what an item draws does not depend on which items share its batch or process."""
        c = self.config
        copies = c.sdft_num_generations
        rows = [(i, g) for i in items for g in range(copies)]
        rows.sort(key=lambda r: -len(r[0].example.generation_prompt_ids))  # similar lengths share a batch
        started = time.perf_counter()
        drawn, batch = {}, max(self.cfg.gen_batch_size, 1)
        for first in range(0, len(rows), batch):
            part = rows[first : first + batch]
            outs = sample_rows(student, [list(i.example.generation_prompt_ids) for i, _ in part], [i.seed * 1024 + g for i, g in part],
                               max_new_tokens=max(i.example.max_completion for i, _ in part), stop_ids=self.stop_ids, pad_id=self.pad_id,
                               temperature=c.sdft_temperature, top_p=c.sdft_top_p, top_k=c.sdft_sample_top_k, precision=self.cfg.precision)
            drawn.update({(i.key, g): out for (i, g), out in zip(part, outs)})
        seconds = time.perf_counter() - started
        for item in items:
            completions = []
            for g in range(copies):
                tokens, stop = drawn[(item.key, g)]
                completions.append(tuple((tokens + ([stop] if stop is not None else []))[: item.example.max_completion]))
            reused = c.sdft_generate_every > 1 and c.sdft_is_clip > 0 and not c.sdft_generate_from_teacher  # TRL: none from the teacher prompt
            old = self.rollout_logprobs(student, item, completions, device) if reused else None
            item.window.rollouts[item.key] = Rollout(completions, old)
            item.window.drawn.add(item.key)
            self.open_windows[id(item.window)] = item.window
        self.rollout_seconds = seconds
        return {"sdft_generated_sequences": len(rows), "sdft_generated_tokens": sum(len(t) for t, _ in drawn.values()),
                "sdft_stopped_sequences": sum(stop is not None for _, stop in drawn.values())}

    def rollout_logprobs(self, student, item: SdftItem, completions, device) -> list[torch.Tensor]:
        """log π(y_t) of each drawn token under the weights that drew it (TRL's old_per_token_logps)."""
        from ..models import final_hidden_states, plain_lm_head

        batch = sequence_batch([(item.example.prompt_ids, comp, 0) for comp in completions], self.pad_id, device)
        if not plain_lm_head(student):
            logits = student(input_ids=batch.input_ids, attention_mask=batch.attention, use_cache=False).logits[batch.keep]
            logp = torch.log_softmax(logits.float() / self.config.sdft_temperature, -1).gather(-1, batch.targets[:, None])[:, 0]
        else:
            hidden = final_hidden_states(student, input_ids=batch.input_ids, attention_mask=batch.attention, use_cache=False)[batch.keep]
            logp = chunked_token_logprobs(hidden, student.get_output_embeddings().weight, batch.targets, self.config.sdft_temperature,
                                          self.cfg.kl_chunk_size)
        return list(logp.split([len(comp) for comp in completions]))

    # -- loss -----------------------------------------------------------------------------------------

    def loss(self, student, teacher, item: SdftItem, device) -> LossOutput:
        return self.batch_loss(student, teacher, [item], device)

    def batch_loss(self, student, teacher, items: list[SdftItem], device) -> LossOutput:
        """Mean over items of (mean over the item's rollouts of (mean over loss tokens of the divergence)), with
        one student pass over all rollouts and one teacher pass over all teacher prompts + rollouts."""
        from ..models import final_hidden_states, plain_lm_head

        c = self.config
        self.rollout_seconds = 0.0
        rollouts, counts = self.rollouts(student, items, device)
        skip = c.sdft_loss_tokens_to_skip
        rows = [(item, comp, old) for item, r in zip(items, rollouts)
                for comp, old in zip(r.completions, r.old_logprobs or [None] * len(r.completions))]
        student_batch = sequence_batch([(i.example.prompt_ids, comp, skip) for i, comp, _ in rows], self.pad_id, device)
        teacher_batch = sequence_batch([(i.example.teacher_prompt_ids, comp, skip) for i, comp, _ in rows], self.pad_id, device)
        weights = position_weights([len(comp) for _, comp, _ in rows], skip, [len(r.completions) for r in rollouts], len(items)).to(device)
        olds = [old[skip:] for _, _, old in rows if old is not None]
        old_logprobs = torch.cat(olds).to(device) if olds and len(olds) == len(rows) else None
        loss_tokens = int(student_batch.keep.sum())
        view = TeacherView(self, student, teacher)
        with view:
            if plain_lm_head(student):
                teacher_hidden = view.hidden_states(input_ids=teacher_batch.input_ids, attention_mask=teacher_batch.attention)[teacher_batch.keep]
                student_hidden = final_hidden_states(student, input_ids=student_batch.input_ids, attention_mask=student_batch.attention,
                                                     use_cache=False)
                if loss_tokens == 0:  # nothing to distil: a zero that keeps the graph (as TRL)
                    loss = student_hidden.sum() * 0.0
                else:
                    loss = chunked_head_sdft(student_hidden[student_batch.keep], teacher_hidden, student.get_output_embeddings().weight,
                                             view.head_weight, weights, c.sdft_beta, c.sdft_temperature, c.sdft_topk, c.sdft_add_tail,
                                             self.cfg.kl_chunk_size, student_batch.targets, old_logprobs, c.sdft_is_clip)
            else:  # dense logits (models whose logits are not hidden @ head.T)
                teacher_logits = view(input_ids=teacher_batch.input_ids, attention_mask=teacher_batch.attention).logits[teacher_batch.keep]
                student_logits = student(input_ids=student_batch.input_ids, attention_mask=student_batch.attention, use_cache=False).logits
                if loss_tokens == 0:
                    loss = student_logits.sum() * 0.0
                else:
                    student_logits = student_logits[student_batch.keep]
                    per_position = sdft_per_position(student_logits, teacher_logits, c.sdft_beta, c.sdft_temperature, c.sdft_topk, c.sdft_add_tail)
                    if old_logprobs is not None and c.sdft_is_clip > 0:
                        per_position = per_position * clipped_importance_ratio(student_logits, student_batch.targets, old_logprobs,
                                                                               c.sdft_is_clip, c.sdft_temperature)
                    loss = (per_position * weights).sum()
        lengths = [len(comp) for _, comp, _ in rows]
        # counts stay deterministic (resume and process-count checks compare them); the rollout time goes to run.json
        # timings_s.rollouts (summed by the loop) and, per step, to the metric generation_s (the benchmark reads it)
        metrics = {"completion_tokens": sum(lengths) / max(len(lengths), 1), "generation_s": round(self.rollout_seconds, 4)}
        return LossOutput(loss, student_tokens=loss_tokens, teacher_tokens=int(teacher_batch.attention.sum()), metrics=metrics,
                          counts=counts, seconds={"rollouts": self.rollout_seconds})

    # -- teacher state --------------------------------------------------------------------------------

    @torch.no_grad()
    def after_step(self, student, teacher, step: int) -> None:
        """The EMA teacher's update after optimizer step `step` (TRL: on_step_end when global_step % sync == 0)."""
        c = self.config
        if c.sdft_teacher != "ema" or step % c.sdft_teacher_sync_steps:
            return
        rate = c.sdft_ema_rate
        if self.cfg.student == "lora":
            shadow = self.shadow(student)
            for name, param in lora_weights(student).items():
                shadow[name].mul_(1 - rate).add_(param.detach().to(shadow[name].dtype), alpha=rate)
            return
        target = dict(teacher.model.named_parameters())
        for name, param in student.named_parameters():
            name = plain_name(name)
            target[name].mul_(1 - rate).add_(param.detach().to(target[name].dtype), alpha=rate)

    def shadow(self, student) -> dict[str, torch.Tensor]:
        """LoRA + ema: the shadow adapter, started at zero (TRL's PEFTAdapterEMACallback)."""
        if self.ema_shadow is None:
            self.ema_shadow = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in lora_weights(student).items()}
        return self.ema_shadow

    def state_dict(self, teacher=None) -> dict:
        """What a checkpoint must hold for an exact resume: {"tensors": the EMA weights (full FT: the teacher;
        LoRA: the shadow adapter; the same on every process), "json": this process's rollouts drawn but not
        trained on yet (sdft_generate_every > 1)}."""
        rollouts = {f"{k[0]}\t{k[1]}": {"completions": [list(t) for t in r.completions],
                                        "old_logprobs": [o.tolist() for o in r.old_logprobs] if r.old_logprobs else None}
                    for w in self.open_windows.values() for k, r in w.rollouts.items()}
        tensors = {}
        if self.config.sdft_teacher == "ema":
            # parameters, not state_dict(): tied weights appear once (safetensors refuses shared storage)
            source = (self.ema_shadow or {}) if self.cfg.student == "lora" else (dict(teacher.model.named_parameters()) if teacher else {})
            tensors = {k: v.detach().cpu().clone() for k, v in source.items()}
        return {"tensors": tensors, "json": {"rollouts": rollouts}}

    def load_state_dict(self, state: dict, teacher=None) -> None:
        for key, value in state.get("json", {}).get("rollouts", {}).items():
            doc_id, seed = key.rsplit("\t", 1)
            olds = value.get("old_logprobs")
            self.pending_rollouts[(doc_id, int(seed))] = Rollout([tuple(t) for t in value["completions"]],
                                                                 [torch.tensor(o) for o in olds] if olds else None)
        ema = state.get("tensors")
        if not ema or self.config.sdft_teacher != "ema":
            return
        if self.cfg.student == "lora":
            self.ema_shadow = {k: v.float().clone() for k, v in ema.items()}
        else:
            with torch.no_grad():
                for name, param in teacher.model.named_parameters():
                    param.copy_(ema[name])


# -- rollouts: per-row seeded sampling ------------------------------------------------------------------


def sampled_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """One token per row of [B, V] logits from softmax(logits / T), restricted to the top-k and to the smallest
    set of mass >= top_p, by inverse CDF at the row's uniform draw in [0, 1)."""
    probs, order = (logits.float() / temperature).softmax(-1).sort(-1, descending=True)
    if top_k > 0:
        probs[:, top_k:] = 0
    if top_p < 1:
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None], right=True)
    return order.gather(-1, picked.clamp(max=logits.shape[-1] - 1))[:, 0]


def cache_argument(model) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_rows(model, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int, stop_ids, pad_id: int,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, precision: str = "bf16") -> list[tuple[list[int], int | None]]:
    """(tokens before the stop token, the stop token or None) per prompt: one left-padded batch with a KV cache,
    row i drawing from its own generator seeded with `seeds[i]` (one uniform per row and step), so a row's
    rollout is the same whatever else shares the batch, and the run's RNG is untouched."""
    from transformers import DynamicCache

    from ..generation.sampling import cut_at_stop, left_pad
    from ..runtime import autocast
    from .mixsd import positions_from_mask

    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    cache = {cache_argument(model): DynamicCache(config=model.config)}  # filled in place step by step
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            ids, mask = left_pad(prompts, pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True, logits_to_keep=1,
                           **cache).logits[:, -1]
            position = mask.sum(-1)
            done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
            tokens = []
            for _ in range(max_new_tokens):
                uniforms = torch.stack([torch.rand((), generator=g) for g in generators])
                chosen = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long),
                                     sampled_tokens(logits, uniforms, temperature, top_p, top_k))
                tokens.append(chosen)
                done |= torch.isin(chosen, stop)
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True, **cache).logits[:, -1]
                position = position + 1
    finally:
        model.train(was_training)
    rows = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in prompts]
    return [cut_at_stop(row, set(stop_ids)) for row in rows]


# -- batches and the teacher view ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded prompt + completion rows; `keep` marks the positions whose predictions are distilled (the
    completion tokens from `skip` on), `targets` the tokens they predict, in row-major order."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    keep: torch.Tensor
    targets: torch.Tensor


def sequence_batch(rows, pad_id: int, device) -> SequenceBatch:
    """`rows` of (prompt ids, completion ids, tokens to skip); position len(prompt) - 1 + j predicts completion token j."""
    longest = max(len(p) + len(c) for p, c, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    keep = torch.zeros((len(rows), longest), dtype=torch.bool)
    targets = []
    for r, (prompt, completion, skip) in enumerate(rows):
        sequence = list(prompt) + list(completion)
        input_ids[r, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention[r, : len(sequence)] = 1
        keep[r, len(prompt) - 1 + skip : len(sequence) - 1] = True
        targets.extend(completion[skip:])
    return SequenceBatch(input_ids.to(device), attention.to(device), keep.to(device), torch.tensor(targets, dtype=torch.long).to(device))


def position_weights(lengths: list[int], skip: int, per_item: list[int], num_items: int) -> torch.Tensor:
    """Weight of each loss position (the order of `SequenceBatch.keep`): 1 / (its rollout's loss tokens × the
    item's rollouts × items), so the weighted sum is TRL's per-sequence mean, averaged over rollouts and items."""
    weights, row = [], 0
    for copies in per_item:
        for _ in range(copies):
            n = max(lengths[row] - skip, 0)
            weights.append(torch.full((n,), 1.0 / (n * copies * num_items)) if n else torch.zeros(0))
            row += 1
    return torch.cat(weights) if weights else torch.zeros(0)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def lora_weights(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA matrices: what the ema teacher's shadow adapter averages (TRL: pure LoRA only)."""
    weights = trainable(model)
    others = [n for n in weights if "lora_" not in n]
    if others:
        raise CtxDistillError(f"sdft_teacher ema under LoRA averages the adapter only, but {others[0]} also trains; use full fine-tuning")
    return weights


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (torch.compile, DDP)."""
    for prefix in ("_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


class TeacherView:
    """The teacher of this run as one interface: `view(...)`, `view.hidden_states(...)`, `view.head_weight`,
    all without gradient. base: the loop's teacher; live: the student; ema: the loop's frozen copy (full FT)
    or the student with the shadow adapter swapped in for the duration of the `with` block (LoRA)."""

    def __init__(self, method: Sdft, student, teacher):
        self.kind = method.config.sdft_teacher
        self.lora_ema = self.kind == "ema" and method.cfg.student == "lora"
        self.method, self.student, self.teacher = method, student, teacher
        if self.kind != "live" and not self.lora_ema and teacher is None:
            raise CtxDistillError(f"sdft_teacher {self.kind} needs the teacher the loop builds when needs_teacher() is true")
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        if self.lora_ema:  # swapped before the student's forward, restored after the teacher's: autograd never sees it
            shadow = self.method.shadow(self.student)
            with torch.no_grad():
                for name, param in lora_weights(self.student).items():
                    self.saved[name] = param.detach().clone()
                    param.data.copy_(shadow[name].to(param.dtype))
        return self

    def restore(self) -> None:
        if self.saved:
            with torch.no_grad():
                for name, param in lora_weights(self.student).items():
                    param.data.copy_(self.saved[name])
            self.saved = {}

    def __exit__(self, *exc):
        self.restore()

    def _student_as_teacher(self, run):
        was_training = self.student.training
        self.student.eval()  # no dropout in the teacher's pass (TRL disables dropout)
        try:
            with torch.no_grad():
                return run(self.student)
        finally:
            self.student.train(was_training)
            self.restore()  # LoRA + ema: the student's own weights are back before its forward

    def __call__(self, **kwargs):
        if self.kind == "live" or self.lora_ema:
            return self._student_as_teacher(lambda m: m(use_cache=False, **kwargs))
        return self.teacher(use_cache=False, **kwargs)

    def hidden_states(self, **kwargs) -> torch.Tensor:
        from ..models import final_hidden_states

        if self.kind == "live" or self.lora_ema:
            return self._student_as_teacher(lambda m: final_hidden_states(m, use_cache=False, **kwargs))
        return self.teacher.hidden_states(use_cache=False, **kwargs)

    @property
    def head_weight(self) -> torch.Tensor:
        if self.kind == "live" or self.lora_ema:
            return self.student.get_output_embeddings().weight.detach()
        return self.teacher.head_weight
