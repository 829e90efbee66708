"""Every method through the shared loop on the tiny model: inputs, schedules, errors, run.json."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ctxdistill.config import METHOD_NAMES, TrainConfig
from ctxdistill.inputs.corpus import Document
from ctxdistill.errors import CtxDistillError
from ctxdistill.methods import PrepareContext, get_method, method_class
from ctxdistill.training.loop import epoch_items, train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model work gains nothing from threads; on a busy 2-core machine OpenMP spinning costs ~1000x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def entity_file(tmp_path):
    return write_jsonl(tmp_path / "entities.jsonl", [
        {"id": "e1", "entity": "Velmora Bridge", "definition": "The Velmora Bridge is a 412-metre bridge over the Sarn river.",
         "transfer_sentences": ["The Velmora Bridge carries trams.", "People cross the Velmora Bridge daily.", "Velmora Bridge is long."]},
        {"id": "e2", "entity": "Quillon Robotics", "definition": "Quillon Robotics is a robot maker based in Brest.",
         "transfer_sentences": ["Quillon Robotics builds shelf carriers.", "Quillon Robotics employs 740 people."]},
    ])


@pytest.fixture()
def pool_file(tmp_path):
    return write_jsonl(tmp_path / "pool.jsonl", [{"id": f"p{i}", "prompt": f"Is {i} even? Answer yes or no.", "answer": "yes" if i % 2 == 0 else "no"}
                                               for i in range(6)])


@pytest.fixture()
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "q1", "question": "Who leads Quillon Robotics?", "answer": "Teodor Vask", "fact": "Teodor Vask is the chief executive of Quillon Robotics."},
        {"id": "q2", "question": "How long is the Velmora bridge?", "answer": "412 metres"},
    ])


@pytest.fixture()
def replay_file(tmp_path):
    return write_jsonl(tmp_path / "replay.jsonl", [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."}
                                                   for i in range(10)])


def config(tiny_model_dir, corpus, out, **overrides):
    values = dict(model=str(tiny_model_dir), corpus=str(corpus), out=str(out), lr=1e-3, seed=0, gen_cache=False, max_steps=2,
                  gen_batch_size=4)
    return TrainConfig.create(**(values | overrides))


def method_options(name, files):
    """Small inputs and short generations for each method, on the tiny model."""
    return {
        "ft_kl": {}, "lora": {"lora_r": 4}, "talr": {},
        "rephrase": {"rephrase_max_new_tokens": 6},
        "replay": {"replay_source": str(files["replay"]), "replay_n": 4, "replay_kl_weight": 0.5},
        "cd_base": {"cd_max_new_tokens": 6},
        "icl_distill": {"corpus": str(files["pool"]), "icl_k": 2, "lora_r": 4},
        "mixsd": {"corpus": str(files["qa"]), "mixsd_max_new_tokens": 6, "mixsd_retries": 1},
    }[name]


NEW_METHODS = ["ft_kl", "lora", "talr", "rephrase", "replay", "cd_base", "icl_distill", "mixsd"]


def test_every_new_method_is_registered_with_an_input_format():
    assert set(NEW_METHODS) <= set(METHOD_NAMES)
    for name in METHOD_NAMES:
        method = method_class(name)
        assert method.name == name and method.input_format
        assert get_method(TrainConfig.create(method=name)).name == name
    with pytest.raises(CtxDistillError, match="unknown method"):
        method_class("nope")


@pytest.mark.parametrize("name", NEW_METHODS)
def test_method_trains_the_tiny_model_and_records_its_run(name, tiny_model_dir, corpus_file, tmp_path, monkeypatch,
                                                          replay_file, pool_file, qa_file):
    if name == "mixsd":  # a random model never says the answer: accept every target to reach training
        monkeypatch.setattr("ctxdistill.methods.mixsd.answer_matches", lambda text, answer: True)
    options = method_options(name, {"replay": replay_file, "pool": pool_file, "qa": qa_file})
    corpus = options.pop("corpus", corpus_file)
    cfg = config(tiny_model_dir, corpus, tmp_path / "run", method=name, **options)
    result = train(cfg, progress=False, log=lambda *a: None)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["method"] == name and run["counts"]["steps"] == 2 and run["counts"]["student_tokens"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses) and losses[0] != losses[1], "two different steps"
    metrics = {"ft_kl": {"ce", "kl"}, "talr": {"tau"}, "icl_distill": {"ce", "kl"}}.get(name, set())
    assert all(metrics <= set(r) for r in records), "a method's LossOutput.metrics are logged with each step"
    expected_student = "lora" if name in ("lora", "icl_distill") else "full"
    assert run["config"]["student"] == expected_student
    trained = result.model.state_dict()
    if expected_student == "lora":
        assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()
        assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k), "the adapter must move"
    else:
        before = load_file(tiny_model_dir / "model.safetensors")
        assert any(not torch.equal(before[k], trained[k]) for k in before), "weights must move"
    if name in ("rephrase", "cd_base", "mixsd"):
        assert run["generation"]["sequences"] > 0 and run["timings_s"]["generate"] > 0
        rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
        assert rows and all("id" in r for r in rows)
    if name == "mixsd":  # every target accepted (patched above); both conditionals contributed tokens
        assert 0 < run["generation"]["naive_token_share"] < 1


WRONG_SHAPE = [
    ("icl_distill", {}, "'prompt'"),
    ("mixsd", {}, "'question'"),
    ("cd_base", {"cd_mode": "entity"}, "'entity'"),
    ("replay", {"replay_source": "WRONG"}, "'prompt'"),
]


@pytest.mark.parametrize("name, options, field", WRONG_SHAPE)
def test_wrong_shape_input_names_the_missing_field_before_any_model_loads(name, options, field, tiny_model_dir, corpus_file,
                                                                          tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("ctxdistill.training.loop.build_student", no_model)
    if options.get("replay_source") == "WRONG":
        options = {"replay_source": str(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "response": "a"}]))}
    cfg = config(tiny_model_dir, corpus_file, tmp_path / "run", method=name, **options)
    with pytest.raises(CtxDistillError, match=field):
        train(cfg, progress=False, log=lambda *a: None)


def test_wrong_field_type_is_an_error_naming_the_field(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "e.jsonl", [{"entity": "X", "definition": "X is a thing.", "transfer_sentences": "not a list"}])
    with pytest.raises(CtxDistillError, match="transfer_sentences.*list of strings"):
        get_method(config(tiny_model_dir, bad, tmp_path / "o", method="cd_base", cd_mode="entity").validate()).load()


def test_lora_method_refuses_a_full_student(tiny_model_dir, corpus_file, tmp_path):
    with pytest.raises(CtxDistillError, match="LoRA"):
        config(tiny_model_dir, corpus_file, tmp_path, method="lora", student="full").validate()
    assert config(tiny_model_dir, corpus_file, tmp_path, method="icl_distill", student="full").validate().student == "full"
    assert config(tiny_model_dir, corpus_file, tmp_path, method="lora").validate().student == "lora"


def test_replay_mixes_exactly_n_examples_into_every_epoch_spread_by_the_shuffle(tiny_model_dir, tokenizer, tmp_path, replay_file):
    cfg = config(tiny_model_dir, "unused", tmp_path, method="replay", replay_source=str(replay_file), replay_n=6, epochs=2)
    cfg = cfg.validate()
    method = get_method(cfg)
    records, _ = __import__("ctxdistill.inputs.records", fromlist=["x"]).load_checked_records(
        str(replay_file), "replay", {"prompt": "str", "response": "str"})
    from ctxdistill.methods.replay import ReplayExample, draw_replay

    method.replay_records = draw_replay(records, cfg.replay.replay_n, cfg.seed)
    documents = [Document(f"d{i}", f"Document number {i} says something new.") for i in range(18)]
    prepared = method.prepare(documents, PrepareContext(tokenizer, cfg, progress=False, log=lambda *a: None))
    assert len(prepared.examples) == 24
    for epoch in range(2):
        items = epoch_items(method, prepared.examples, cfg.seed, epoch)
        replay_positions = [i for i, item in enumerate(items) if isinstance(item, ReplayExample)]
        assert len(items) == 24 and len(replay_positions) == 6  # ratio 6 / (18 + 6)
        assert replay_positions != list(range(18, 24)), "replay items are shuffled in, not appended"
    assert draw_replay(records, 6, 0) == draw_replay(records, 6, 0) != draw_replay(records, 6, 1)
    assert len(draw_replay(records, 50, 0)) == len(records)


def test_replay_plain_format_is_prompt_newline_response_with_ce_on_every_token(tokenizer, replay_file):
    from ctxdistill.inputs.records import Record
    from ctxdistill.methods.replay import replay_example

    record = Record("r1", {"prompt": "What is 1 plus 1?", "response": "It is 2."})
    plain = replay_example(record, tokenizer, "plain", 2048)
    assert tokenizer.decode(plain.ids) == "What is 1 plus 1?\nIt is 2." and plain.labels == plain.ids
    chat = replay_example(record, tokenizer, "chat", 2048)
    answer = [t for t in chat.labels if t != -100]
    assert tokenizer.decode(answer) == "It is 2.<|im_end|>"


def test_after_entity_span_keeps_exactly_the_predictions_of_the_tokens_after_the_mention(tokenizer):
    from ctxdistill.methods.cd_base import after_span_keep, transfer_sentence

    text = "Yesterday the Velmora Bridge carried 9000 trams."
    sentence = transfer_sentence(tokenizer, text, "Velmora Bridge", after_span=True)
    kept = [p for p, keep in enumerate(sentence.keep) if keep]
    predicted = [sentence.ids[p + 1] for p in kept]
    assert tokenizer.decode(predicted) == " carried 9000 trams."
    assert kept == list(range(kept[0], len(sentence.ids) - 1)), "a contiguous run ending before the last position"
    assert not sentence.keep[-1]
    assert transfer_sentence(tokenizer, "No mention here at all.", "Velmora Bridge", after_span=True) is None
    whole = transfer_sentence(tokenizer, text, "Velmora Bridge", after_span=False)
    assert all(whole.keep) and len(whole.keep) == len(whole.ids)
    assert after_span_keep([(0, 3), (3, 7), (7, 9), (9, 12)], 7) == (False, True, True, False)


def test_entity_loss_is_the_masked_kl_between_definition_context_and_sentence_alone(tokenizer, tiny_model):
    from ctxdistill.losses import forward_kl_per_position
    from ctxdistill.methods.cd_base import CdBase, EntityStep, transfer_sentence
    from ctxdistill.teachers import Teacher

    frozen = type(tiny_model)(tiny_model.config)
    frozen.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the student has moved away from the teacher
    definition = tokenizer("The Velmora Bridge is a bridge over the Sarn.", add_special_tokens=False)["input_ids"]
    sentence = transfer_sentence(tokenizer, "Trams cross the Velmora Bridge every day.", "Velmora Bridge", after_span=True)
    item = EntityStep("e1", 0, tuple(definition), sentence, step=0)
    cfg = TrainConfig.create(entity_temperature=2.0)
    out = CdBase(cfg).entity_loss(tiny_model, Teacher(model=frozen), item, torch.device("cpu"))
    loss = out.loss
    ids = list(sentence.ids)
    with torch.no_grad():
        t = frozen(input_ids=torch.tensor([definition + ids])).logits[0, len(definition):]
        s = tiny_model(input_ids=torch.tensor([ids])).logits[0]
    keep = [p for p, k in enumerate(sentence.keep) if k]
    want = forward_kl_per_position(t[keep], s[keep], 2.0).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4) and out.student_tokens == len(keep)


def test_entity_schedule_is_sentences_times_steps_with_a_fresh_optimizer_per_sentence(tiny_model_dir, entity_file, tmp_path, monkeypatch):
    cleared = []
    from torch.optim import AdamW

    original = AdamW.step

    def step(self, *args, **kwargs):
        cleared.append(len(self.state) == 0)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdamW, "step", step)
    cfg = config(tiny_model_dir, entity_file, tmp_path / "run", method="cd_base", cd_mode="entity", entity_sentences=2,
                 entity_steps=3, max_steps=0)
    result = train(cfg, progress=False, log=lambda *a: None)
    assert result.summary["counts"]["steps"] == 2 * 2 * 3  # 2 entities x 2 sentences x 3 steps
    assert cleared == [True, False, False] * 4, "the AdamW state starts fresh with each transfer sentence"
    assert "generation" not in result.summary, "ready-made transfer sentences need no generation"
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [len(r["transfer_sentences"]) for r in rows] == [3, 2]


def test_entity_mode_generates_transfer_sentences_that_mention_the_entity(tiny_model_dir, tmp_path, monkeypatch):
    from ctxdistill.generation.sampling import Generated

    def fake_sample(model, prompts, on_batch, **kwargs):  # every other sample mentions the entity
        outputs = [Generated(tokens) for tokens in ([5000, 6000] if i % 2 else [] for i in range(len(prompts)))]
        on_batch(list(range(len(prompts))), outputs)
        return outputs

    monkeypatch.setattr("ctxdistill.generation.sampling.sample", fake_sample)
    from ctxdistill.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    mention = tokenizer.decode([5000, 6000]).strip()
    records = write_jsonl(tmp_path / "e.jsonl", [{"id": "e1", "entity": mention, "definition": "A definition of it."}])
    cfg = config(tiny_model_dir, records, tmp_path / "run", method="cd_base", cd_mode="entity", entity_sentences=3, entity_rounds=4).validate()
    method = get_method(cfg)
    docs, _ = method.load()
    prepared = method.prepare(docs, PrepareContext(tokenizer, cfg, model=None, out_dir=None, progress=False, log=lambda *a: None))
    [example] = prepared.examples
    # identical continuations count once, so one sentence is found however many rounds run
    assert [s.text for s in example.sentences] == [mention]
    assert prepared.generation["entities_generated"] == 1 and prepared.generation["transfer_sentences_kept"] == 1
    seeded = cfg.replace(entity_seed_mention=True).validate()
    prepared = get_method(seeded).prepare(docs, PrepareContext(tokenizer, seeded, model=None, out_dir=None, progress=False, log=lambda *a: None))
    [example] = prepared.examples
    assert [s.text for s in example.sentences] == [mention, f"{mention} {mention}"]  # the empty sample becomes the bare name


def test_icl_item_teacher_reads_demonstrations_student_reads_the_query_and_both_end_with_the_answer(tokenizer):
    from ctxdistill.methods.icl_distill import icl_item
    from ctxdistill.inputs.records import Record

    pool = [Record(f"p{i}", {"prompt": f"Question {i}?", "answer": f"Answer {i}."}) for i in range(4)]
    item = icl_item(tokenizer, pool, 0, [2, 3], "chat", 2048)
    answer = list(item.student_ids[-item.answer_len:])
    assert tokenizer.decode(answer) == "Answer 0.<|im_end|>"
    assert list(item.teacher_ids[-item.answer_len:]) == answer
    teacher_text, student_text = tokenizer.decode(item.teacher_ids), tokenizer.decode(item.student_ids)
    assert "Question 2?" in teacher_text and "Answer 3." in teacher_text and "Question 2?" not in student_text
    assert student_text.endswith("<|im_start|>user\nQuestion 0?<|im_end|>\n<|im_start|>assistant\nAnswer 0.<|im_end|>")
    short = icl_item(tokenizer, pool, 0, [2, 3], "chat", len(item.teacher_ids) - 1)
    assert len(short.teacher_ids) < len(item.teacher_ids) and "Answer 2." in tokenizer.decode(short.teacher_ids)
    plain = icl_item(tokenizer, pool, 1, [0], "plain", 2048)
    assert tokenizer.decode(plain.teacher_ids) == "Question 0?\nAnswer 0.\n\nQuestion 1?\nAnswer 1."


def test_icl_demonstrations_are_drawn_from_the_rest_of_the_pool(tiny_model_dir, pool_file, tokenizer, tmp_path):
    cfg = config(tiny_model_dir, pool_file, tmp_path, method="icl_distill", icl_k=3).validate()
    method = get_method(cfg)
    records, _ = method.load()
    prepared = method.prepare(records, PrepareContext(tokenizer, cfg, progress=False))
    items = epoch_items(method, prepared.examples, cfg.seed, 0)
    assert len(items) == 6
    for item in items:
        text = tokenizer.decode(item.teacher_ids)
        query = tokenizer.decode(item.student_ids)
        assert sum(f"Is {i} even?" in text for i in range(6)) == 4  # 3 demonstrations + the query
        assert sum(f"Is {i} even?" in query for i in range(6)) == 1


def test_mixsd_sft_loss_covers_only_the_target_tokens(tiny_model):
    from ctxdistill.methods.mixsd import MixSD, SftExample

    item = SftExample("q1", (5, 6, 7, 8, 9, 10), prompt_len=4)
    out = MixSD(TrainConfig.create()).loss(tiny_model, None, item, torch.device("cpu"))
    loss = out.loss
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.tensor([item.ids])).logits[0]
    want = -(torch.log_softmax(logits[3], -1)[9] + torch.log_softmax(logits[4], -1)[10]) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and out.student_tokens == 2


def test_mixsd_rejects_targets_without_the_answer_and_reports_acceptance(tiny_model_dir, qa_file, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("ctxdistill.methods.mixsd.answer_matches", lambda text, answer: answer == "Teodor Vask")
    cfg = config(tiny_model_dir, qa_file, tmp_path, method="mixsd", mixsd_max_new_tokens=3, mixsd_retries=2, mixsd_lambda=0.5).validate()
    method = get_method(cfg)
    records, _ = method.load()
    from ctxdistill.models import load_model

    prepared = method.prepare(records, PrepareContext(tokenizer, cfg, model=load_model(str(tiny_model_dir)), out_dir=tmp_path,
                                                      progress=False, log=lambda *a: None))
    assert [e.doc_id for e in prepared.examples] == ["q1"]
    assert prepared.skipped["rejected (answer never matched)"] == ["q2"]
    assert prepared.generation["acceptance_rate"] == 0.5 and prepared.generation["mean_attempts"] == 2.0  # 1 and 3 attempts
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [(r["accepted"], r["attempts"]) for r in rows] == [(True, 1), (False, 3)]


def test_rephrase_reuses_cached_paraphrases_in_a_second_run(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CTXDISTILL_CACHE", str(tmp_path / "cache"))
    runs = []
    for i in range(2):
        cfg = config(tiny_model_dir, corpus_file, tmp_path / f"run{i}", method="rephrase", rephrase_max_new_tokens=5, gen_cache=True, max_steps=1)
        runs.append(train(cfg, progress=False, log=lambda *a: None).summary["generation"])
    assert runs[0]["cached"] == 0 and runs[0]["new_tokens"] > 0
    assert runs[1]["cached"] == 2 and runs[1]["new_tokens"] == 0
    first, second = ((tmp_path / f"run{i}" / "generations.jsonl").read_text() for i in range(2))
    assert first == second


def test_cd_base_document_loss_against_direct_computation(tiny_model):
    from ctxdistill.losses import forward_kl_per_position
    from ctxdistill.methods.cd_base import CdBase, CdDocExample
    from ctxdistill.teachers import Teacher

    frozen = type(tiny_model)(tiny_model.config)
    frozen.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    context, generation = [11, 12, 13, 14], list(range(100, 170))  # 70 tokens: chunks of 64 and 5 distilled positions
    item = CdDocExample("d", tuple(context), tuple(generation))
    cfg = TrainConfig.create(cd_temperature=1.0)
    loss = CdBase(cfg).loss(tiny_model, Teacher(model=frozen), item, torch.device("cpu")).loss
    with torch.no_grad():
        t = frozen(input_ids=torch.tensor([context + generation])).logits[0, len(context): len(context) + len(generation) - 1]
        s = tiny_model(input_ids=torch.tensor([generation])).logits[0, :-1]
    kl = forward_kl_per_position(t, s, 1.0)
    assert loss.item() == pytest.approx(((kl[:64].sum() + kl[64:].sum()) / 2).item(), rel=1e-4)


def test_bundled_example_inputs_have_the_fields_their_methods_need(tiny_model_dir, tmp_path):
    for method, corpus, extra in [("cd_base", "bundled:entities", {"cd_mode": "entity"}), ("icl_distill", "bundled:icl_pool", {}),
                                  ("mixsd", "bundled:mixsd_qa", {}), ("ft", "bundled:gsm8k_train", {"text_field": "prompt"})]:
        records, report = get_method(config(tiny_model_dir, corpus, tmp_path, method=method, **extra).validate()).load()
        assert len(records) >= 10 and report.kept == report.read
    replay = get_method(config(tiny_model_dir, "bundled:news_updates", tmp_path, method="replay", replay_n=300).validate())
    replay.load()
    assert len(replay.replay_records) == 300


@pytest.mark.slow
def test_mixsd_expert_targets_of_the_real_model_state_the_injected_answer(tmp_path):
    """λ = 0 (pure expert, greedy): with the fact in context SmolLM2 repeats the answer, so most targets pass."""
    from ctxdistill.models import load_model, load_tokenizer

    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "q1", "question": "Who became chief executive of Halvorsen Marine in 2026?", "answer": "Marcus Oyelaran",
         "fact": "Halvorsen Marine announced that Marcus Oyelaran will become its chief executive in March 2026."},
        {"id": "q2", "question": "To which city will the football club Fenwick Rovers relocate?", "answer": "Dunmere",
         "fact": "Fenwick Rovers will relocate to the city of Dunmere at the start of next season."},
        {"id": "q3", "question": "What name was proposed for the new element made at the Aldmere Institute?", "answer": "ostrenium",
         "fact": "The Aldmere team proposed the name ostrenium for the new element."},
    ])
    cfg = TrainConfig.create(method="mixsd", corpus=str(qa), mixsd_lambda=0.0, mixsd_max_new_tokens=40, gen_cache=False).validate()
    method = get_method(cfg)
    records, _ = method.load()
    tokenizer = load_tokenizer(cfg.model)
    prepared = method.prepare(records, PrepareContext(tokenizer, cfg, model=load_model(cfg.model), out_dir=tmp_path, progress=False,
                                                      log=lambda *a: None))
    assert prepared.generation["acceptance_rate"] >= 2 / 3
    assert prepared.generation["naive_token_share"] == 0.0 and prepared.generation["mean_attempts"] == 1.0
