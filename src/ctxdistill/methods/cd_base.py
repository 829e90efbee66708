"""CD-base: context distillation on generated continuations (Padmanabhan et al. 2023, arXiv 2306.09306).

Two modes (`cd_mode`):

document (default): the baseline of the DiSC paper. The initial model writes one continuation of
  each document through its chat template (the authors' unverified prompt "Below is a article.
  {document} Continuation:", T = 1.0, top-p 0.95). The teacher reads the document tokens (no special
  tokens) followed by the continuation, the student reads the continuation alone, and the loss is
  the forward KL(teacher ‖ student) on the continuation's tokens 1..L-1, truncated to 1000 tokens and
  reduced over 64-position chunks as in the authors' code (`cd_reduction`). The temperature is
  `cd_temperature` (their help text says 1.0 while their code passed 2.0). Example lr 4e-6.

entity: the 2023 paper. Input records {entity, definition} (optionally `transfer_sentences`, a list
  of ready-made continuations). Missing transfer sentences are sampled from the initial model as plain
  continuations of the definition (T 0.9, top-k 50, top-p 0.95, 40 tokens), keeping those that mention
  the entity (case-insensitive); small models rarely repeat the name, so `entity_seed_mention` can start
  every continuation with it (not in the paper). The teacher reads tok(definition) + tok(sentence), the student tok(sentence); the KL
  (T = 2.0) covers every sentence position, or with `entity_after_span` only the positions that
  predict tokens after the entity mention. Schedule per entity as in the authors' code:
  `entity_sentences` sentences × `entity_steps` optimizer steps each, with a fresh AdamW state per
  sentence (`entity_reset_optimizer`). The paper's learning rates: 3e-6 (ECBD), 1e-4 (Entity Inferences).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..generation.cache import GenerationCache, cache_dir
from ..generation.sampling import GenerationStats, sample_cached, stop_token_ids
from ..inputs.records import load_checked_records
from ..losses import chunked_kl, forward_kl_per_position, masked_kl_loss
from ..options import opt, positive_finite, require
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register
from .rephrase import generate_for_documents, write_generations

MAX_KL_TOKENS = 1000  # the authors truncate the continuation to 1000 tokens
DOCUMENT_FORMAT = "documents: one text per record (JSONL field `text`); the model writes one continuation of each"
ENTITY_FORMAT = ("entity records (cd_mode entity): JSONL with `entity` and `definition`, optional `transfer_sentences` "
                 "(list of strings); example bundled:entities")
INPUT_FORMAT = f"{DOCUMENT_FORMAT}; or {ENTITY_FORMAT}"
DEFAULT_CD_PROMPT = "Below is a article.\n\n{document}\n\nContinuation:"


@dataclass
class CdBaseConfig:
    """cd_base options"""

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

    def validate(self) -> None:
        require(self, ("cd_temperature", "entity_temperature"), positive_finite, "a finite number > 0")
        require(self, ("cd_max_new_tokens", "cd_chunk", "entity_sentences", "entity_steps", "entity_max_new_tokens", "entity_rounds"),
                lambda v: v >= 1, ">= 1")
        require(self, ("cd_sample_temperature", "entity_sample_temperature", "entity_top_k"), lambda v: v >= 0, ">= 0")
        require(self, ("cd_prompt",), lambda v: "{document}" in v, "a template containing {document}")


@dataclass(frozen=True)
class CdDocExample:
    doc_id: str
    context_ids: tuple[int, ...]
    generation_ids: tuple[int, ...]


@dataclass(frozen=True)
class TransferSentence:
    text: str
    ids: tuple[int, ...]
    keep: tuple[bool, ...]  # per student position: is its prediction distilled


@dataclass(frozen=True)
class EntityExample:
    doc_id: str
    entity: str
    definition_ids: tuple[int, ...]
    sentences: tuple[TransferSentence, ...]


@dataclass(frozen=True)
class EntityStep:
    """One optimizer step on one transfer sentence of one entity."""

    doc_id: str
    sentence_index: int
    definition_ids: tuple[int, ...]
    sentence: TransferSentence
    step: int
    reset_optimizer: bool = False


def after_span_keep(offsets: list[tuple[int, int]], span_end: int) -> tuple[bool, ...]:
    """Per position p of a sentence: True when token p+1 starts at or after character `span_end`.

    Position p's logits predict token p+1, so these are exactly the predictions of the tokens after
    the entity mention (the paper's after-entity-span KL). The last position predicts past the
    sentence and is never kept here.
    """
    return tuple(p + 1 < len(offsets) and offsets[p + 1][0] >= span_end for p in range(len(offsets)))


def mentions(text: str, entity: str) -> bool:
    """The entity string occurs in the text (case-insensitive)."""
    return entity.lower() in text.lower()


def transfer_sentence(tokenizer, text: str, entity: str, after_span: bool) -> TransferSentence | None:
    """Tokenise a transfer sentence; None when `after_span` is set and the entity is not mentioned.
    The mention is the first case-insensitive occurrence of the entity string."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(encoded["input_ids"])
    if after_span:
        at = text.lower().find(entity.lower())
        if at < 0:
            return None
        keep = after_span_keep([tuple(o) for o in encoded["offset_mapping"]], at + len(entity))
        if not any(keep):
            return None
    else:
        keep = (True,) * len(ids)  # every position, as the released configs (teacher logits[-L:])
    return TransferSentence(text, ids, keep)


@register
class CdBase(Method):
    name = "cd_base"
    input_format = INPUT_FORMAT
    config_class = CdBaseConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self._teacher_cache: tuple | None = None  # (doc_id, sentence_index, logits): one sentence, reused for its steps

    def needs_teacher(self) -> bool:
        return True

    def load(self):
        if self.config.cd_mode == "entity":
            return load_checked_records(self.cfg.corpus, "cd_base --cd-mode entity", {"entity": "str", "definition": "str"},
                                        {"transfer_sentences": "list[str]"}, ENTITY_FORMAT, "bundled:entities", self.cfg.id_field)
        return super().load()

    def prepare(self, documents, ctx: PrepareContext) -> PreparedCorpus:
        c, tokenizer = self.config, ctx.tokenizer
        if c.cd_mode == "entity":
            return self.prepare_entities(documents, ctx)
        outputs, stats = generate_for_documents(ctx, documents, kind="cd_base", template=c.cd_prompt,
                                                temperature=c.cd_sample_temperature, max_new_tokens=c.cd_max_new_tokens)
        examples, short, rows = [], [], []
        for doc, out in zip(documents, outputs):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            rows.append({"id": doc.id, "source": doc.text, "generation": text, "tokens": len(out.tokens), "finished": out.stopped})
            generation = tokenizer(text)["input_ids"][:MAX_KL_TOKENS]  # re-tokenised with default special tokens, as the authors
            context = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            context = context[max(0, len(context) + len(generation) - self.cfg.max_length):]  # keep the document's end within max_length
            if len(generation) < 2 or not context:
                short.append(doc.id)
            else:
                examples.append(CdDocExample(doc.id, tuple(context), tuple(generation)))
        write_generations(ctx, rows, stats)
        ctx.log(f"cd_base: {len(rows)} continuations in {stats.seconds:.1f} s ({stats.cached} from the cache)")
        return PreparedCorpus(examples, {"under-2-token-continuation": short}, stats.to_dict())

    def prepare_entities(self, records, ctx: PrepareContext) -> PreparedCorpus:
        tokenizer, cfg, c = ctx.tokenizer, ctx.cfg, self.config
        needed = {r.id: c.entity_sentences for r in records if not r.get("transfer_sentences")}
        found: dict[str, list[str]] = {r.id: [] for r in records}
        definitions = {r.id: tokenizer(r["definition"], add_special_tokens=False)["input_ids"] for r in records}
        seeds = {r.id: f" {r['entity']}" if c.entity_seed_mention else "" for r in records}
        prompts = {rid: ids + (tokenizer(seeds[rid], add_special_tokens=False)["input_ids"] if seeds[rid] else []) for rid, ids in definitions.items()}
        settings = {"kind": "cd_base-entity", "seed_mention": c.entity_seed_mention, "temperature": c.entity_sample_temperature, "top_p": cfg.gen_top_p,
                    "top_k": c.entity_top_k, "max_new_tokens": c.entity_max_new_tokens, "seed": cfg.seed, "precision": cfg.precision}
        stats = GenerationStats()
        entity_of = {r.id: r["entity"] for r in records}
        pad_id = ctx.pad_id
        with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache:
            for round_ in range(c.entity_rounds):
                wanted = [(rid, j) for rid, n in needed.items() for j in range(n - len(found[rid]))]
                if not wanted:
                    break
                keys = [{"prompt": prompts[rid], "round": round_, "sample": j} for rid, j in wanted]
                outs = sample_cached(ctx.model, [prompts[rid] for rid, _ in wanted], cache, stats, keys=keys,
                                     max_new_tokens=c.entity_max_new_tokens, stop_ids=stop_token_ids(tokenizer), pad_id=pad_id,
                                     temperature=c.entity_sample_temperature, top_p=cfg.gen_top_p, top_k=c.entity_top_k,
                                     seed=cfg.seed + round_, batch_size=cfg.gen_batch_size, precision=cfg.precision,
                                     progress=ctx.progress, desc=f"transfer sentences (round {round_ + 1})")
                for (rid, _), out in zip(wanted, outs):
                    text = (seeds[rid] + tokenizer.decode(out.tokens, skip_special_tokens=True)).strip()
                    if mentions(text, entity_of[rid]) and text not in found[rid] and len(found[rid]) < needed[rid]:
                        found[rid].append(text)
        examples, no_sentence, rows = [], [], []
        for r in records:
            generated = r.id in needed
            texts = found[r.id] if generated else r["transfer_sentences"]
            sentences = [transfer_sentence(tokenizer, t, r["entity"], c.entity_after_span) for t in texts]
            sentences = [s for s in sentences if s is not None and len(s.ids) >= 2]
            rows.append({"id": r.id, "entity": r["entity"], "definition": r["definition"], "generated": generated,
                         "transfer_sentences": [s.text for s in sentences]})
            if sentences:
                examples.append(EntityExample(r.id, r["entity"], tuple(definitions[r.id]), tuple(sentences)))
            else:
                no_sentence.append(r.id)
        write_generations(ctx, rows, stats)
        stats.extra.pop("file", None)
        if needed:
            stats.extra = {"settings": settings, "cache_file": str(cache.path) if cache.path else None,
                           "entities_generated": len(needed),
                           "transfer_sentences_kept": sum(len(found[rid]) for rid in needed)}
            ctx.log(f"cd_base: {stats.extra['transfer_sentences_kept']} transfer sentences for {len(needed)} entities in {stats.seconds:.1f} s")
        return PreparedCorpus(examples, {"no-usable-transfer-sentence": no_sentence}, stats.to_dict() if needed else {})

    def plan(self, example, rng: random.Random) -> list:
        c = self.config
        if isinstance(example, CdDocExample):
            return [example]
        chosen = sorted(rng.sample(range(len(example.sentences)), min(c.entity_sentences, len(example.sentences))))
        return [EntityStep(example.doc_id, i, example.definition_ids, example.sentences[i], step,
                           reset_optimizer=c.entity_reset_optimizer and step == 0)
                for i in chosen for step in range(c.entity_steps)]

    def resets_optimizer(self, item) -> bool:
        return isinstance(item, EntityStep) and item.reset_optimizer

    def loss(self, student, teacher, item, device) -> LossOutput:
        c = self.config
        if isinstance(item, EntityStep):
            return self.entity_loss(student, teacher, item, device)
        context, generation = list(item.context_ids), list(item.generation_ids)
        ids = torch.tensor([context + generation], device=device)
        teacher_logits = teacher(input_ids=ids, logits_to_keep=len(generation), use_cache=False).logits[0, :-1]
        student_logits = student(input_ids=torch.tensor([generation], device=device), use_cache=False).logits[0, :-1]
        per_position = forward_kl_per_position(teacher_logits, student_logits, c.cd_temperature)
        loss = chunked_kl(per_position, c.cd_chunk, c.cd_reduction)
        return LossOutput(loss, len(generation) - 1, len(context) + len(generation))

    def entity_loss(self, student, teacher, item: EntityStep, device) -> LossOutput:
        c = self.config
        sentence = list(item.sentence.ids)
        key = (item.doc_id, item.sentence_index)
        if self._teacher_cache is None or self._teacher_cache[0] != key:  # computed once per sentence, as the authors
            ids = torch.tensor([list(item.definition_ids) + sentence], device=device)
            self._teacher_cache = (key, teacher(input_ids=ids, logits_to_keep=len(sentence), use_cache=False).logits[0])
        teacher_logits = self._teacher_cache[1]
        student_logits = student(input_ids=torch.tensor([sentence], device=device), use_cache=False).logits[0]
        keep = torch.tensor(item.sentence.keep, device=device)
        loss = masked_kl_loss(teacher_logits, student_logits, keep, c.entity_temperature)
        return LossOutput(loss, int(keep.sum()), len(item.definition_ids) + len(sentence) if item.step == 0 else 0)
