"""Real-model checks on SmolLM2-135M-Instruct (slow): generation parity with transformers, a tiny suite run."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from ctxdistill.models import load_model, load_tokenizer

    return load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")


def test_batched_generation_matches_transformers_greedy(real):
    from ctxdistill.generation.decoding import Decoding, generate
    from ctxdistill.evaluate.probes import chat_prompt_ids

    model, tokenizer = real
    prompts = [chat_prompt_ids(tokenizer, p) for p in ["hi", "What is the capital of France and why is it famous?", "Write a python function that adds two numbers."]]
    ours = generate(model, tokenizer, prompts, Decoding(max_new_tokens=16), batch_size=3)
    for p, (c,) in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        assert c.tokens and c.tokens == ref[: len(c.tokens)], "a non-empty prefix of transformers' greedy output"
    assert "Paris" in ours[1][0].text


def test_tiny_suite_on_the_real_model(real, tmp_path):
    from ctxdistill.evaluate.suite import EvalConfig, evaluate_model

    model, tokenizer = real
    cfg = EvalConfig(out=str(tmp_path), n_probes=3, n_ifeval=3, n_gsm8k=2, n_humaneval=2, n_nq_open=4, n_mmlu=8, n_pubmedqa=4,
                     ifeval_max_new_tokens=48, tasks="knowledge,ifeval,gsm8k,humaneval,nq_open,mmlu,pubmedqa,drift")
    report = evaluate_model(model, tokenizer, cfg, log=lambda *_: None)
    m = report["metrics"]
    assert m["knowledge.mcq_parse_rate"]["value"] > 0.5  # the model answers with a parsable letter most of the time
    assert m["drift.chat_kl"]["value"] == 0.0 and m["drift.chat_logprob"]["value"] < 0
    assert -5 < m["mmlu.gold_logprob"]["value"] < 0
    assert report["role"] == "baseline"
