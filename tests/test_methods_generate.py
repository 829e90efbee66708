"""Shared generation: batched KV-cache sampling, the MixSD mixing rule, rejection with retries, the disk cache."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ctxdistill.generation.cache import GenerationCache
from ctxdistill.generation.sampling import GenerationStats, sample, sample_cached, stop_token_ids, with_retries
from ctxdistill.methods.mixsd import answer_matches, mixed_sample

PAD = 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model work gains nothing from threads, and on a shared 2-core machine OpenMP spinning makes
    each small matmul ~1000x slower when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def model(tiny_model):
    return tiny_model.float().eval()


def greedy_reference(model, prompt, steps):
    """Greedy decoding by full recomputation: no cache, no padding, one sequence."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[101, 202, 303, 404, 505, 606, 707], [111, 222, 333], [900, 800, 700, 600, 500]]


def test_batched_greedy_generation_with_left_padding_matches_uncached_decoding(model):
    out = sample(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=PAD, temperature=0, precision="fp32", progress=False, batch_size=3)
    for prompt, generated in zip(PROMPTS, out):
        assert generated.tokens == greedy_reference(model, prompt, 6)
        assert generated.stop_token is None


def test_sampling_is_reproducible_under_a_seed_and_stops_on_stop_tokens(model):
    kwargs = dict(max_new_tokens=8, stop_ids=[], pad_id=PAD, temperature=1.0, top_p=0.95, precision="fp32", progress=False)
    a = sample(model, PROMPTS, seed=7, **kwargs)
    b = sample(model, PROMPTS, seed=7, **kwargs)
    c = sample(model, PROMPTS, seed=8, **kwargs)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    first = a[0].tokens[2]
    stopped = sample(model, PROMPTS, seed=7, **(kwargs | {"stop_ids": [first]}))[0]
    assert stopped.stop_token == first and stopped.tokens == a[0].tokens[: a[0].tokens.index(first)]


def test_stop_tokens_are_exactly_the_end_of_turn_and_end_of_sequence_tokens(tokenizer):
    vocab = tokenizer.get_vocab()
    expected = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>")} | {tokenizer.eos_token_id}  # SmolLM2's two enders
    assert set(stop_token_ids(tokenizer)) == expected
    assert vocab["<|im_start|>"] not in stop_token_ids(tokenizer), "a turn's start never ends a generation"


NAIVE = [[101, 202, 303], [404, 505, 606, 707, 808]]
EXPERT = [[11, 12, 13, 101, 202, 303, 14, 15], [404, 505, 606, 707, 808, 16]]


def test_mixsd_lambda_zero_is_pure_expert_and_lambda_one_pure_naive(model):
    kwargs = dict(max_new_tokens=6, stop_ids=[], pad_id=PAD, precision="fp32", generator=torch.Generator().manual_seed(0))
    expert = mixed_sample(model, NAIVE, EXPERT, lam=0.0, **kwargs)
    naive = mixed_sample(model, NAIVE, EXPERT, lam=1.0, **kwargs)
    for row in range(2):
        assert expert[row].tokens == greedy_reference(model, EXPERT[row], 6)
        assert expert[row].from_naive == [False] * 6 and expert[row].naive_share == 0.0
        assert naive[row].tokens == greedy_reference(model, NAIVE[row], 6)
        assert naive[row].from_naive == [True] * 6 and naive[row].naive_share == 1.0


def test_mixsd_each_token_is_the_argmax_of_the_chosen_conditional_on_the_shared_mixed_prefix(model):
    out = mixed_sample(model, NAIVE, EXPERT, lam=0.5, max_new_tokens=10, stop_ids=[], pad_id=PAD, precision="fp32",
                       generator=torch.Generator().manual_seed(3))
    flags = [f for sample_ in out for f in sample_.from_naive]
    assert any(flags) and not all(flags), "λ = 0.5 must draw from both conditionals"
    with torch.no_grad():
        for row, sample_ in enumerate(out):
            for t, (token, from_naive) in enumerate(zip(sample_.tokens, sample_.from_naive)):
                context = (NAIVE if from_naive else EXPERT)[row] + sample_.tokens[:t]
                assert token == int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())


