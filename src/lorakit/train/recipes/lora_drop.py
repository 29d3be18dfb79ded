"""LoRA-drop's recipe (Zhou et al., COLING 2025, arXiv 2402.07721), methods.md §10 and §17.

Two stages, run by one call, :func:`run_lora_drop` (also ``lorakit.run_lora_drop``); the layer strategy they
attach is :class:`lorakit.methods.lora_drop.LoraDropAdapter`.

1. **Importance.** LoRA on every target layer is trained briefly on a random fraction ``drop_fraction`` of the
   training data (default 0.1, at least one batch). On that sample, with dropout off, each layer's importance is
   ``g_i = Σ ‖s·B_i A_i x_i‖²`` (sum over every token/position of every sampled example, ``x_i`` = that layer's
   input), normalised ``I_i = g_i / Σ_j g_j``. Layers are ranked jointly (all module types together), highest
   first, and selected until the cumulative share reaches ``drop_threshold`` (default 0.9), or the ``drop_top_n``
   highest when that is set.
2. **Fine-tuning.** Selected layers keep their own LoRA pair, continuing from their stage-1 weights. All unselected
   layers of one *module type* share ONE freshly initialised pair. The model then trains on the full data.

The importances and the selection are returned (:class:`LoraDropResult`) and stored in the adapter's
``extra["lora_drop"]``, which ``lorakit.save`` writes into ``lorakit_config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset

from ...config import AdapterConfig
from ...methods.lora_drop import EXTRA_KEY, LoraDropAdapter
from ...model import adapted_layers, attach, delete, registry, saved_copy
from ..trainer import TrainConfig, Trainer, default_loss, stack_collate

if TYPE_CHECKING:  # pragma: no cover
    from ...layers import AdaptedLayer


# ---------------------------------------------------------------------------------------------------------------
# importance and selection
# ---------------------------------------------------------------------------------------------------------------
def default_forward(model: nn.Module, batch: Any) -> Any:
    """How :func:`layer_importance` feeds a batch: ``model(**batch)`` for dicts, ``model(batch[0])`` for
    ``(inputs, targets)`` tuples/lists, ``model(batch)`` otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Any, name: str = "default",
                     forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, float]:
    """Raw importance ``Σ ‖s·B A x‖²`` of every layer of adapter ``name`` over ``batches`` (dropout off).

    The sum runs over every example and position of each layer's input. The model runs in eval mode and is put
    back in its previous mode afterwards.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="lora_drop", r=2))
        >>> layer_importance(net, [torch.randn(3, 4)])  # B starts at 0
        {'0': 0.0}
    """
    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(reg.configs)}")
    forward_fn = forward_fn or default_forward
    totals: dict[str, torch.Tensor] = {}
    handles = []

    def hook(path: str):
        def fn(module: "AdaptedLayer", args: tuple, output: torch.Tensor) -> None:
            adapter = module.adapters[name]
            d = adapter.branch_output(module, args[0])
            value = d.float().pow(2).sum()
            totals[path] = totals[path] + value if path in totals else value
        return fn

    layers = [(p, layer) for p, layer in adapted_layers(model) if name in layer.adapters]
    for path, layer in layers:
        if not isinstance(layer.adapters[name], LoraDropAdapter):
            raise ValueError(f"layer_importance needs a lora_drop adapter; {name!r} is {reg.configs[name].method}")
        handles.append(layer.register_forward_hook(hook(path)))
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        for batch in batches:
            forward_fn(model, _to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {path: float(totals[path]) if path in totals else 0.0 for path, _ in layers}


def select_layers(importance: dict[str, float], threshold: float = 0.9, top_n: int | None = None) -> list[str]:
    """Layers to keep, highest importance first: the ``top_n`` highest, or the fewest whose normalised importances
    sum to at least ``threshold``. Ties keep the input order. Returned in the input (model) order.

    Example:
        >>> select_layers({"a": 1.0, "b": 8.0, "c": 1.0}, threshold=0.85)
        ['a', 'b']
        >>> select_layers({"a": 1.0, "b": 8.0, "c": 1.0}, top_n=1)
        ['b']
    """
    total = sum(importance.values())
    if not importance or not total > 0 or not math.isfinite(total):
        raise ValueError(f"cannot select layers: the importances sum to {total!r} (did stage 1 train? B starts at "
                         "0, so an untrained adapter has zero importance everywhere)")
    order = sorted(importance, key=lambda p: -importance[p])  # stable: ties keep input order
    if top_n is not None:
        chosen = set(order[:top_n])
    else:
        chosen, cum = set(), 0.0
        for p in order:
            chosen.add(p)
            cum += importance[p] / total
            if cum >= threshold - 1e-9:
                break
    return [p for p in importance if p in chosen]


# ---------------------------------------------------------------------------------------------------------------
# the two-stage procedure
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoraDropResult:
    """What :func:`run_lora_drop` measured and decided.

    ``importance``: normalised share per layer (sums to 1); ``raw_importance``: ``Σ ‖s·B A x‖²``; ``selected``:
    layers with their own pair; ``shared``: module type -> layers sharing its pair; ``stage1`` / ``stage2``: what
    the training function (or lorakit's Trainer) returned.
    """

    importance: dict[str, float]
    raw_importance: dict[str, float]
    selected: list[str]
    shared: dict[str, list[str]]
    threshold: float
    top_n: int | None
    sample_size: int
    stage1: Any = None
    stage2: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible report (without the training outputs)."""
        return {"importance": self.importance, "raw_importance": self.raw_importance, "selected": self.selected,
                "shared": self.shared, "threshold": self.threshold, "top_n": self.top_n,
                "sample_size": self.sample_size}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON to ``path``."""
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)


