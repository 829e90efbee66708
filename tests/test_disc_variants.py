"""ctxdistill variants beyond the DiSC paper: context-sensitive positions, and chat retention through replay."""

import json
import random

import pytest
import torch

from ctxdistill.config import TrainConfig
from ctxdistill.inputs.corpus import bundled_path
from ctxdistill.errors import CtxDistillError
from ctxdistill.losses import (context_gain_mask, context_kl_per_position, forward_kl_per_position, renormalise_within_groups,
                               replay_loss, token_cross_entropy)
from ctxdistill.methods import PrepareContext, get_method
from ctxdistill.methods.disc import Disc, DiscItem
from ctxdistill.inputs.records import Record
from ctxdistill.methods.replay import ReplayExample, needs_response, replay_example
from ctxdistill.teachers import CachedTeacher
from ctxdistill.inputs.segment import choose_spans, segment_document
from ctxdistill.training import train

from conftest import NEWS, perturbed_teacher


@pytest.fixture()
def items(tokenizer):
    segmented = [segment_document(f"d{i}", text, tokenizer)[0] for i, text in enumerate(NEWS)]
    return [DiscItem(d, tuple(choose_spans(d, "sentence_boundary", random.Random(i), num_splits=3))) for i, d in enumerate(segmented)]


def by_hand(student, teacher, items, temperature):
    """Per document, per split point, with separate forward passes: (context KL, DiSC KL, weight, document) per position."""
    rows = []
    with torch.no_grad():
        for d, item in enumerate(items):
            ids = item.doc.token_ids
            for s, e in item.spans:
                with_prefix = teacher(input_ids=torch.tensor([ids[:e]])).logits[0, s : e - 1]
                alone = teacher(input_ids=torch.tensor([ids[s:e]])).logits[0, : e - s - 1]
                own = student(input_ids=torch.tensor([ids[s:e]])).logits[0, : e - s - 1]
                for c, k in zip(context_kl_per_position(with_prefix, alone, temperature), forward_kl_per_position(with_prefix, own, temperature)):
                    rows.append((c.item(), k.item(), 1.0 / ((e - s - 1) * len(item.spans)), d))
    return rows


def threshold_between(values, quantile=0.5):
    """A threshold halfway between two neighbouring values, so float noise cannot move a position across it."""
    ordered = sorted(values)
    i = int(len(ordered) * quantile)
    return (ordered[i - 1] + ordered[i]) / 2


# --- context-sensitive positions -------------------------------------------------------------------------------------

def test_context_mask_keeps_positions_above_the_threshold_and_a_negative_threshold_keeps_all():
    kl = torch.tensor([0.0, 0.05, 0.06, 1.0])
    assert context_gain_mask(kl, 0.05).tolist() == [False, False, True, True]
    assert context_gain_mask(kl, -1.0).all()


def test_context_kl_is_the_plain_kl_at_temperature_without_the_t_squared_factor():
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    direct = (torch.softmax(a / 2, -1) * (torch.log_softmax(a / 2, -1) - torch.log_softmax(b / 2, -1))).sum(-1)
    torch.testing.assert_close(context_kl_per_position(a, b, 2.0), direct)


def test_renormalising_rescales_each_documents_kept_weights_to_its_share():
    weights = torch.tensor([0.1, 0.2, 0.2, 0.25, 0.25])
    group = torch.tensor([0, 0, 0, 1, 1])
    out = renormalise_within_groups(weights, torch.tensor([True, False, True, False, False]), group, 2)
    torch.testing.assert_close(out, torch.tensor([0.5 * 0.1 / 0.3, 0.0, 0.5 * 0.2 / 0.3, 0.0, 0.0]))  # doc 1 keeps nothing: 0
    everything = renormalise_within_groups(weights, torch.ones(5, dtype=torch.bool), group, 2)
    assert torch.equal(everything, weights), "a document that keeps every position is untouched, bit for bit"


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_negative_threshold_gives_exactly_the_plain_disc_loss(tiny_model, items, chunk):
    teacher = perturbed_teacher(tiny_model)
    plain = Disc(TrainConfig.create(kl_chunk_size=chunk)).batch_loss(tiny_model, teacher, items, "cpu").loss
    cfg = TrainConfig.create(kl_chunk_size=chunk, disc_positions="context", context_kl_threshold=-1.0)
    out = Disc(cfg).batch_loss(tiny_model, teacher, items, "cpu")
    every, stats = out.loss, out.counts
    assert torch.equal(every, plain)
    assert stats["kept_positions"] == stats["distilled_positions"] == sum(i.student_tokens for i in items)
    assert stats["documents_without_kept_positions"] == 0


