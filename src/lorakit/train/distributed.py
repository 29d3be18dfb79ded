"""Multi-process training on PyTorch's own engine (torchrun + torch.distributed): DDP or FSDP2.

Nothing here is home-made: processes come from ``torchrun``, gradients are averaged by ``DistributedDataParallel``
or sharded by ``torch.distributed.fsdp.fully_shard``. This module only reads the environment torchrun sets, picks
the backend (NCCL on GPU, gloo on CPU) and tells the trainer which rank writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise.

    Example:
        >>> setup().world_size  # single process
        1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def wrap(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Wrap ``model`` for data-parallel ("ddp") or sharded ("fsdp", FSDP2 ``fully_shard``) training.

    With one process the model is returned unchanged.
    """
    if not info.enabled or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard every transformer block (modules holding adapted layers, one level above them), then the root.
        blocks = _blocks(model)
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"distributed strategy {strategy!r} is invalid; allowed: ddp, fsdp, none")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Repeated blocks (children of ModuleLists), the usual FSDP wrapping unit for transformers."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(child for child in module.children() if any(p.numel() for p in child.parameters()))
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return float(t.item() / info.world_size)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
