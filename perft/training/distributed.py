"""Data-parallel training through `torch.distributed`, as launched by `torchrun` or `accelerate launch`.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, so one
code path serves both. NCCL on GPUs, gloo on CPUs (which is how the tests run two processes).

- `ddp`: every process holds the whole model; `DistributedDataParallel` averages the
  adapter gradients.
- `fsdp`: the frozen base model is sharded across processes (FSDP2 `fully_shard` per
  decoder layer); the adapters, a few million parameters, stay whole on every process and
  their gradients are averaged with one all-reduce per step. This keeps checkpoints plain
  tensors and lets fp32 adapters sit inside a bf16 decoder layer (FSDP wants one dtype per
  shard group).

Rank 0 alone writes files; every rank computes the same batch plan, so no data is sent.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from perft.errors import PerftError


@dataclass
class DistributedContext:
    """Where this process sits in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over processes (float64, on the process group's device)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (e.g. a signal seen by one process)."""
        if not self.distributed:
            return flag
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the process group the launcher describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise PerftError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                "launch at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size <= 1:
        return DistributedContext(0, 1, 0, device)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if device.type == "cuda" else {}))
        initialized_here = True
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard: classes the HF model names in `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_model(model: nn.Module, ctx: DistributedContext, strategy: str) -> nn.Module:
    """Wrap for data parallelism; returns the module to call in the training loop."""
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model.to(ctx.device)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        trainable = {p for p in model.parameters() if p.requires_grad}
        layers = decoder_layers(model)
        if not layers:
            raise PerftError("fsdp: cannot find the model's decoder layers (no _no_split_modules); use --strategy ddp")
        for layer in layers:
            fully_shard(layer, ignored_params=trainable)
        fully_shard(model, ignored_params=trainable)
        model.to(ctx.device)
        return model
    raise PerftError(f"unknown strategy {strategy!r}; choose ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so it needs no unwrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-batches."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def average_gradients(params: list[nn.Parameter], ctx: DistributedContext) -> None:
    """All-reduce-average replicated adapter gradients (fsdp strategy): one flat buffer, one call."""
    if not ctx.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    device = ctx._comm_device()
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(device=p.device, dtype=p.dtype)
        offset += n
