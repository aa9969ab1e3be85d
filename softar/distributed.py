"""Process groups for torchrun (gloo on CPU, NCCL on GPU), model wrapping (DDP or FSDP2), and the few collectives
the training loop needs. A plain `python` run is world size 1 and touches none of torch.distributed."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from softar import SoftarError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (the tensor itself on one process)."""
        if not self.active:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.size

    def mean_grads(self, model: nn.Module) -> None:
        """Average the gradients over ranks in place, for updates that run outside DDP's forward (RL's replays)."""
        if not self.active:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # every rank reduces every parameter, whichever ones its step reached
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        torch.nn.utils.vector_to_parameters(flat / self.size, [p.grad for p in params])

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_world(device_name: str) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment, and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        from softar.device import pick_device

        return World(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise SoftarError("train.device: 'cuda' requested but no CUDA device is available")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=size)
    return World(rank, size, local_rank), device


def shutdown(finished: bool) -> None:
    """Leave the process group. After a run that finished on this rank the ranks first meet at a barrier (bounded:
    a rank that failed is torchrun's to report), so that none tears down its connections while another still writes
    its results; collecting garbage first lets a finished run's DDP wrapper release the group, so that gloo's
    worker threads are joined here rather than during interpreter exit (where a stray one aborts the process)."""
    if not dist.is_initialized():
        return
    try:
        if finished:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=120))
            else:
                dist.barrier()
    except Exception:  # a peer that failed: its own error is the one to show
        pass
    finally:
        gc.collect()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: torch.device, strategy: str,
         units: list[nn.Module] | tuple = ()) -> nn.Module:
    """DDP replicates the model; FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state, each of
    `units` (e.g. the transformer blocks) as its own group, then the rest."""
    if not world.active:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if last_micro_step:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _resync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _resync(model: nn.Module):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