@pytest.mark.parametrize("chunk", [0, 5])
def test_the_loss_is_the_mean_over_documents_of_the_weighted_mean_over_kept_positions(tiny_model, items, chunk):
    teacher = perturbed_teacher(tiny_model)
    rows = by_hand(tiny_model, teacher, items, 2.0)
    threshold = threshold_between([r[0] for r in rows], 0.6)
    per_doc = []
    for d in range(len(items)):
        kept = [(w, k) for c, k, w, doc in rows if doc == d and c > threshold]
        per_doc.append(sum(w * k for w, k in kept) / sum(w for w, _ in kept) if kept else 0.0)
    cfg = TrainConfig.create(kl_chunk_size=chunk, disc_positions="context", context_kl_threshold=threshold)
    out = Disc(cfg).batch_loss(tiny_model, teacher, items, "cpu")
    loss, stats = out.loss, out.counts
    assert loss.item() == pytest.approx(sum(per_doc) / len(items), rel=1e-4)
    assert stats["kept_positions"] == sum(c > threshold for c, *_ in rows) < stats["distilled_positions"] == len(rows)


def test_chunked_and_dense_paths_agree_in_value_and_gradient(tiny_model, items):
    teacher = perturbed_teacher(tiny_model)
    threshold = threshold_between([r[0] for r in by_hand(tiny_model, teacher, items, 2.0)])
    results = []
    for chunk in (0, 5):
        tiny_model.zero_grad()
        cfg = TrainConfig.create(kl_chunk_size=chunk, disc_positions="context", context_kl_threshold=threshold)
        out = Disc(cfg).batch_loss(tiny_model, teacher, items, "cpu")
        loss, stats = out.loss, out.counts
        loss.backward()
        results.append((loss.detach(), stats, [p.grad.clone() for p in tiny_model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    assert results[0][1] == results[1][1]
    for dense, chunked in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(dense, chunked, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in results[0][2]), "the gradient flows through the kept positions"


def test_a_document_that_keeps_no_position_contributes_zero(tiny_model, items):
    cfg = TrainConfig.create(disc_positions="context", context_kl_threshold=1e6)
    out = Disc(cfg).batch_loss(tiny_model, perturbed_teacher(tiny_model), items, "cpu")
    loss, stats = out.loss, out.counts
    assert loss.item() == 0.0 and stats["kept_positions"] == 0 and stats["documents_without_kept_positions"] == len(items)


def test_run_json_counts_the_kept_positions_over_the_run(tiny_model_dir, corpus_file, tmp_path):
    """What share of the positions a `disc_positions context` run distilled is in run.json; other runs carry no such counts."""
    common = dict(model=str(tiny_model_dir), corpus=str(corpus_file), lr=1e-3, seed=0, max_steps=3, precision="fp32",
                  teacher_dtype="fp32", save_model=False)
    for name, extra in (("context", dict(method="disc", disc_positions="context", context_kl_threshold=1e-4)), ("all", dict(method="disc"))):
        train(TrainConfig.create(out=str(tmp_path / name), **common, **extra), progress=False, log=lambda *a: None)
    counts = json.loads((tmp_path / "context" / "run.json").read_text())["counts"]
    assert 0 < counts["kept_positions"] <= counts["distilled_positions"]
    assert 0 <= counts["documents_without_kept_positions"] <= counts["documents"]
    assert "kept_positions" not in json.loads((tmp_path / "all" / "run.json").read_text())["counts"]


def test_context_positions_refuse_a_teacher_cache_and_other_methods(tiny_model, items):
    cfg = TrainConfig.create(disc_positions="context")
    with pytest.raises(CtxDistillError, match="live teacher"):
        Disc(cfg).batch_loss(tiny_model, CachedTeacher(cache=None), items, "cpu")
    with pytest.raises(CtxDistillError, match="live teacher"):
        TrainConfig.create(disc_positions="context", teacher_cache="somewhere").validate()
    with pytest.raises(CtxDistillError, match="DiSC variant"):
        TrainConfig.create(disc_positions="context", method="ft").validate()
    with pytest.raises(CtxDistillError, match="single_pass"):
        TrainConfig.create(disc_positions="context", teacher_mode="per_split").validate()
    with pytest.raises(CtxDistillError, match="context_kl_threshold"):
        TrainConfig.create(disc_positions="context", context_kl_threshold=float("nan")).validate()
    TrainConfig.create(disc_positions="context", method="replay", replay_method="disc").validate()


# --- chat retention through replay -----------------------------------------------------------------------------------

def talkative(model, tokenizer):
    """The tiny model with its whitespace tokens' (tied) embeddings zeroed: a random model otherwise replies
    with newlines only, which replay skips as empty."""
    blank = [i for i in tokenizer.get_vocab().values() if tokenizer.decode([i]).strip() == ""]
    with torch.no_grad():
        model.get_output_embeddings().weight[blank] = 0
    return model


@pytest.fixture()
def talkative_model_dir(tiny_model, tokenizer, tmp_path):
    path = tmp_path / "talkative"
    talkative(tiny_model, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def chat_item(tokenizer):
    return replay_example(Record("r", {"prompt": "Name a colour.", "response": "Blue is a colour."}), tokenizer, "chat", 2048)


def direct_kl(student, teacher, item, temperature):
    ids = torch.tensor([item.ids])
    response = torch.tensor(item.labels[1:]) != -100
    return forward_kl_per_position(teacher(input_ids=ids).logits[0, :-1][response], student(input_ids=ids).logits[0, :-1][response],
                                   temperature).mean()


def test_replay_ce_weight_zero_is_a_pure_kl_retention_term_on_the_response(tiny_model, chat_item):
    teacher = perturbed_teacher(tiny_model)
    cfg = TrainConfig.create(method="replay", replay_ce_weight=0.0, replay_kl_weight=2.0, kl_temperature=1.5).validate()
    out = get_method(cfg).loss(tiny_model, teacher, chat_item, "cpu")
    loss = out.loss
    torch.testing.assert_close(loss, 2.0 * direct_kl(tiny_model, teacher, chat_item, 1.5))
    assert out.student_tokens == sum(t != -100 for t in chat_item.labels[1:])
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_replay_loss_weights_ce_and_kl_and_default_weights_keep_the_old_loss(tiny_model, chat_item):
    teacher = perturbed_teacher(tiny_model)
    ids, labels = torch.tensor([chat_item.ids]), torch.tensor([chat_item.labels])
    student_logits, teacher_logits = tiny_model(input_ids=ids).logits, teacher(input_ids=ids).logits
    ce = token_cross_entropy(student_logits, labels)
    kl = direct_kl(tiny_model, teacher, chat_item, 1.0)
    torch.testing.assert_close(replay_loss(student_logits, teacher_logits, labels, 0.3, 0.5), 0.3 * ce + 0.5 * kl)
    assert torch.equal(replay_loss(student_logits, None, labels), ce)
    from ctxdistill.losses import ft_kl_loss

    assert torch.equal(replay_loss(student_logits, teacher_logits, labels, 1.0, 0.5), ft_kl_loss(student_logits, teacher_logits, labels, 0.5)[0])


def test_replay_with_both_weights_zero_is_refused():
    with pytest.raises(CtxDistillError, match="both 0"):
        TrainConfig.create(method="replay", replay_ce_weight=0.0, replay_kl_weight=0.0).validate()


def test_bundled_chat_retention_prompts_are_40_varied_prompts_distinct_from_the_drift_prompts():
    read = lambda name: [json.loads(line) for line in bundled_path(name).read_text(encoding="utf-8").splitlines()]
    retention, held_out = read("chat_retention"), read("chat_prompts")
    assert len(retention) == 40 and len({r["id"] for r in retention}) == 40
    assert all(set(r) == {"id", "prompt"} and r["prompt"].strip() for r in retention)
    normal = lambda text: " ".join(text.lower().split())
    assert not {normal(r["prompt"]) for r in retention} & {normal(r["prompt"]) for r in held_out}


def test_missing_responses_are_the_initial_models_greedy_replies_generated_once_and_cached(tiny_model, tokenizer, tiny_model_dir,
                                                                                         tmp_path, monkeypatch):
    from ctxdistill.generation.sampling import chat_ids, sample, stop_token_ids

    tiny_model = talkative(tiny_model, tokenizer)
    monkeypatch.setenv("CTXDISTILL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "retain.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "prompt": "Say hello."}, {"id": "b", "prompt": "Count to three."},
                                                             {"id": "c", "prompt": "Given.", "response": "Kept as written."}]))
    cfg = TrainConfig.create(method="replay", model=str(tiny_model_dir), replay_source=str(source), replay_n=3, replay_format="chat",
                      replay_max_new_tokens=6, gen_cache=True, precision="fp32").validate()
    method = get_method(cfg)
    method.load()
    assert any(map(needs_response, method.replay_records)), "records without a response need the model before training"

    def prepare():
        ctx = PrepareContext(tokenizer, cfg, model=tiny_model, device="cpu", out_dir=tmp_path, progress=False, log=lambda *a: None)
        prepared = method.prepare([], ctx)
        return {e.doc_id: e for e in prepared.examples if isinstance(e, ReplayExample)}, prepared.generation

    examples, generation = prepare()
    assert generation["sequences"] == 2 and generation["cached"] == 0
    for prompt, record_id in (("Say hello.", "a"), ("Count to three.", "b")):
        [greedy] = sample(tiny_model, [chat_ids(tokenizer, [{"role": "user", "content": prompt}])], max_new_tokens=6,
                          stop_ids=stop_token_ids(tokenizer), pad_id=0, temperature=0.0, precision="fp32", progress=False)
        reply = tokenizer.decode(greedy.tokens, skip_special_tokens=True).strip()
        assert reply, "the talkative tiny model says something"
        expected = replay_example(Record(record_id, {"prompt": prompt, "response": reply}), tokenizer, "chat", cfg.max_length)
        assert examples[f"replay:{record_id}"] == expected
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "replay_responses.jsonl").read_text().splitlines())}
    assert rows["c"]["response"] == "Kept as written."

    monkeypatch.setattr("ctxdistill.generation.sampling.sample", lambda *a, **k: pytest.fail("a cached reply was generated again"))
    again, generation = prepare()
    assert again == examples and generation["cached"] == 2


