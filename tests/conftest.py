"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random-init Llama built from a config.

The tiny model (hidden 64, 2 layers, 4 heads / 2 KV heads, 49k vocab, 3.3 M params) runs a
forward+backward in about 0.1 s, so unit tests exercise the real code paths without real weights.
"""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from ctxdistill.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def perturbed_teacher(model, scale: float = 0.05):
    """A frozen teacher that differs from `model`: a copy with Gaussian noise added to every weight."""
    import copy

    from ctxdistill.teachers import Teacher

    teacher_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher_model.parameters():
            p.add_(scale * torch.randn_like(p))
    return Teacher(model=teacher_model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A save_pretrained directory (weights + tokenizer) that every loader path accepts."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_model(tokenizer):
    return tiny_llama(len(tokenizer))


NEWS = [
    ("Velmora elected Anika Dros as mayor in March. Anika Dros promised a new bridge over the Sarn river. "
     "The bridge will be 412 metres long. Work on the 412-metre bridge starts in May. "
     "Velmora residents welcomed Anika Dros and her bridge plan."),
    ("Quillon Robotics named Teodor Vask its chief executive. Teodor Vask moved the company to Brest. "
     "Quillon Robotics now employs 740 people in Brest. The 740 staff build warehouse robots. "
     "Teodor Vask said Brest was chosen for its port."),
]


@pytest.fixture()
def corpus_file(tmp_path):
    """A small JSONL corpus of multi-sentence news-style documents."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"doc-{i}", "text": t}) for i, t in enumerate(NEWS)) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def short_preset(monkeypatch):
    """The quick evaluation preset with 4-token generations, for sweeps and studies on the tiny model."""
    import ctxdistill.evaluate.suite as suite

    small = {k: (4 if k.endswith("tokens") else v) for k, v in suite.PRESETS["quick"].items()} | {"doc_max_length": 64}
    monkeypatch.setitem(suite.PRESETS, "quick", small)


EXTRA = [
    "Orla Vane opened a bakery in Tulm. The bakery sells rye bread. Orla Vane bakes 300 loaves a day. Tulm residents queue at dawn.",
    "The Kestrel ferry now sails to Brindle Isle. The ferry leaves at 7 a.m. daily. Tickets cost 12 crowns. The crossing takes 40 minutes.",
]


@pytest.fixture(scope="module")
def corpus4(tmp_path_factory):
    """Four news-style documents of different lengths (NEWS + EXTRA), for resume and multi-process runs."""
    path = tmp_path_factory.mktemp("corpus") / "corpus4.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(NEWS + EXTRA)), encoding="utf-8")
    return path


def quiet(*args, **kwargs) -> None:
    """A `log` that prints nothing."""


def cli_args(values: dict, out) -> list[str]:
    """`ctxdistill train` arguments for flat TrainConfig options."""
    args = ["train", "--out", str(out), "--quiet"]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args
