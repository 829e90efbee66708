"""Processes: who this process is in the run, how gradients and state are shared, and sharding.

One process, data parallel (every process holds the whole model; summed gradients are all-reduced
once per step, so methods may call any submodule of the student, which a DDP wrapper would not see),
FSDP and DeepSpeed (`accelerator.prepare` shards the student and optimizer), all through accelerate.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ..errors import CtxDistillError
from ..runtime import launched_world_size, resolve_device
from . import checkpoint as ckpt


@dataclass
class Runtime:
    """Who this process is in the run, and how gradients are shared."""

    accelerator: object
    device: torch.device
    rank: int
    world: int
    mode: str  # single | data_parallel | fsdp | deepspeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode in ("fsdp", "deepspeed")

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            return moved.to(tensor.device)
        return tensor

    def broadcast_int(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def gather_json(self, obj) -> list:
        """Every process's JSON-serialisable `obj`, in rank order (tensors, no pickling)."""
        data = json.dumps(obj).encode()
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        length = torch.tensor([len(data)], dtype=torch.long, device=self.device)
        lengths = [torch.zeros_like(length) for _ in range(self.world)]
        dist.all_gather(lengths, length)
        longest = max(int(n.item()) for n in lengths)
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        parts = [torch.zeros_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return [json.loads(bytes(p[: int(n.item())].cpu().tolist()).decode()) for p, n in zip(parts, lengths)]

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def raise_if_any(self, error: Exception | None, what: str) -> None:
        """Collective: every process raises when the main process (which alone writes) failed."""
        if self.broadcast_int(1 if error else 0):
            raise error or CtxDistillError(f"the main process could not {what} (see its error)")


def create_runtime(device: str, micro_steps: int, cudnn_attention: bool = False) -> Runtime:
    """The accelerate state for this process: one process, data parallel, FSDP or DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    sharded_env = any(os.environ.get(k, "").lower() in ("true", "1") for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    resolve_device(device)  # refuse an unknown or unavailable device before anything starts
    if launched_world_size() == 1 and not sharded_env:
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh one-process state for every train() call
    elif device.startswith("cuda:"):
        raise CtxDistillError(f"--device {device} cannot be used with several processes: each uses the GPU of its LOCAL_RANK; use --device auto")
    kwargs = {"gradient_accumulation_steps": micro_steps} if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1") else {}
    try:
        accelerator = Accelerator(cpu=device == "cpu", device_placement=False, mixed_precision="no", **kwargs)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise CtxDistillError(f"cannot set up the processes ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        mode = "fsdp"
    elif kind == DistributedType.DEEPSPEED:
        mode = "deepspeed"
    elif accelerator.num_processes > 1:
        mode = "data_parallel"
    else:
        mode = "single"
    resolved = resolve_device(device) if mode == "single" else accelerator.device
    if resolved.type == "cuda" and not cudnn_attention:  # see the option's help and docs/performance.md "GPU (H100)"
        torch.backends.cuda.enable_cudnn_sdp(False)
    return Runtime(accelerator, resolved, accelerator.process_index, accelerator.num_processes, mode)


def check_engine_support(cfg, rt: Runtime) -> None:
    if rt.sharded and cfg.disc.teacher_mode == "per_split" and cfg.uses("disc"):
        raise CtxDistillError(f"teacher_mode per_split runs a different number of forward passes per document, which hangs "
                              f"sharded training ({rt.mode}); use the default single_pass")
    if rt.sharded and cfg.uses("sdft"):
        raise CtxDistillError(f"sdft samples its rollouts with the whole model on every process, which sharded training ({rt.mode}) "
                              f"does not hold yet; run it on one process or data parallel (torchrun / accelerate without FSDP or DeepSpeed)")
    if rt.mode == "deepspeed" and cfg.on_nonfinite == "skip":
        raise CtxDistillError("--on-nonfinite skip is not available under DeepSpeed (its engine steps inside backward); use FSDP or data parallel")
    if rt.mode == "deepspeed" and cfg.loss_normalization == "token":
        raise CtxDistillError("loss_normalization token is not available under DeepSpeed; use document, or FSDP")


def prepare_sharded(rt: Runtime, docs_per_step: int, grad_clip: float, student, optimizer):
    """FSDP / DeepSpeed: shard the student and its optimizer through accelerate."""
    from ..models import mark_sharded

    if rt.mode == "deepspeed":
        ds = rt.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_accumulation_steps"] = math.ceil(docs_per_step / rt.world)
        ds["train_batch_size"] = ds["gradient_accumulation_steps"] * rt.world
        ds["gradient_clipping"] = grad_clip
    student, optimizer = rt.accelerator.prepare(student, optimizer)
    mark_sharded(rt.accelerator.unwrap_model(student))
    mark_sharded(student)
    return student, optimizer


def all_reduce_gradients(rt: Runtime, params: list, bucket_elements: int = 1 << 25) -> None:
    """Sum the gradients over processes (each process already weighted its items by the global batch)."""
    import torch.distributed as dist

    trainable = [p for p in params if p.requires_grad]
    # a parameter no process produced a gradient for stays without one (AdamW then skips it, as in one process)
    used = rt.all_sum(torch.tensor([float(p.grad is not None) for p in trainable], dtype=torch.float64))
    grads = []
    for p, n in zip(trainable, used.tolist()):
        if n > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= bucket_elements):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def load_optimizer(rt: Runtime, student, optimizer, named: dict, names: dict[int, str]) -> None:
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(student, optimizer, named, options=StateDictOptions(full_state_dict=True))
    else:
        ckpt.load_named_optimizer_state(optimizer, named, names)


def gather_trainable(rt: Runtime, student, unwrapped, trainable_names: list[str]) -> dict:
    """Full tensors of the trainable parameters on the main process (collective under sharding)."""
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif rt.mode == "deepspeed":
        full = rt.accelerator.get_state_dict(student)
    else:
        if not rt.is_main:
            return {}
        params = dict(unwrapped.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in trainable_names}
    return {n: full[n] for n in trainable_names if n in full} if rt.is_main else {}


def gather_optimizer(rt: Runtime, student, optimizer, names: dict[int, str]) -> dict | None:
    if rt.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rt.mode == "deepspeed":
        return None  # kept inside the DeepSpeed engine; see docs/distributed.md
    return ckpt.named_optimizer_state(optimizer, names) if rt.is_main else None


def merge_step_logs(parts: list[dict]) -> tuple[dict, dict]:
    """Per-process {"metrics": {name: [sum, n]}, "counts": {name: n}} -> the step's totals."""
    metrics: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for part in parts:
        for name, (total, n) in part["metrics"].items():
            merged = metrics.setdefault(name, [0.0, 0])
            merged[0] += total
            merged[1] += n
        for name, n in part["counts"].items():
            counts[name] = counts.get(name, 0) + n
    return metrics, counts


def shard_teacher(cfg, rt: Runtime, teacher):
    """FSDP2: the frozen full-FT teacher sharded like the student (one unit per decoder layer, `_no_split_modules`,
    and the root), all-gathered one layer at a time in its forward and resharded after, so it costs its bytes / world
    per process instead of all of them. Returned unchanged when it cannot or need not be sharded: not FSDP2, a LoRA
    student's adapter-off teacher (already the sharded student), a teacher cache, or CD-base entity mode (its teacher
    cache per sentence would make processes run different numbers of teacher forwards, and sharded forwards are
    collective). Under DeepSpeed ZeRO-3 the teacher stays replicated (docs/distributed.md)."""
    from ..teachers import Teacher

    plugin = getattr(rt.accelerator.state, "fsdp_plugin", None) if rt.accelerator is not None else None
    if (rt.mode != "fsdp" or getattr(plugin, "fsdp_version", 1) != 2 or not isinstance(teacher, Teacher) or teacher.model is None
            or (cfg.uses("cd_base") and cfg.cd_base.cd_mode == "entity")):
        return teacher
    return Teacher(model=fully_shard_frozen(teacher.model))


def fully_shard_frozen(model):
    """FSDP2 `fully_shard` on every decoder layer and on the root of a frozen model; marks it sharded (forward only
    through the wrapper: the chunked LM-head paths are off)."""
    from torch.distributed.fsdp import fully_shard

    from ..models import mark_sharded

    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    mark_sharded(model)
    return model
