"""Data parallelism with PyTorch's own engines: `torchrun` starts the processes, DDP or FSDP2 keep them in
step (gloo on the CPU, NCCL on GPUs). One process runs the same code with `world = 1`.

The global batch is fixed by the config (micro x accumulation x processes); each process takes its own
contiguous share of every step's rows, and losses are divided by the step's global denominator and
multiplied by the number of processes, since DDP and FSDP average gradients: the result is the gradient
one process computes for the whole batch. Full state dicts are gathered to rank 0 for checkpoints and
export (`torch.distributed.checkpoint.state_dict`), so a run resumes on any number of processes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llamalab.errors import LlamalabError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    strategy: str = "single"  # single | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, strategy: str) -> World:
        """The process group torchrun describes in the environment (one process without it)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), size, strategy)

    def all_sum(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def wrap(module: nn.Module, world: World, blocks: list[nn.Module]) -> nn.Module:
    """`module` under DDP, or with each block and then the whole sharded by FSDP2 (one process: as is)."""
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)
    if world.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(module)  # the root: embedding, final norm and (tied) head in one group
        return module
    return module


@contextmanager
def no_sync(wrapped: nn.Module, active: bool):
    """Skip the gradient all-reduce of micro-batches before the last of a step (DDP; FSDP2 defers it)."""
    if not active:
        yield
        return
    if hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield


def full_state(module: nn.Module, optimizer, trainable_only: bool):
    """(model state, optimizer state), full tensors on the CPU, keyed by parameter name (on every rank;
    rank 0 writes them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_state_dict(module, optimizer, options=options)


def full_model_state(module: nn.Module) -> dict:
    """Every weight of `module` as full CPU tensors (gathered from the shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, optimizer, model_state, optim_state) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    try:
        set_state_dict(
            module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise LlamalabError(
            f"the checkpoint does not fit this model ({str(e).splitlines()[0][:200]})"
        ) from None
