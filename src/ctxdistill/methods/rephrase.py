"""FT+Rephrase (a DiSC paper baseline): fine-tune on the model's own paraphrases of each document.

The initial model rewrites each document through its own chat template (system "You are a helpful
writing assistant.", the authors' KUP user prompt, T = 1.0, top-p 0.95, one sample), then the
student is fine-tuned with next-token CE on the paraphrases instead of the raw text. The DiSC paper
cites this baseline as "self-distillation fine-tuning" (Yang et al. 2024); it is not SDFT, the
on-policy method of arXiv 2601.19897 (`--method sdft`). Paraphrases are cached on disk (keyed by
model, prompt and sampling settings) and written to OUT/generations.jsonl. The authors' example
learning rate is 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..generation.cache import GenerationCache, cache_dir
from ..generation.sampling import GenerationStats, chat_ids, sample_cached, stop_token_ids
from ..inputs.corpus import Document
from ..options import opt, require
from .base import PrepareContext, PreparedCorpus, register
from .ft import FineTune, token_windows

INPUT_FORMAT = "documents: one text per record (JSONL field `text`, or .txt files); the model paraphrases each one"
DEFAULT_REPHRASE_PROMPT = "Below is a article. Rewrite it in your own words  \n\n{document}\n\nContinuation:"


@dataclass
class RephraseConfig:
    """rephrase options"""

    rephrase_prompt: str = opt(DEFAULT_REPHRASE_PROMPT, "rephrase: user message; {document} is replaced by the document (the authors' KUP prompt, verbatim)")
    rephrase_temperature: float = opt(1.0, "rephrase: sampling temperature (0 = greedy)")
    rephrase_max_new_tokens: int = opt(2048, "rephrase: longest paraphrase in tokens")

    def validate(self) -> None:
        require(self, ("rephrase_temperature",), lambda v: v >= 0, ">= 0")
        require(self, ("rephrase_max_new_tokens",), lambda v: v >= 1, ">= 1")
        require(self, ("rephrase_prompt",), lambda v: "{document}" in v, "a template containing {document}")


def document_prompts(tokenizer, documents, system: str, template: str) -> list[list[int]]:
    """Chat-template prompt ids: optional system message, then the user template with {document} filled in."""
    prompts = []
    for doc in documents:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": template.replace("{document}", doc.text)})
        prompts.append(chat_ids(tokenizer, messages))
    return prompts


def generate_for_documents(ctx: PrepareContext, documents, *, kind: str, template: str, temperature: float,
                           max_new_tokens: int, top_k: int = 0):
    """One sampled reply per document (cached); returns (replies as Generated, GenerationStats)."""
    cfg = ctx.cfg
    prompts = document_prompts(ctx.tokenizer, documents, cfg.rephrase_system, template)
    settings = {"kind": kind, "temperature": temperature, "top_p": cfg.gen_top_p, "top_k": top_k,
                "max_new_tokens": max_new_tokens, "seed": cfg.seed, "precision": cfg.precision}
    stats = GenerationStats()
    with GenerationCache(cache_dir(cfg.gen_cache), cfg.model, settings) as cache:
        outputs = sample_cached(ctx.model, prompts, cache, stats, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(ctx.tokenizer),
                                pad_id=ctx.pad_id, temperature=temperature, top_p=cfg.gen_top_p, top_k=top_k, seed=cfg.seed,
                                batch_size=cfg.gen_batch_size, precision=cfg.precision, progress=ctx.progress, desc=kind)
    stats.extra = {"settings": settings, "cache_file": str(cache.path) if cache.path else None}
    return outputs, stats


def write_generations(ctx: PrepareContext, rows: list[dict], stats: GenerationStats) -> None:
    """OUT/generations.jsonl (main process, when there is an OUT), named in run.json's generation block."""
    from ..files import confined, write_jsonl_atomic

    if ctx.out_dir is not None:
        path = confined(ctx.out_dir, "generations.jsonl")
        write_jsonl_atomic(path, rows)
        stats.extra["file"] = str(path)


@register
class Rephrase(FineTune):
    name = "rephrase"
    input_format = INPUT_FORMAT
    config_class = RephraseConfig

    def prepare(self, documents, ctx: PrepareContext) -> PreparedCorpus:
        c = self.config
        outputs, stats = generate_for_documents(ctx, documents, kind="rephrase", template=c.rephrase_prompt,
                                                temperature=c.rephrase_temperature, max_new_tokens=c.rephrase_max_new_tokens)
        paraphrases, empty, rows = [], [], []
        for doc, out in zip(documents, outputs):
            text = ctx.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
            rows.append({"id": doc.id, "source": doc.text, "generation": text, "tokens": len(out.tokens), "finished": out.stopped})
            if text:
                paraphrases.append(Document(doc.id, text))
            else:
                empty.append(doc.id)
        write_generations(ctx, rows, stats)
        stats.extra["unfinished"] = sum(not r["finished"] for r in rows)
        ctx.log(f"rephrase: {len(paraphrases)} paraphrases in {stats.seconds:.1f} s ({stats.cached} from the cache)")
        prepared = token_windows(paraphrases, ctx.tokenizer, self.cfg.max_length)
        prepared.skipped["empty-paraphrase"] = empty
        prepared.generation = stats.to_dict()
        return prepared