def _is_loader(data: Any) -> bool:
    return isinstance(data, DataLoader)


def _sample(data: Any, fraction: float, min_examples: int, generator: torch.Generator) -> tuple[Any, int]:
    """A random ``fraction`` of ``data`` (at least one batch), of the same kind: a DataLoader or a dataset."""
    if _is_loader(data):
        ds = data.dataset
        if not isinstance(ds, IterableDataset) and data.batch_size is not None:
            n = len(ds)
            k = min(n, max(data.batch_size, math.ceil(fraction * n)))
            idx = torch.randperm(n, generator=generator)[:k].tolist()
            loader = DataLoader(Subset(ds, idx), batch_size=data.batch_size,
                                shuffle=isinstance(data.sampler, RandomSampler), collate_fn=data.collate_fn,
                                drop_last=data.drop_last, num_workers=data.num_workers, pin_memory=data.pin_memory)
            return loader, k
        try:
            n_batches = len(data)
        except TypeError:
            raise ValueError("run_lora_drop needs a DataLoader with a length (or a map-style dataset) to sample "
                             "drop_fraction of it") from None
        k = max(1, math.ceil(fraction * n_batches))
        batches = []
        for batch in data:  # an iterable/custom-batched loader: its first k batches
            batches.append(batch)
            if len(batches) == k:
                break
        return batches, k
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be a torch DataLoader or a dataset with __len__ and __getitem__, got "
                        f"{type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ValueError("data is empty")
    k = min(n, max(min_examples, math.ceil(fraction * n)))
    idx = torch.randperm(n, generator=generator)[:k].tolist()
    return Subset(data, idx), k


def _batches(sample: Any, batch_size: int, collate_fn: Callable) -> Any:
    """Iterate a sample as batches: a DataLoader / list of loader batches as is, a dataset in collated chunks."""
    if _is_loader(sample) or isinstance(sample, list):
        yield from sample
        return
    n = len(sample)
    for start in range(0, n, batch_size):
        yield collate_fn([sample[i] for i in range(start, min(n, start + batch_size))])


