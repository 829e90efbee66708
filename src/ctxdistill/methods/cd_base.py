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
from pathlib import Path

import torch

from ..generate import GenerationCache, GenerationStats, cache_dir, sample_cached, stop_token_ids, write_jsonl
from ..losses import chunked_kl, forward_kl_per_position, masked_kl_loss
from . import Method, PreparedCorpus
from .records import load_checked_records
from .rephrase import generate_for_documents

MAX_KL_TOKENS = 1000  # the authors truncate the continuation to 1000 tokens
DOCUMENT_FORMAT = "documents: one text per record (JSONL field `text`); the model writes one continuation of each"
ENTITY_FORMAT = ("entity records (cd_mode entity): JSONL with `entity` and `definition`, optional `transfer_sentences` "
                 "(list of strings); example bundled:entities")
INPUT_FORMAT = f"{DOCUMENT_FORMAT}; or {ENTITY_FORMAT}"


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


class CdBase(Method):
    name = "cd_base"
    needs_teacher = True
    input_format = INPUT_FORMAT
    prepare_uses_model = True

    def __init__(self):
        self._teacher_cache: tuple | None = None  # (doc_id, sentence_index, logits): one sentence, reused for its steps

    def load(self, cfg):
        if cfg.cd_mode == "entity":
            return load_checked_records(cfg.corpus, "cd_base --cd-mode entity", {"entity": "str", "definition": "str"},
                                        {"transfer_sentences": "list[str]"}, ENTITY_FORMAT, "bundled:entities", cfg.id_field)
        return super().load(cfg)

    def prepare(self, documents, tokenizer, cfg, model=None, device=None, out_dir: Path | None = None, progress=True, log=print) -> PreparedCorpus:
        if cfg.cd_mode == "entity":
            return self.prepare_entities(documents, tokenizer, cfg, model, out_dir, progress, log)
        outputs, stats = generate_for_documents(model, tokenizer, documents, cfg, kind="cd_base", template=cfg.cd_prompt,
                                                temperature=cfg.cd_sample_temperature, max_new_tokens=cfg.cd_max_new_tokens,
                                                progress=progress)
        examples, short, rows = [], [], []
        for doc, out in zip(documents, outputs):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            rows.append({"id": doc.id, "source": doc.text, "generation": text, "tokens": len(out.tokens), "finished": out.stopped})
            generation = tokenizer(text)["input_ids"][:MAX_KL_TOKENS]  # re-tokenised with default special tokens, as the authors
            context = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            context = context[max(0, len(context) + len(generation) - cfg.max_length):]  # keep the document's end within max_length
            if len(generation) < 2 or not context:
                short.append(doc.id)
            else:
                examples.append(CdDocExample(doc.id, tuple(context), tuple(generation)))
        if out_dir is not None:
            write_jsonl(out_dir / "generations.jsonl", rows)
            stats.extra["file"] = str(out_dir / "generations.jsonl")
        log(f"cd_base: {len(rows)} continuations in {stats.seconds:.1f} s ({stats.cached} from the cache)")
        return PreparedCorpus(examples, {"under-2-token-continuation": short}, stats.to_dict())

    def prepare_entities(self, records, tokenizer, cfg, model, out_dir, progress, log) -> PreparedCorpus:
        needed = {r.id: cfg.entity_sentences for r in records if not r.get("transfer_sentences")}
        found: dict[str, list[str]] = {r.id: [] for r in records}
        definitions = {r.id: tokenizer(r["definition"], add_special_tokens=False)["input_ids"] for r in records}
        seeds = {r.id: f" {r['entity']}" if cfg.entity_seed_mention else "" for r in records}
        prompts = {rid: ids + (tokenizer(seeds[rid], add_special_tokens=False)["input_ids"] if seeds[rid] else []) for rid, ids in definitions.items()}
        settings = {"kind": "cd_base-entity", "seed_mention": cfg.entity_seed_mention, "temperature": cfg.entity_sample_temperature, "top_p": cfg.gen_top_p,
                    "top_k": cfg.entity_top_k, "max_new_tokens": cfg.entity_max_new_tokens, "seed": cfg.seed, "precision": cfg.precision}
        stats = GenerationStats()
        entity_of = {r.id: r["entity"] for r in records}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache:
            for round_ in range(cfg.entity_rounds):
                wanted = [(rid, j) for rid, n in needed.items() for j in range(n - len(found[rid]))]
                if not wanted:
                    break
                keys = [{"prompt": prompts[rid], "round": round_, "sample": j} for rid, j in wanted]
                outs = sample_cached(model, [prompts[rid] for rid, _ in wanted], cache, stats, keys=keys,
                                     max_new_tokens=cfg.entity_max_new_tokens, stop_ids=stop_token_ids(tokenizer), pad_id=pad_id,
                                     temperature=cfg.entity_sample_temperature, top_p=cfg.gen_top_p, top_k=cfg.entity_top_k,
                                     seed=cfg.seed + round_, batch_size=cfg.gen_batch_size, precision=cfg.precision,
                                     progress=progress, desc=f"transfer sentences (round {round_ + 1})")
                for (rid, _), out in zip(wanted, outs):
                    text = (seeds[rid] + tokenizer.decode(out.tokens, skip_special_tokens=True)).strip()
                    if mentions(text, entity_of[rid]) and text not in found[rid] and len(found[rid]) < needed[rid]:
                        found[rid].append(text)
        examples, no_sentence, rows = [], [], []
        for r in records:
            generated = r.id in needed
            texts = found[r.id] if generated else r["transfer_sentences"]
            sentences = [transfer_sentence(tokenizer, t, r["entity"], cfg.entity_after_span) for t in texts]
            sentences = [s for s in sentences if s is not None and len(s.ids) >= 2]
            rows.append({"id": r.id, "entity": r["entity"], "definition": r["definition"], "generated": generated,
                         "transfer_sentences": [s.text for s in sentences]})
            if sentences:
                examples.append(EntityExample(r.id, r["entity"], tuple(definitions[r.id]), tuple(sentences)))
            else:
                no_sentence.append(r.id)
        if out_dir is not None:
            write_jsonl(out_dir / "generations.jsonl", rows)
        if needed:
            stats.extra = {"settings": settings, "cache_file": str(cache.path) if cache.path else None,
                           "entities_generated": len(needed),
                           "transfer_sentences_kept": sum(len(found[rid]) for rid in needed)}
            log(f"cd_base: {stats.extra['transfer_sentences_kept']} transfer sentences for {len(needed)} entities in {stats.seconds:.1f} s")
        return PreparedCorpus(examples, {"no-usable-transfer-sentence": no_sentence}, stats.to_dict() if needed else {})

    def plan(self, example, rng: random.Random, cfg):
        if isinstance(example, CdDocExample):
            return example
        chosen = sorted(rng.sample(range(len(example.sentences)), min(cfg.entity_sentences, len(example.sentences))))
        return [EntityStep(example.doc_id, i, example.definition_ids, example.sentences[i], step,
                           reset_optimizer=cfg.entity_reset_optimizer and step == 0)
                for i in chosen for step in range(cfg.entity_steps)]

    def loss(self, student, teacher, item, cfg, pad_id: int, device) -> tuple[torch.Tensor, dict]:
        if isinstance(item, EntityStep):
            return self.entity_loss(student, teacher, item, cfg, device)
        context, generation = list(item.context_ids), list(item.generation_ids)
        ids = torch.tensor([context + generation], device=device)
        teacher_logits = teacher(input_ids=ids, logits_to_keep=len(generation), use_cache=False).logits[0, :-1]
        student_logits = student(input_ids=torch.tensor([generation], device=device), use_cache=False).logits[0, :-1]
        per_position = forward_kl_per_position(teacher_logits, student_logits, cfg.cd_temperature)
        loss = chunked_kl(per_position, cfg.cd_chunk, cfg.cd_reduction)
        return loss, {"student_tokens": len(generation) - 1, "teacher_tokens": len(context) + len(generation)}

    def entity_loss(self, student, teacher, item: EntityStep, cfg, device) -> tuple[torch.Tensor, dict]:
        sentence = list(item.sentence.ids)
        key = (item.doc_id, item.sentence_index)
        if self._teacher_cache is None or self._teacher_cache[0] != key:  # computed once per sentence, as the authors
            ids = torch.tensor([list(item.definition_ids) + sentence], device=device)
            self._teacher_cache = (key, teacher(input_ids=ids, logits_to_keep=len(sentence), use_cache=False).logits[0])
        teacher_logits = self._teacher_cache[1]
        student_logits = student(input_ids=torch.tensor([sentence], device=device), use_cache=False).logits[0]
        keep = torch.tensor(item.sentence.keep, device=device)
        loss = masked_kl_loss(teacher_logits, student_logits, keep, cfg.entity_temperature)
        return loss, {"student_tokens": int(keep.sum()), "teacher_tokens": len(item.definition_ids) + len(sentence) if item.step == 0 else 0}
