"""SDFT: on-policy self-distillation with a privileged-context teacher (Shenfeld, Damani, Hübotter, Agrawal,
"Self-Distillation Enables Continual Learning", arXiv 2601.19897; reference code idanshen/Self-Distillation).

The student samples a completion y ~ π_θ(·|x) from the plain prompt x with its CURRENT weights; the teacher,
the same network shown x plus a privileged context c (a demonstration, or the source document), re-scores
y, and the student is trained to match the teacher on its own tokens. DiSC, by contrast, generates nothing
and distils on the document's own tokens.

Divergence: per token over the full vocabulary, on the student's rollout, REVERSE KL(π_θ(·|x) ‖ π(·|x,c))
by default (`sdft_beta 1`), through the chunked LM-head path (`losses.chunked_head_sdft`, no [tokens, vocab]
tensor). What was checked (2026-12-02, the `search` tool): the paper's own equation could not be read, only
its abstract (huggingface.co/papers/2601.19897.md), which names no direction. Secondary summaries say
reverse KL (emergentmind.com/papers/2601.19897: "reverse KL divergence minimization"; howistudyai.com and
paperium.net summaries likewise); the Tinker cookbook's SDFT recipe (tinker-docs.thinkingmachines.ai,
cookbook/recipes/sdft) states KL(teacher ‖ student), i.e. forward. So "the paper = reverse KL" is the
majority reading, not verified against the paper's text. TRL's SDFTTrainer exposes the generalized-JSD family
through `distillation_alpha` (0 forward KL(teacher ‖ student), 1 reverse KL(student ‖ teacher), between
β·KL(t‖m) + (1−β)·KL(s‖m), m = β·t + (1−β)·s) and defaults to 0.5 on the student's top-100 tokens:
`--sdft-beta 0.5 --sdft-topk 100` (checked against trl 1.16.0's own functions in tests/test_sdft.py).

Transcribed from TRL commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 (2026-07-24; identical in trl 1.16.0):
`trl/experimental/sdft/loss_utils.py` (compute_divergence, add_tail_bucket, the top-k support, the clipped
importance ratio) and `sdft_trainer.py` (`_compute_teacher_student_logits`: logits / temperature, the first
`num_loss_tokens_to_skip` completion tokens dropped, the end-of-turn token kept in the completion;
`_compute_self_distillation_loss`: mean over each sequence's loss tokens, then over sequences;
`DemonstrationTeacherContextBuilder`: the teacher prompt template, chat prompts keep their system turns and
get the template in their last user turn). No T² factor (TRL has none).

Teacher (`sdft_teacher`, `teachers.SelfTeacher`): `base` (TRL's default), `ema` (TRL `teacher_update_rate`
0.05 every `teacher_sync_steps` 1; the Tinker recipe reports α 0.01 for the paper) or `live`. Teacher prompt
(`sdft_teacher_template`, inputs/prompts.py): TRL's "{prompt}\\n\\n{privileged_context}" by default; the
paper code's template (as transcribed in tinker-cookbook's sdft.py) is `inputs.prompts.PAPER_TEMPLATE`.
Text prompts are tokenised as text (as TRL); chat prompts through the tokenizer's chat template.

Sampling (TRL's defaults): T 1.0, top-p 1, no top-k, 256 completion tokens; one completion per prompt per
step (`sdft_num_generations`; TRL's 8 rollouts of one prompt per step is `--sdft-num-generations 8`).
Rollouts come from the student's current weights at the step that trains on them (or, with
`sdft_generate_every N`, at the first of N steps), in KV-cached batches (`sample_rows`). Each row draws
from its own generator, seeded by the item's seed from the data order (`plan`): a resumed run, another
process count or another packing draws the same rollouts, and the training RNG is not touched.

State (methods/base.py hooks): `after_step` moves the EMA; `state_dict` carries the EMA weights and the
rollouts drawn but not trained on yet through a checkpoint; `LossOutput.seconds["rollouts"]` is the time
spent drawing (run.json `timings_s.rollouts`, summed over resumes); counts stay deterministic. FSDP/DeepSpeed
are refused (training/distributed.py) until sampling gathers the weights (TRL's unwrap_model_for_generation).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ..errors import CtxDistillError
from ..generation.rollouts import Rollout, RolloutBuffer, RolloutWindow, completion_logprobs, sample_rows, sequence_batch
from ..generation.sampling import prompt_ids
from ..inputs.prompts import TRL_TEMPLATE, PromptRecord, read_record, teacher_prompt
from ..losses import chunked_head_sdft, clipped_importance_ratio, position_weights, sdft_per_position
from ..options import opt, positive_finite, require
from ..teachers import SelfTeacher
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register

RECORDS_FORMAT = ("records {prompt, privileged_context} (prompt: text or chat messages; privileged_context: text or messages), "
                  "or {prompt, document_id} with --sdft-documents; example bundled:sdft_example")
DOCUMENTS_FORMAT = "documents (JSONL field `text`): the initial model writes questions about each one, the document is the privileged context"
INPUT_FORMAT = f"{RECORDS_FORMAT}; or {DOCUMENTS_FORMAT}"
QUESTION_PROMPT = ("Write one question that a reader can answer after reading the article below. Reply with the question only.\n\n"
                   "{document}")


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


@dataclass(frozen=True)
class SdftExample:
    """A prompt tokenised for the student, the teacher and generation, and its longest allowed rollout."""

    doc_id: str
    prompt_ids: tuple[int, ...]
    teacher_prompt_ids: tuple[int, ...]
    generation_prompt_ids: tuple[int, ...]
    max_completion: int


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
        c = self.config
        self.teacher_kind = SelfTeacher(c.sdft_teacher, cfg.student == "lora", c.sdft_ema_rate, c.sdft_teacher_sync_steps)
        self.buffer = RolloutBuffer()  # rollouts drawn but not trained on yet (sdft_generate_every > 1)
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
            records.append(read_record(where, raw, documents, id_field=cfg.id_field, method="sdft", expected=RECORDS_FORMAT,
                                       documents_flag="--sdft-documents", documents_path=c.sdft_documents))
        report.kept = len(records)
        if not records:
            raise CtxDistillError(f"no records in {cfg.corpus}; sdft expects {RECORDS_FORMAT}")
        self.check_lengths(records)
        return records, report

    def check_lengths(self, records: list[PromptRecord]) -> None:
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
        if records and not isinstance(records[0], PromptRecord):  # documents: ask the initial model for questions
            records, generation, skipped = self.questions_for_documents(records, ctx)
        examples = []
        for record in records:
            example = self.example(record, ctx.tokenizer)
            if example is None:
                skipped.setdefault("prompt-longer-than-max-length", []).append(record.id)
            else:
                examples.append(example)
        return PreparedCorpus(examples, skipped, generation)

    def example(self, record: PromptRecord, tokenizer) -> SdftExample | None:
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
                records.append(PromptRecord(rid, [{"role": "user", "content": question}], doc.text))
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
        todo = self.buffer.missing(items, self.my_items)
        counts = self.draw(student, todo, device) if todo else {}
        return self.buffer.take(items), counts

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
            self.buffer.put(item, Rollout(completions, old))
        self.rollout_seconds = seconds
        return {"sdft_generated_sequences": len(rows), "sdft_generated_tokens": sum(len(t) for t, _ in drawn.values()),
                "sdft_stopped_sequences": sum(stop is not None for _, stop in drawn.values())}

    def rollout_logprobs(self, student, item: SdftItem, completions, device) -> list[torch.Tensor]:
        """log π(y_t) of each drawn token under the weights that drew it (TRL's old_per_token_logps)."""
        batch = sequence_batch([(item.example.prompt_ids, comp, 0) for comp in completions], self.pad_id, device)
        logp = completion_logprobs(student, batch, self.config.sdft_temperature, self.cfg.kl_chunk_size)
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
        view = self.teacher_kind.view(student, teacher)
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

    def after_step(self, student, teacher, step: int) -> None:
        """The EMA teacher's update after optimizer step `step` (every `sdft_teacher_sync_steps`)."""
        self.teacher_kind.update(student, teacher, step)

    def state_dict(self, teacher=None) -> dict:
        """What a checkpoint must hold for an exact resume: {"tensors": the EMA weights (full FT: the teacher;
        LoRA: the shadow adapter; the same on every process), "json": this process's rollouts drawn but not
        trained on yet (sdft_generate_every > 1)}."""
        return {"tensors": self.teacher_kind.state_tensors(teacher), "json": {"rollouts": self.buffer.state()}}

    def load_state_dict(self, state: dict, teacher=None) -> None:
        self.buffer.restore(state.get("json", {}).get("rollouts", {}))
        self.teacher_kind.load_tensors(state.get("tensors") or {}, teacher)
