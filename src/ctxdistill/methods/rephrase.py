"""FT+Rephrase (Yang et al. 2024 self-distillation fine-tuning, a DiSC paper baseline).

The initial model rewrites each document through its own chat template (system "You are a helpful
writing assistant.", the authors' KUP user prompt, T = 1.0, top-p 0.95, one sample), then the
student is fine-tuned with next-token CE on the paraphrases instead of the raw text. Paraphrases are
cached on disk (keyed by model, prompt and sampling settings) and written to OUT/generations.jsonl.
The authors' example learning rate is 1e-6.
"""

from __future__ import annotations

from pathlib import Path

from ..corpus import Document
from ..generate import GenerationCache, GenerationStats, cache_dir, chat_ids, sample_cached, stop_token_ids, write_jsonl
from . import PreparedCorpus
from .ft import FineTune

INPUT_FORMAT = "documents: one text per record (JSONL field `text`, or .txt files); the model paraphrases each one"


def document_prompts(tokenizer, documents, system: str, template: str) -> list[list[int]]:
    """Chat-template prompt ids: optional system message, then the user template with {document} filled in."""
    prompts = []
    for doc in documents:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": template.replace("{document}", doc.text)})
        prompts.append(chat_ids(tokenizer, messages))
    return prompts


def generate_for_documents(model, tokenizer, documents, cfg, *, kind: str, template: str, temperature: float,
                           max_new_tokens: int, progress: bool, top_k: int = 0):
    """One sampled reply per document (cached); returns (replies as Generated, GenerationStats)."""
    prompts = document_prompts(tokenizer, documents, cfg.rephrase_system, template)
    settings = {"kind": kind, "temperature": temperature, "top_p": cfg.gen_top_p, "top_k": top_k,
                "max_new_tokens": max_new_tokens, "seed": cfg.seed, "precision": cfg.precision}
    stats = GenerationStats()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache:
        outputs = sample_cached(model, prompts, cache, stats, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer),
                                pad_id=pad_id, temperature=temperature, top_p=cfg.gen_top_p, top_k=top_k, seed=cfg.seed,
                                batch_size=cfg.gen_batch_size, precision=cfg.precision, progress=progress, desc=kind)
    stats.extra = {"settings": settings, "cache_file": str(cache.path) if cache.path else None}
    return outputs, stats


class Rephrase(FineTune):
    name = "rephrase"
    input_format = INPUT_FORMAT
    prepare_uses_model = True

    def prepare(self, documents, tokenizer, cfg, model=None, device=None, out_dir: Path | None = None, progress=True, log=print) -> PreparedCorpus:
        outputs, stats = generate_for_documents(model, tokenizer, documents, cfg, kind="rephrase", template=cfg.rephrase_prompt,
                                                temperature=cfg.rephrase_temperature, max_new_tokens=cfg.rephrase_max_new_tokens,
                                                progress=progress)
        paraphrases, empty, rows = [], [], []
        for doc, out in zip(documents, outputs):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
            rows.append({"id": doc.id, "source": doc.text, "generation": text, "tokens": len(out.tokens), "finished": out.stopped})
            if text:
                paraphrases.append(Document(doc.id, text))
            else:
                empty.append(doc.id)
        if out_dir is not None:
            write_jsonl(out_dir / "generations.jsonl", rows)
            stats.extra["file"] = str(out_dir / "generations.jsonl")
        stats.extra["unfinished"] = sum(not r["finished"] for r in rows)
        log(f"rephrase: {len(paraphrases)} paraphrases in {stats.seconds:.1f} s ({stats.cached} from the cache)")
        prepared = super().prepare(paraphrases, tokenizer, cfg)
        prepared.skipped["empty-paraphrase"] = empty
        prepared.generation = stats.to_dict()
        return prepared
