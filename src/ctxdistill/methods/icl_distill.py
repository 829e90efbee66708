"""In-context-example distillation (Upadhayaya et al., "Efficient LLM Context Distillation", arXiv 2409.01930).

Input: a pool of {prompt, answer} examples. For every example used as the query, `icl_k`
demonstrations are drawn (per epoch, seeded) from the rest of the pool. The teacher is the frozen
initial model reading the demonstrations followed by the query; the student (a LoRA adapter by
default, as in the paper) reads the query alone; the loss is the forward KL(teacher ‖ student) at
temperature `icl_temperature` over the answer tokens, plus `icl_ce_weight` × CE on the gold answer.

`icl_format chat` lays the demonstrations out as earlier chat turns (user: prompt, assistant: answer)
for post-trained models; `plain` writes "prompt\\nanswer" blocks separated by blank lines, the
pattern-style prompts the paper used with base OPT models. The answer in chat format ends with the
end-of-turn token, which is distilled too. The paper's hyperparameters beyond LoRA + KL are not
known; lr around 1e-4 is a common LoRA choice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import CtxDistillError
from ..generation.sampling import chat_ids
from ..inputs.records import load_checked_records
from ..losses import distill_with_ce
from ..options import opt, positive_finite, require
from .base import LossOutput, Method, PrepareContext, PreparedCorpus, register

INPUT_FORMAT = "example pool: JSONL with `prompt` and `answer` (at least 2 records); example bundled:icl_pool"


@dataclass
class IclDistillConfig:
    """icl_distill options"""

    icl_k: int = opt(4, "icl_distill: demonstrations in the teacher's context")
    icl_temperature: float = opt(1.0, "icl_distill: distillation temperature")
    icl_ce_weight: float = opt(0.0, "icl_distill: weight of CE on the gold answer added to the KL")
    icl_format: str = opt("chat", "icl_distill: chat = demonstrations as chat turns; plain = 'prompt\\nanswer' blocks", ("chat", "plain"))

    def validate(self) -> None:
        require(self, ("icl_k",), lambda v: v >= 1, ">= 1")
        require(self, ("icl_temperature",), positive_finite, "a finite number > 0")
        require(self, ("icl_ce_weight",), lambda v: v >= 0, ">= 0")


@dataclass(frozen=True)
class IclExample:
    doc_id: str
    index: int


@dataclass(frozen=True)
class IclItem:
    doc_id: str
    teacher_ids: tuple[int, ...]
    student_ids: tuple[int, ...]
    answer_len: int  # the last `answer_len` tokens of both sequences are the answer


def answer_ids(tokenizer, answer: str, fmt: str) -> list[int]:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if fmt == "chat" else ids


def query_prefix(tokenizer, demos: list[tuple[str, str]], prompt: str, fmt: str) -> list[int]:
    """Tokens before the answer: the demonstrations (possibly none), then the query."""
    if fmt == "chat":
        messages = []
        for p, a in demos:
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        return chat_ids(tokenizer, messages + [{"role": "user", "content": prompt}])
    text = "".join(f"{p}\n{a}\n\n" for p, a in demos) + f"{prompt}\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def icl_item(tokenizer, pool: list, query: int, demos: list[int], fmt: str, max_length: int) -> IclItem:
    """Teacher and student sequences for one query; demonstrations are dropped from the end until the
    teacher sequence fits in `max_length`."""
    record = pool[query]
    answer = answer_ids(tokenizer, record["answer"], fmt)
    student = query_prefix(tokenizer, [], record["prompt"], fmt) + answer
    demos = list(demos)
    while True:
        teacher = query_prefix(tokenizer, [(pool[d]["prompt"], pool[d]["answer"]) for d in demos], record["prompt"], fmt) + answer
        if len(teacher) <= max_length or not demos:
            break
        demos.pop()
    return IclItem(record.id, tuple(teacher), tuple(student), len(answer))


@register
class IclDistill(Method):
    name = "icl_distill"
    input_format = INPUT_FORMAT
    config_class = IclDistillConfig
    default_student = "lora"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pool: list = []
        self.tokenizer = None

    def needs_teacher(self) -> bool:
        return True

    def load(self):
        cfg = self.cfg
        records, report = load_checked_records(cfg.corpus, "icl_distill", {"prompt": "str", "answer": "str"},
                                               input_format=INPUT_FORMAT, example="bundled:icl_pool", id_field=cfg.id_field)
        if len(records) < 2:
            raise CtxDistillError(f"icl_distill needs at least 2 examples in {cfg.corpus} (demonstrations come from the rest of the pool)")
        return records, report

    def prepare(self, records, ctx: PrepareContext) -> PreparedCorpus:
        if self.config.icl_format == "chat" and not ctx.tokenizer.chat_template:
            raise CtxDistillError("icl_format chat needs a tokenizer with a chat template; pass --icl-format plain")
        self.pool, self.tokenizer = list(records), ctx.tokenizer
        return PreparedCorpus([IclExample(r.id, i) for i, r in enumerate(records)])

    def plan(self, example: IclExample, rng: random.Random) -> list:
        c = self.config
        others = [i for i in range(len(self.pool)) if i != example.index]
        demos = rng.sample(others, min(c.icl_k, len(others)))
        return [icl_item(self.tokenizer, self.pool, example.index, demos, c.icl_format, self.cfg.max_length)]

    def loss(self, student, teacher, item: IclItem, device) -> LossOutput:
        c = self.config
        n = item.answer_len
        keep = n + 1  # positions from the one before the answer: their logits predict the answer tokens
        teacher_logits = teacher(input_ids=torch.tensor([item.teacher_ids], device=device), logits_to_keep=keep, use_cache=False).logits[0, :-1]
        student_logits = student(input_ids=torch.tensor([item.student_ids], device=device), logits_to_keep=keep, use_cache=False).logits[0, :-1]
        targets = torch.tensor(item.student_ids[-n:], device=device)
        mask = torch.ones(n, dtype=torch.bool, device=device)
        loss, kl, ce = distill_with_ce(teacher_logits, student_logits, mask, targets, c.icl_temperature, c.icl_ce_weight)
        return LossOutput(loss, n, len(item.teacher_ids), metrics={"kl": kl.item(), "ce": ce.item()})
