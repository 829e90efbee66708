"""Real-model tests on the embedded SmolLM2-135M-Instruct (marked slow; CI runs them after the unit tests)."""

import json

import pytest
import torch

from ctxdistill.config import TrainConfig
from ctxdistill.training import train

pytestmark = pytest.mark.slow


def test_embedded_default_is_a_chat_model_with_the_expected_shape(tokenizer):
    from ctxdistill.models import load_model

    model = load_model("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    embeddings = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr(), "tied LM head, as SmolLM2"
    assert embeddings.shape == (len(tokenizer), model.config.hidden_size)


def test_a_few_disc_steps_on_the_real_model(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig.create(method="disc", corpus="bundled:news_updates", out=str(tmp_path / "disc"), lr=3e-5, max_steps=3)
    result = train(cfg, progress=False)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "disc" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < l < 50 for l in losses)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disc" / "model")
    ids = torch.tensor([[504, 3575, 282]])
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)


def test_single_pass_teacher_matches_per_split_on_the_real_model(tokenizer):
    import random

    from ctxdistill.inputs.corpus import load_corpus
    from ctxdistill.methods.disc import per_split_teacher_logits, single_pass_teacher_logits
    from ctxdistill.models import load_model
    from ctxdistill.inputs.segment import choose_spans, segment_document

    model = load_model("smollm2-135m-instruct")
    docs, _ = load_corpus("bundled:news_updates")
    [doc] = segment_document(docs[0].id, docs[0].text, tokenizer)
    spans = choose_spans(doc, "sentence_boundary", random.Random(0))
    with torch.no_grad():
        one = single_pass_teacher_logits(model, doc.token_ids, spans, "cpu")
        each = per_split_teacher_logits(model, doc.token_ids, spans, "cpu")
    torch.testing.assert_close(one, each, rtol=1e-4, atol=1e-4)


def test_ft_from_the_cli_on_the_real_model(tmp_path):
    from ctxdistill.cli import main

    out = tmp_path / "ft"
    assert main(["train", "--method", "ft", "--lr", "3e-5", "--max-steps", "2", "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["steps"] == 2 and (out / "model" / "model.safetensors").is_file()
