"""Several processes (CPU, gloo) give the same training as one process accumulating the same global batch.

2 processes x 1 document per step == 1 process x 2 documents (gradient accumulation 2), same plan,
fp32. Tolerance: rtol 1e-5, atol 1e-6 on every weight and step loss (on this project's CPUs the two
runs agree bit for bit: each item's gradient is weighted by the global batch before one sum).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctxdistill.config import TrainConfig
from ctxdistill.training import train

from conftest import cli_args, quiet

RTOL, ATOL = 1e-5, 1e-6
BIN = Path(sys.executable).parent
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], values: dict, out):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([*launcher, "-m", "ctxdistill.cli", *cli_args(values, out)], env=env, capture_output=True, text=True,
                            timeout=300, cwd=out.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(out):
    name = "adapter_model.safetensors" if (out / "model" / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / "model" / name)


def steps(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def assert_same_training(one, two):
    a, b = steps(one), steps(two)
    assert [r["documents"] for r in a] == [r["documents"] for r in b], "same global batches, same order"
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b], "tokens are counted over all processes"
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]), rtol=RTOL, atol=ATOL)
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
    runs = [json.loads((p / "run.json").read_text()) for p in (one, two)]
    assert runs[0]["counts"] == runs[1]["counts"]
    return runs


def test_torchrun_two_processes_equal_one_process_accumulating_two(tiny_model_dir, corpus4, tmp_path):
    values = dict(method="disc", model=str(tiny_model_dir), corpus=str(corpus4), device="cpu", precision="fp32", teacher_dtype="fp32",
                  lr=1e-3, seed=0, docs_per_step=2, epochs=1, checkpoint_every=0)
    train(TrainConfig.create(out=str(tmp_path / "one"), **values), progress=False, log=quiet)
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    result = launch(torchrun, values, tmp_path / "two")
    runs = assert_same_training(tmp_path / "one", tmp_path / "two")
    assert runs[1]["processes"] == {"world_size": 2, "mode": "data_parallel"} and runs[1]["counts"]["steps"] == 2
    assert result.stdout.count("trained disc") == 1, "only the main process reports"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["losses.jsonl", "model", "run.json"]


def test_accelerate_launch_lora_token_normalisation_uneven_batches_and_checkpoints(tiny_model_dir, corpus4, tmp_path):
    """3 documents per step over 2 processes: rank 0 runs 2, rank 1 runs 1; the last step (1 document)
    leaves rank 1 idle. Token normalisation divides by the global token count."""
    values = dict(method="disc", model=str(tiny_model_dir), corpus=str(corpus4), device="cpu", precision="fp32", lr=1e-3, seed=0,
                  docs_per_step=3, epochs=1, student="lora", lora_r=4, lora_dropout=0.0, lora_targets="q_proj,v_proj",
                  loss_normalization="token", checkpoint_every=1)
    train(TrainConfig.create(out=str(tmp_path / "one"), **values), progress=False, log=quiet)
    # The shipped data-parallel config (a multi-GPU launch); `--device cpu` makes the 2 processes join a gloo
    # group. (`accelerate launch --cpu` alone would start ONE process: it runs several CPU processes only via mpirun.)
    accelerate = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
                  "--main_process_port", str(free_port())]
    launch(accelerate, values, tmp_path / "two")
    runs = assert_same_training(tmp_path / "one", tmp_path / "two")
    assert runs[1]["processes"] == {"world_size": 2, "mode": "data_parallel"}
    assert [len(r["documents"]) for r in steps(tmp_path / "two")] == [3, 1]
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2, "every process's RNG state is in the checkpoint"
    assert state["rng"][0]["torch"] != state["rng"][1]["torch"], "processes draw dropout masks from their own streams"


def test_token_normalisation_weights_items_by_their_share_of_the_global_tokens(tiny_model_dir, corpus4, tmp_path):
    """One step over 2 documents: the gradient is sum_i n_i * grad(loss_i) / sum_i n_i."""
    from ctxdistill.inputs.corpus import load_corpus
    from ctxdistill.methods import PrepareContext, get_method
    from ctxdistill.models import load_tokenizer
    from ctxdistill.training.loop import build_student, epoch_items
    from ctxdistill.teachers import build_teacher

    values = dict(method="disc", model=str(tiny_model_dir), corpus=str(corpus4), device="cpu", precision="fp32", teacher_dtype="fp32",
                  lr=1e-3, seed=0, docs_per_step=2, max_steps=1, loss_normalization="token", checkpoint_every=0, save_model=False)
    train(TrainConfig.create(out=str(tmp_path / "run"), **values), progress=False, log=quiet)
    [record] = steps(tmp_path / "run")

    cfg = TrainConfig.create(**values).validate()
    student = build_student(cfg, torch.device("cpu"))
    tokenizer = load_tokenizer(cfg.model)
    teacher = build_teacher(cfg, student, torch.device("cpu"))
    method = get_method(cfg)
    docs, _ = load_corpus(str(corpus4))
    items = epoch_items(method, method.prepare(docs, PrepareContext(tokenizer, cfg, progress=False)).examples, cfg.seed, 0)[:2]
    total = sum(i.student_tokens for i in items)
    assert items[0].student_tokens != items[1].student_tokens, "the test needs documents of different lengths"
    losses = []
    for item in items:
        out = method.loss(student, teacher, item, "cpu")
        (out.loss * out.student_tokens / total).backward()
        losses.append(out.loss.item() * out.student_tokens / total)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters() if p.grad is not None]))
    assert record["tokens"] == total
    assert record["loss"] == pytest.approx(sum(losses), rel=1e-5)
    assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_are_valid(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.mixed_precision == "no", "precision is ctxdistill's --precision"
