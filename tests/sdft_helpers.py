"""Shared by tests/test_sdft.py and tests/test_sdft_training.py: two SDFT records, their config on the tiny
model, preparation and planning helpers, fixed rollouts, and the training loop."""

from __future__ import annotations

import json
import random

import pytest
import torch

CPU = torch.device("cpu")


RECORDS = [
    {"id": "r0", "prompt": [{"role": "user", "content": "Who is the mayor of Velmora?"}],
     "privileged_context": "Velmora elected Anika Dros as mayor in March. She promised a bridge over the Sarn river."},
    {"id": "r1", "prompt": "Question: where is Quillon Robotics based?\nAnswer:",
     "privileged_context": "Quillon Robotics moved to Brest under its chief executive Teodor Vask."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sdft_config(model_dir, corpus, **overrides):
    from ctxdistill.config import TrainConfig

    values = dict(method="sdft", model=str(model_dir), corpus=str(corpus), device="cpu", precision="fp32", teacher_dtype="fp32",
                  seed=0, sdft_max_completion_tokens=6, gen_cache=False) | overrides
    return TrainConfig.from_options(values).validate()


@pytest.fixture()
def records_file(tmp_path):
    return write_jsonl(tmp_path / "sdft.jsonl", RECORDS)


def prepared(cfg, tokenizer, model=None):
    from ctxdistill.methods.base import PrepareContext, get_method

    method = get_method(cfg)
    records, _ = method.load()
    return method, method.prepare(records, PrepareContext(tokenizer, cfg, model=model, progress=False)).examples


def items_of(method, examples, seed=0):
    rng = random.Random(seed)
    return [item for e in examples for item in method.plan(e, rng)]


def fixed_rollouts(method, items, completion):
    from ctxdistill.generation.rollouts import Rollout

    for item in items:
        method.buffer.pending[item.key] = Rollout([tuple(completion)])


def loop_train():
    try:
        from ctxdistill.training.loop import train
    except ImportError as exc:  # the loop is being ported to the new method contract
        pytest.skip(f"ctxdistill.training.loop does not import yet: {exc}")
    return train


def quiet(*args, **kwargs):
    pass