def run_lora_drop(model: nn.Module, config: AdapterConfig, data: Any,
                  train_fn: Callable[[nn.Module, Any], Any] | None = None, name: str = "default", *,
                  trainer_config: Any = None, stage1_trainer_config: Any = None,
                  loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                  collate_fn: Callable[[list], Any] | None = None,
                  forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                  batch_size: int | None = None, report_path: str | os.PathLike | None = None) -> LoraDropResult:
    """Run LoRA-drop end to end on ``model`` (in place): stage 1, importance, selection, stage 2.

    ``data`` is a DataLoader or a dataset (``__len__`` + ``__getitem__``). Training uses ``train_fn(model, data)``
    — your own loop over what it is given (a DataLoader, or a dataset/subset of examples) — or, when ``train_fn``
    is None, lorakit's :class:`~lorakit.train.trainer.Trainer` with ``trainer_config`` (stage 1 defaults to the
    same config with ``steps`` scaled by ``drop_fraction``; override with ``stage1_trainer_config``), ``loss_fn``
    and ``collate_fn``. Stage 1 sees a random ``config.drop_fraction`` of ``data`` (seeded by ``config.seed``).
    Importance is measured on that sample: a DataLoader's own batches, or chunks of ``batch_size`` examples
    (default: the trainer's batch size, else 8) joined by ``collate_fn`` (default: stack tensors by key), fed by
    ``forward_fn(model, batch)`` (default :func:`default_forward`).

    The result's report is also stored in the adapter's ``extra["lora_drop"]`` (saved by :func:`lorakit.save`)
    and, if ``report_path`` is given, written there as JSON.

    Example:
        >>> import torch, lorakit
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> xs = torch.randn(64, 4); data = list(zip(xs, xs.sum(1, keepdim=True)))
        >>> def train(model, examples):
        ...     opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ...     for x, y in torch.utils.data.DataLoader(examples, batch_size=8):
        ...         torch.nn.functional.mse_loss(model(x), y).backward(); opt.step(); opt.zero_grad()
        >>> cfg = lorakit.AdapterConfig(method="lora_drop", r=2, drop_fraction=0.5, drop_top_n=1, seed=0)
        >>> result = run_lora_drop(net, cfg, data, train)
        >>> len(result.selected)
        1
    """
    if not isinstance(config, AdapterConfig) or config.method != LoraDropAdapter.method:
        raise ValueError(f"run_lora_drop needs an AdapterConfig with method='lora_drop', got "
                         f"{config.method if isinstance(config, AdapterConfig) else type(config).__name__!r}")
    if config.drop_selected is not None:
        raise ValueError(f"AdapterConfig.drop_selected={config.drop_selected!r} must be None for run_lora_drop "
                         "(stage 1 measures it); to attach a known selection use lorakit.attach")
    if train_fn is not None and not callable(train_fn):
        raise TypeError(f"train_fn must be callable(model, data), got {type(train_fn).__name__}")
    if train_fn is None:
        trainer_config = trainer_config or TrainConfig()
        if not isinstance(trainer_config, TrainConfig):
            raise TypeError(f"trainer_config must be a lorakit TrainConfig, got {type(trainer_config).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: None or an integer >= 1")
    bs = batch_size or (trainer_config.batch_size if trainer_config is not None else 8)
    collate = collate_fn or stack_collate
    generator = torch.Generator().manual_seed(config.seed if config.seed is not None else 0)
    sample, sample_size = _sample(data, config.drop_fraction, bs, generator)

    def train(stage_data: Any, stage: int) -> Any:
        if train_fn is not None:
            return train_fn(model, stage_data)
        examples, stage_collate = stage_data, collate
        if _is_loader(stage_data):
            examples = stage_data.dataset
            stage_collate = collate_fn or stage_data.collate_fn
        elif isinstance(stage_data, list) and _is_loader(data):  # first batches of an iterable loader
            raise ValueError("lorakit's Trainer needs a map-style dataset; for an iterable DataLoader pass train_fn")
        cfg = trainer_config
        if stage == 1:
            cfg = stage1_trainer_config or dataclasses.replace(
                trainer_config, steps=max(1, math.ceil(trainer_config.steps * config.drop_fraction)),
                output_dir=None, resume=None, save_every=0)
        return Trainer(model, cfg, examples, collate_fn=stage_collate, loss_fn=loss_fn or default_loss).train()

    # stage 1: LoRA everywhere, on the sample
    stage1_config = config.replace(drop_selected=None)
    attach(model, stage1_config, name)
    try:
        stage1_out = train(sample, 1)
        raw = layer_importance(model, _batches(sample, bs, collate), name, forward_fn)
    except BaseException:
        delete(model, name)  # leave the model as it came
        raise
    total = sum(raw.values())
    if not total > 0:
        delete(model, name)
        raise ValueError("LoRA-drop stage 1 left every layer with zero importance (‖s·B A x‖² = 0): did train_fn "
                         "run optimiser steps on the adapter's parameters?")
    importance = {p: v / total for p, v in raw.items()}
    selected = select_layers(raw, config.drop_threshold, config.drop_top_n)
    keep = {}
    for path, layer in adapted_layers(model):
        if path in selected:
            a, b = layer.adapters[name].factors()
            keep[path] = (a.detach().clone(), b.detach().clone())
    # modules_to_save trained in stage 1 continue in stage 2, like the kept pairs (each adapter owns its copy)
    heads = {p: {k: v.detach().clone() for k, v in saved_copy(model, p, name).state_dict().items()}
             for p in registry(model).modules_to_save.get(name, [])}
    delete(model, name)

    # stage 2: selected layers continue, the rest share one fresh pair per module type
    attach(model, config.replace(drop_selected=selected), name)
    reg = registry(model)
    for path, layer in adapted_layers(model):
        if path in keep:
            layer.adapters[name].set_factors(*keep[path])
    for path, state in heads.items():
        saved_copy(model, path, name).load_state_dict(state)
    shared_pairs = reg.shared.get(name)
    shared = {k: list(v) for k, v in shared_pairs.members.items()} if shared_pairs is not None else {}
    result = LoraDropResult(importance=importance, raw_importance=raw, selected=selected, shared=shared,
                            threshold=config.drop_threshold, top_n=config.drop_top_n, sample_size=sample_size,
                            stage1=stage1_out)
    reg.extra.setdefault(name, {})[EXTRA_KEY] = result.to_dict()
    if report_path is not None:
        result.save(report_path)
    result.stage2 = train(data, 2)
    return result


__all__ = ["LoraDropResult", "default_forward", "layer_importance", "run_lora_drop", "select_layers"]
