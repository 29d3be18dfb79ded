"""Multi-process training on PyTorch's own engine (torchrun + torch.distributed): DDP or FSDP2.

Nothing here is home-made: processes come from ``torchrun``, gradients are averaged by ``DistributedDataParallel``
or sharded by ``torch.distributed.fsdp.fully_shard``. This module only reads the environment torchrun sets, picks
the backend (NCCL on GPU, gloo on CPU) and tells the trainer which rank writes files.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model import adapted_layers


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
        # lorakit started the group, so lorakit ends it: a gloo group still alive when the interpreter finalises
        # aborts the process from its worker threads (SIGABRT, "terminate called without an active exception").
        atexit.register(_destroy_group)
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

        check_shardable(model)
        # Shard every transformer block (modules holding adapted layers, one level above them), then the root.
        blocks = _blocks(model)
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"distributed strategy {strategy!r} is invalid; allowed: ddp, fsdp, none")


def check_shardable(model: nn.Module) -> None:
    """Raise (before anything is sharded) if an adapter's training hooks cannot run on FSDP shards.

    Every built-in member trains under FSDP2 (AdaLoRA, SoRA and Delta-LoRA gather what their hooks need); a
    registered member whose strategy says ``shardable = False`` is refused.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="sora", r=2))
        >>> check_shardable(net)  # SoRA's gate step runs on shards
    """
    methods = sorted({a.method for _, layer in adapted_layers(model) for a in layer.adapters.values()
                      if not a.shardable})
    if methods:
        raise ValueError(f"strategy 'fsdp' cannot train {', '.join(methods)} adapters: their training hooks (rank "
                         f"pruning, gates, base-weight updates) work on whole tensors and FSDP shards them; use "
                         f"strategy 'ddp' for these methods")


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


def is_sharded(model: nn.Module) -> bool:
    """True if FSDP2 has sharded the model's parameters (they are DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def gather_full(obj):
    """A nested state with every DTensor replaced by its full tensor (collective: all ranks, same order)."""
    if hasattr(obj, "full_tensor"):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: gather_full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v) for v in obj)
    return obj


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a full (gathered) optimizer state, shard each per-parameter tensor like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    for param, state in optimizer.state.items():
        if not hasattr(param, "device_mesh"):
            continue
        for key, value in list(state.items()):
            if torch.is_tensor(value) and not hasattr(value, "device_mesh") and value.shape == param.shape:
                state[key] = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return float(t.item() / info.world_size)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if ``flag`` is set on any rank (so that all ranks take the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _destroy_group() -> None:
    if dist.is_initialized():
        try:
            # every rank stops using the group before any rank tears its connections down: a peer closing while
            # another still reads made gloo abort at exit (SIGABRT, seen in CI)
            dist.barrier()
        except Exception:  # a peer already gone (a failed run): tear down anyway
            pass
        dist.destroy_process_group()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