def test_records_with_responses_keep_replay_free_of_generation(tiny_model_dir, tokenizer, tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"id": "p", "prompt": "Q?", "response": "A."}) + "\n")
    cfg = TrainConfig.create(method="replay", model=str(tiny_model_dir), replay_source=str(source), replay_n=1).validate()
    method = get_method(cfg)
    method.load()
    assert not any(map(needs_response, method.replay_records))
    prepared = method.prepare([], PrepareContext(tokenizer, cfg, model=None, progress=False, log=lambda *a: None))
    assert prepared.generation == {} and [e.doc_id for e in prepared.examples] == ["replay:p"]


def test_disc_context_with_chat_retention_trains_the_tiny_model(talkative_model_dir, corpus_file, tmp_path):
    cfg = TrainConfig.create(model=str(talkative_model_dir), corpus=str(corpus_file), out=str(tmp_path / "run"), method="replay", replay_method="disc",
                      replay_source="bundled:chat_retention", replay_format="chat", replay_ce_weight=0.0, replay_kl_weight=1.0,
                      replay_n=3, replay_max_new_tokens=6, disc_positions="context", context_kl_threshold=0.0, lr=1e-3, seed=0,
                      max_steps=5, gen_cache=False, precision="fp32", teacher_dtype="fp32", save_model=False)
    train(cfg, progress=False, log=lambda *a: None)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["counts"]["steps"] == 5 and run["generation"]["sequences"] == 3
    replies = [json.loads(line)["response"] for line in (tmp_path / "run" / "replay_responses.jsonl").read_text().splitlines()]
    assert len(replies) == 3 and all(r.strip() for r in replies)
    documents = [d for step in map(json.loads, (tmp_path / "run" / "losses.jsonl").read_text().splitlines()) for d in step["documents"]]
    assert any(d.startswith("replay:retain-") for d in documents) and any(d.startswith("doc-") for d in documents)


def test_a_checkpoint_written_before_these_options_existed_can_still_be_resumed(tmp_path):
    from ctxdistill.training.resume import check_compatible

    old = {k: v for k, v in TrainConfig.create().flat().items()
           if k not in ("disc_positions", "context_kl_threshold", "replay_ce_weight", "replay_max_new_tokens")}
    check_compatible({"config": old}, TrainConfig.create().flat(), tmp_path)
    with pytest.raises(CtxDistillError, match="disc_positions"):
        check_compatible({"config": old}, TrainConfig.create(disc_positions="context").flat(), tmp_path)