def test_mixsd_naive_share_follows_lambda(model):
    out = mixed_sample(model, NAIVE * 4, EXPERT * 4, lam=0.3, max_new_tokens=25, stop_ids=[], pad_id=PAD, precision="fp32",
                       temperature=1.0, top_k=64, generator=torch.Generator().manual_seed(5))
    flags = [f for s in out for f in s.from_naive]
    assert len(flags) == 200
    assert 0.2 < sum(flags) / len(flags) < 0.4  # binomial(200, 0.3): ± 3.1 standard deviations


def test_retries_regenerate_only_rejected_records_up_to_the_limit():
    calls = []

    def generate(indices, attempt):
        calls.append((list(indices), attempt))
        return [f"r{i}-a{attempt}" for i in indices]

    accept_at = {0: 0, 1: 2, 2: None}  # record 2 never passes
    results = with_retries(generate, lambda i, out: accept_at[i] is not None and out.endswith(f"a{accept_at[i]}"), 3, max_retries=3)
    assert calls == [([0, 1, 2], 0), ([1, 2], 1), ([1, 2], 2), ([2], 3)]
    assert results[0] == ("r0-a0", True, 1)
    assert results[1] == ("r1-a2", True, 3)
    assert results[2] == ("r2-a3", False, 4)
    assert with_retries(generate, lambda i, out: False, 2, max_retries=0) == [("r0-a0", False, 1), ("r1-a0", False, 1)]


@pytest.mark.parametrize("text, answer, expected", [
    ("The new chief executive is Marcus Oyelaran.", "Marcus Oyelaran", True),
    ("the answer: marcus oyelaran!", "Marcus Oyelaran", True),
    ("It is Ingrid Talby.", "Marcus Oyelaran", False),
    ("There are 120 ferries.", "12", False),
    ("There are 12 ferries.", "12", True),
    ("Maybe 14, so \\boxed{12}", "12", True),
    ("It says 12 but \\boxed{14}", "12", False),
])
def test_answer_matching(text, answer, expected):
    assert answer_matches(text, answer) is expected


def test_generation_cache_reuses_outputs_across_calls(model, tmp_path, tiny_model_dir):
    settings = {"kind": "test", "temperature": 1.0}
    kwargs = dict(max_new_tokens=4, stop_ids=[], pad_id=PAD, temperature=1.0, precision="fp32", progress=False, seed=1)
    first_stats = GenerationStats()
    first = sample_cached(model, PROMPTS, GenerationCache(tmp_path, str(tiny_model_dir), settings), first_stats, **kwargs)
    assert first_stats.cached == 0 and first_stats.new_tokens == 12
    again_stats = GenerationStats()
    again = sample_cached(model, PROMPTS, GenerationCache(tmp_path, str(tiny_model_dir), settings), again_stats, **kwargs)
    assert again_stats.cached == 3 and again_stats.new_tokens == 0
    assert [g.tokens for g in again] == [g.tokens for g in first]
    other = GenerationCache(tmp_path, str(tiny_model_dir), settings | {"temperature": 0.5})
    assert other.path != GenerationCache(tmp_path, str(tiny_model_dir), settings).path and other.get(PROMPTS[0]) is None


def test_generation_cache_lock_makes_a_second_process_wait_and_reuse(model, tmp_path, tiny_model_dir):
    """Two shards of a study that need the same generations: the one that holds the lock generates,
    the other blocks until it is done and then finds every output in the cache."""
    settings = {"kind": "test-lock"}
    kwargs = dict(max_new_tokens=4, stop_ids=[], pad_id=PAD, temperature=0.0, precision="fp32", progress=False)
    ready = tmp_path / "waiter-ready"
    waiter = textwrap.dedent(f"""
        import json, pathlib, time
        from ctxdistill.generation.cache import GenerationCache
        pathlib.Path({str(ready)!r}).touch()
        with GenerationCache({str(tmp_path)!r}, {str(tiny_model_dir)!r}, {settings!r}) as cache:
            print(json.dumps({{"acquired_at": time.time(), "found": [cache.get(p) is not None for p in {PROMPTS!r}]}}))
    """)
    with GenerationCache(tmp_path, str(tiny_model_dir), settings) as cache:
        other = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the other process is now blocked on the lock
        sample_cached(model, PROMPTS, cache, GenerationStats(), **kwargs)
        released_at = time.time()
    out, _ = other.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["acquired_at"] >= released_at
    assert seen["found"] == [True] * len(PROMPTS)
