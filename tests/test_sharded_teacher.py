"""FSDP2 shards the frozen full-FT teacher (`training/distributed.py: fully_shard_frozen`): with 2 CPU processes
(gloo), each holding half of the teacher's weights, the DiSC and FT+KL losses and the student's gradients are those
of one process with the whole teacher (fp32)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = r'''
import json, os, random, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from conftest import NEWS, tiny_llama
from ctxdistill.config import TrainConfig
from ctxdistill.inputs.segment import choose_spans, segment_document
from ctxdistill.methods.disc import Disc, DiscItem
from ctxdistill.methods.ft import TokenExample
from ctxdistill.methods.ft_kl import FineTuneKL
from ctxdistill.models import load_tokenizer, mark_sharded
from ctxdistill.teachers import Teacher
from ctxdistill.training.distributed import fully_shard_frozen

sharded = "RANK" in os.environ
if sharded:
    dist.init_process_group("gloo")
tokenizer = load_tokenizer("smollm2-135m-instruct")
student = tiny_llama(len(tokenizer), seed=0)
teacher_model = tiny_llama(len(tokenizer), seed=1)
mark_sharded(student)  # the dense path, the one sharded runs take
if sharded:
    teacher_model = fully_shard_frozen(teacher_model)
    assert teacher_model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0] == 32  # half of 64 rows here
teacher = Teacher(model=teacher_model)
doc = segment_document("d0", NEWS[0], tokenizer)[0]
item = DiscItem(doc, tuple(choose_spans(doc, "sentence_boundary", random.Random(0), num_splits=3)))
out = {}
for name, method, it in (("disc", Disc(TrainConfig.create()), item),
                         ("ft_kl", FineTuneKL(TrainConfig.create(method="ft_kl", kl_beta=0.5)), TokenExample("d0", tuple(doc.token_ids)))):
    student.zero_grad()
    loss = method.loss(student, teacher, it, "cpu").loss
    loss.backward()
    out[name] = [loss.item(), torch.cat([p.grad.flatten() for p in student.parameters()]).norm().item()]
print(json.dumps(out))
if sharded:
    dist.destroy_process_group()
'''


def test_a_teacher_sharded_over_two_processes_gives_the_losses_of_one_whole_teacher(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(tests).parent / "src"), tests]))
    run = lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = run([sys.executable, str(script), tests])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), tests])
    assert two.returncode == 0, two.stderr[-3000:]
    whole = json.loads(one.stdout.strip().splitlines()[-1])
    ranks = [json.loads(line) for line in two.stdout.strip().splitlines() if line.startswith("{")]
    assert len(ranks) == 2
    for rank in ranks:
        for name in whole:
            assert rank[name] == pytest.approx(whole[name], rel=1e-5), name
