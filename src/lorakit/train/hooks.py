"""Training hooks: how a method takes part in training, in any loop.

A method can add a loss term (AdaLoRA's orthogonal regulariser), do work after each optimiser step (AdaLoRA's
importance scores and rank budget) and consolidate at the end (prune to the kept ranks). In a plain PyTorch loop::

    hooks = lorakit.training_hooks(model)
    for batch in data:
        loss = task_loss(model, batch) + lorakit.regularization_loss(model)
        loss.backward(); optimizer.step()
        hooks.after_step()          # after optimizer.step(), before zero_grad(): gradients still there
        optimizer.zero_grad()
    hooks.finish()                  # consolidate: prune to kept ranks, fold gates, ...

The same object drives the transformers callback (:mod:`lorakit.train.callbacks`) and lorakit's own Trainer.

Per adapter, the hooks call the method class's classmethods ``adapter_after_step`` / ``adapter_finish`` /
``adapter_regularization`` (see :class:`lorakit.methods.base.Adapter`) with ``entries`` =
``[(layer_path, AdaptedLayer, Adapter), ...]``, for every adapter whose parameters train (``requires_grad``).

A method with ``needs_hooks = True`` has each of its adapters watched (:mod:`lorakit.methods.watch`): if an
optimiser step happens while the previous one was not followed by ``hooks.after_step()``, a warning naming the
method and the three-line fix is shown once per method and process.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..layers import AdaptedLayer
from ..methods.base import HookEntry
from ..methods.watch import WARNED_METHODS, mark_driven, watch_adapter
from ..registry import registry_or_none

__all__ = ["TrainingHooks", "regularization_loss", "training_hooks", "watch_adapter"]

# the warn-once watcher lives below the methods (lorakit.methods.watch); the old private name stays for callers
_WARNED = WARNED_METHODS


# ---------------------------------------------------------------------------------------------------------------
# which adapters the hooks drive
# ---------------------------------------------------------------------------------------------------------------
def _entries(model: nn.Module, name: str) -> list[HookEntry]:
    """``[HookEntry(path, layer, adapter)]`` of adapter ``name``, in the registry's layer order."""
    reg = registry_or_none(model)
    out = []
    for path in reg.layers.get(name, []):
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layer, AdaptedLayer) and name in layer.adapters:
            out.append(HookEntry(path, layer, layer.adapters[name]))
    return out


def _trains(entries: list, shared: nn.Module | None) -> bool:
    """True if some parameter of this adapter requires grad (frozen or loaded-for-inference adapters are skipped)."""
    for _, _, adapter in entries:
        for p in adapter.parameters():
            if p.requires_grad:
                return True
    return shared is not None and any(p.requires_grad for p in shared.parameters())


def _training_adapters(model: nn.Module) -> Iterator[tuple[str, type, list, Any]]:
    """``(name, method class, entries, config)`` for every adapter of ``model`` that trains."""
    reg = registry_or_none(model)
    if reg is None:
        return
    for name, config in list(reg.configs.items()):
        entries = _entries(model, name)
        if entries and _trains(entries, reg.shared.get(name)):
            yield name, type(entries[0][2]), entries, config


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------
class TrainingHooks:
    """Drives the methods' training hooks for one model. Create with :func:`training_hooks`.

    ``step`` counts the optimiser steps seen by :meth:`after_step` (1 after the first step). ``state_dict`` /
    ``load_state_dict`` carry ``step`` and the methods' training state (e.g. AdaLoRA's importance averages) for an
    exact resume.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.step = 0
        self._driven: set[str] = set()  # adapters seen by after_step: finish() consolidates them even if frozen later

    def after_step(self) -> None:
        """Call after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (methods read the gradients)."""
        self.step += 1
        for name, cls, entries, config in _training_adapters(self.model):
            self._driven.add(name)
            cls.adapter_after_step(self.model, name, entries, config, self.step)
            for _, _, adapter in entries:
                mark_driven(adapter)

    def finish(self) -> None:
        """Consolidate every trained adapter at the end of training (AdaLoRA: prune to the kept ranks)."""
        reg = registry_or_none(self.model)
        if reg is None:
            return
        names = {name for name, *_ in _training_adapters(self.model)} | self._driven
        for name in [n for n in reg.configs if n in names]:
            entries = _entries(self.model, name)
            if entries:
                type(entries[0][2]).adapter_finish(self.model, name, entries, reg.configs[name])

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int, "adapters": {name: method state}}`` (tensors, numbers, dicts, lists)."""
        adapters = {}
        for name, cls, entries, config in _training_adapters(self.model):
            state = cls.adapter_state_dict(self.model, name, entries, config)
            if state:
                adapters[name] = state
        return {"step": self.step, "adapters": adapters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.step = int(state.get("step", 0))
        saved = state.get("adapters", {})
        for name, cls, entries, config in _training_adapters(self.model):
            if name in saved:
                cls.adapter_load_state_dict(self.model, name, entries, config, saved[name])
            for _, _, adapter in entries:
                mark_driven(adapter)

    def __repr__(self) -> str:
        return f"TrainingHooks(step={self.step})"


def training_hooks(model: nn.Module) -> TrainingHooks:
    """The training hooks of ``model``'s adapters, for a hand-written training loop.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="adalora", r=4, target_r=2, total_steps=3))
        >>> opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        >>> hooks = lorakit.training_hooks(net)
        >>> for _ in range(3):
        ...     loss = net(torch.randn(4, 8)).pow(2).mean() + lorakit.regularization_loss(net)
        ...     loss.backward(); opt.step()
        ...     hooks.after_step()
        ...     opt.zero_grad()
        >>> hooks.finish()
        >>> hooks.step
        3
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"training_hooks(model) needs a torch.nn.Module, got {type(model).__name__}")
    return TrainingHooks(model)


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the training adapters' extra loss terms (AdaLoRA's orthogonal regulariser), as a 0-dim tensor.

    Zero (a constant, no gradient) when no method contributes, so it can always be added to the task loss.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> float(lorakit.regularization_loss(net))
        0.0
    """
    total = None
    for name, cls, entries, config in _training_adapters(model):
        term = cls.adapter_regularization(entries, config)
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=_model_device(model))
    return total.reshape(())
