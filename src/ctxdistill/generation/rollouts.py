"""On-policy rollouts (SDFT): a per-row seeded sampler with a KV cache, the buffer that keeps rollouts drawn
ahead for a window of steps until they are trained on (and through a checkpoint), and prompt + completion
batches for scoring them.

- `sample_rows`: one left-padded batch, row i drawing from its own generator seeded with `seeds[i]` (one
  uniform per row and token, inverse CDF), so a row's rollout is the same whatever else shares its batch or
  process, and the run's RNG is untouched (`sampling.sample` goes through `model.generate` instead).
- `RolloutBuffer`: which items of a window still need drawing, the drawn rollouts until taken, and their
  JSON state for `Method.state_dict`.
- `sequence_batch`, `completion_logprobs`: right-padded prompt + completion rows and log π(y_t) of each token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime import autocast
from .sampling import cache_argument, cut_at_stop, left_pad, positions_from_mask


# -- sampling ---------------------------------------------------------------------------------------------


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


@torch.no_grad()
def sample_rows(model, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int, stop_ids, pad_id: int,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, precision: str = "bf16") -> list[tuple[list[int], int | None]]:
    """(tokens before the stop token, the stop token or None) per prompt: one left-padded batch with a KV cache,
    row i drawing from its own generator seeded with `seeds[i]` (one uniform per row and step), so a row's
    rollout is the same whatever else shares the batch, and the run's RNG is untouched."""
    from transformers import DynamicCache

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


# -- the buffer ------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    completions: list[tuple[int, ...]]  # the end-of-turn token kept when the rollout stopped (as TRL)
    old_logprobs: list[torch.Tensor] | None = None  # per completion token, at drawing time (for the IS correction)


@dataclass(eq=False)
class RolloutWindow:
    """The items of consecutive steps whose rollouts are drawn together, once."""

    items: list = field(default_factory=list)
    rollouts: dict = field(default_factory=dict)  # item key -> Rollout, removed once trained on
    drawn: set = field(default_factory=set)  # keys of the items whose rollouts were drawn (or restored)


class RolloutBuffer:
    """Rollouts drawn but not trained on yet. Items have `key` (stable across runs), `position` (in the epoch's
    order) and `window`; `mine(window)` is the window's items this process trains on."""

    def __init__(self):
        self.pending: dict = {}  # key -> Rollout restored from a checkpoint, used before drawing anew
        self.open_windows: dict[int, RolloutWindow] = {}  # windows holding rollouts not trained on yet

    def missing(self, items: list, mine) -> list:
        """The items to draw now: every item of `items`' windows from the first of `items` on that has no rollout
        (items come in epoch order; a resumed run starts mid-window). Restored rollouts are put in place."""
        todo = []
        for item in items:
            for other in mine(item.window) + [item]:
                if other.position < item.position or other.key in other.window.drawn and other is not item or other in todo:
                    continue
                if other.key in self.pending:
                    self.put(other, self.pending.pop(other.key))
                elif other.key not in other.window.rollouts:
                    todo.append(other)
        return todo

    def put(self, item, rollout: Rollout) -> None:
        item.window.rollouts[item.key] = rollout
        item.window.drawn.add(item.key)
        self.open_windows[id(item.window)] = item.window

    def take(self, items: list) -> list[Rollout]:
        taken = [item.window.rollouts.pop(item.key) for item in items]
        self.open_windows = {k: w for k, w in self.open_windows.items() if w.rollouts}
        return taken

    def state(self) -> dict:
        """The rollouts not trained on yet as JSON (floats round-trip exactly): {"doc_id\tseed": {...}}."""
        return {f"{k[0]}\t{k[1]}": {"completions": [list(t) for t in r.completions],
                                     "old_logprobs": [o.tolist() for o in r.old_logprobs] if r.old_logprobs else None}
                for w in self.open_windows.values() for k, r in w.rollouts.items()}

    def restore(self, state: dict) -> None:
        for key, value in state.items():
            doc_id, seed = key.rsplit("\t", 1)
            olds = value.get("old_logprobs")
            self.pending[(doc_id, int(seed))] = Rollout([tuple(t) for t in value["completions"]],
                                                        [torch.tensor(o) for o in olds] if olds else None)


# -- scoring them -------------------------------------------------------------------------------------------


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


def completion_logprobs(model, batch: SequenceBatch, temperature: float, chunk_size: int) -> torch.Tensor:
    """log π(y_t) of each kept token (`batch.targets`) under `model`, logits / temperature, without a
    [tokens, vocab] tensor when the model's logits are hidden @ head.T."""
    from ..losses import chunked_token_logprobs
    from ..models import final_hidden_states, plain_lm_head

    if not plain_lm_head(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention, use_cache=False).logits[batch.keep]
        return torch.log_softmax(logits.float() / temperature, -1).gather(-1, batch.targets[:, None])[:, 0]
    hidden = final_hidden_states(model, input_ids=batch.input_ids, attention_mask=batch.attention, use_cache=False)[batch.keep]
    return chunked_token_logprobs(hidden, model.get_output_embeddings().weight, batch.targets, temperature, chunk_size)
