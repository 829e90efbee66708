"""The fast check during training (`--eval-every N`) and the forgetting budget (`--stop-at-drift X`).

The check is the retention suite's chat drift, made small: the INITIAL model's greedy replies to the
first `--eval-prompts` bundled held-out chat prompts (never trained on) are generated once, before
training, together with its full-vocabulary logits on them; every N steps the student is
teacher-forced on the same replies and the per-token KL(initial || student) is averaged over reply
tokens (nats/token; its standard error across prompts alongside). With `--eval-probes FILE`, the
first `--eval-probe-limit` multiple-choice probes are scored by option log-likelihood as well.

Resume-safe: the replies and reference logits are regenerated from the initial weights at setup
(greedy, so identical every time), before a checkpoint's weights are loaded; the check runs in eval
mode (no dropout) inside a forked RNG, so it never moves the training's random streams: a run with
`--eval-every` trains exactly as one without it.

`--stop-at-drift X`: every check under X writes a checkpoint (the "good" steps are kept in run.json and
in every checkpoint); the first check over X ends the run, and the model saved is the latest
checkpoint whose drift was under X (the initial model when the very first check is over X). run.json
`stopped_at_drift` records the step stopped at, its drift, the step kept and why.
"""

from __future__ import annotations

import contextlib
import random

import torch

from ..errors import CtxDistillError
from ..runtime import autocast


@contextlib.contextmanager
def isolated(model):
    """Eval mode and a forked RNG (python, torch CPU and CUDA): the check leaves training as it found it."""
    was_training = model.training
    python_state = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            random.setstate(python_state)


class DriftCheck:
    """The reference (initial model) replies and logits, and the check of the current student."""

    def __init__(self, cfg, model, tokenizer, device, say=print):
        from ..evaluate.drift import greedy_responses, load_chat_prompts
        from ..evaluate.probes import chat_prompt_ids, load_probes

        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        prompts = load_chat_prompts()[: cfg.eval_prompts]
        self.probes = []
        if cfg.eval_probes:
            probes = [p for p in load_probes(cfg.eval_probes) if p.is_mcq]
            self.probes = probes[: cfg.eval_probe_limit] if cfg.eval_probe_limit else probes
            if not self.probes:
                raise CtxDistillError(f"--eval-probes {cfg.eval_probes}: no multiple-choice probe to score")
        with isolated(model):
            replies = greedy_responses(model, tokenizer, prompts, cfg.eval_max_new_tokens, batch_size=8)
            self.items = [(chat_prompt_ids(tokenizer, p), r) for p, r in zip(prompts, replies) if r]
            self.reference = [self.reply_logits(model, p, r) for p, r in self.items]
        if not self.items:
            raise CtxDistillError("--eval-every: the initial model gave only empty replies to the held-out prompts; raise --eval-max-new-tokens")
        say(f"eval-every {cfg.eval_every}: drift KL on {len(self.items)} held-out prompts "
            f"({sum(len(r) for _, r in self.items)} reply tokens)" + (f", {len(self.probes)} probes" if self.probes else ""))

    def reply_logits(self, model, prompt: list[int], reply: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + reply], device=self.device)
        with autocast(self.device, self.cfg.precision):
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : len(prompt) + len(reply) - 1]
        return logits.float()

    def run(self, model) -> dict:
        """{"eval_chat_kl", "eval_chat_kl_se", "eval_chat_logprob"[, "eval_probe_acc", "eval_probe_gold_logprob"]}."""
        from ..evaluate.scoring import mean_and_se
        from ..losses import forward_kl_per_position

        per_prompt, tokens, logprobs = [], [], []
        with isolated(model):
            for (prompt, reply), reference in zip(self.items, self.reference):
                logits = self.reply_logits(model, prompt, reply)
                per_prompt.append(forward_kl_per_position(reference, logits).mean().item())
                logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(reply, device=logits.device)[:, None])
                logprobs.append(logp.mean().item())
                tokens.append(len(reply))
            out = {"eval_chat_kl": sum(v * n for v, n in zip(per_prompt, tokens)) / sum(tokens),
                   "eval_chat_kl_se": mean_and_se(per_prompt)[1],
                   "eval_chat_logprob": sum(v * n for v, n in zip(logprobs, tokens)) / sum(tokens)}
            if self.probes:
                from ..evaluate.probes import score_mcq_loglik

                with autocast(self.device, self.cfg.precision):
                    scored = score_mcq_loglik(model, self.tokenizer, self.probes, batch_size=8)
                out |= {"eval_probe_acc": scored["accuracy"], "eval_probe_gold_logprob": scored["mean_gold_logprob"]}
        return out
