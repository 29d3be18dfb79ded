"""Warn once when a method that needs the training hooks trains without them.

A method with ``needs_hooks = True`` has each of its adapters registered here by ``Adapter.__init__``; a global
optimiser post-step hook then counts the optimiser steps that touch those adapters' parameters, and if a step happens
while the previous one was not followed by ``hooks.after_step()`` (which calls :func:`mark_driven`), a warning naming
the method and the three-line fix is shown once per method and process. An adapter whose ``hooks_done`` is True
(already consolidated) is no longer watched.

It lives below the methods (it imports nothing of lorakit) so that the base strategy can register its adapters
without importing the training loop; :mod:`lorakit.train.hooks` marks the adapters it drives.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="adalora", r=2, target_r=1, total_steps=4))
    >>> mark_driven(net[0].adapters["default"])  # what hooks.after_step() does for every adapter it drives
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

if TYPE_CHECKING:  # pragma: no cover
    from .base import Adapter

__all__ = ["FIX", "WARNED_METHODS", "mark_driven", "watch_adapter"]

_WATCHED: "weakref.WeakSet[Adapter]" = weakref.WeakSet()
_GENERATION = [0]  # bumped on every watch_adapter, so per-optimiser caches know to rebuild
_OPTIMIZERS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()
_HANDLE: list = []
#: methods already warned about in this process (tests clear it to see the warning again)
WARNED_METHODS: set[str] = set()

FIX = ("    hooks = lorakit.training_hooks(model)   # once, before the loop\n"
       "    hooks.after_step()                      # after optimizer.step(), before optimizer.zero_grad()\n"
       "    hooks.finish()                          # once, after the loop")


def watch_adapter(adapter: "Adapter") -> None:
    """Register an adapter of a ``needs_hooks`` method for the warn-once check (called by ``Adapter.__init__``).

    Example:
        >>> from lorakit.methods import get_method
        >>> get_method("adalora").needs_hooks  # its adapters are watched from construction on
        True
    """
    _WATCHED.add(adapter)
    adapter.__dict__["_lorakit_opt_steps"] = 0
    adapter.__dict__["_lorakit_hook_steps"] = 0
    _GENERATION[0] += 1
    if not _HANDLE:
        _HANDLE.append(register_optimizer_step_post_hook(_after_optimizer_step))


def mark_driven(adapter: "Adapter") -> None:
    """Record that the training hooks served every optimiser step seen so far for ``adapter`` (a no-op for an
    adapter that is not watched).

    Example:
        >>> import lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> mark_driven(net[0].adapters["default"])  # LoRA needs no hooks: nothing to record
    """
    if "_lorakit_opt_steps" in adapter.__dict__:
        adapter.__dict__["_lorakit_hook_steps"] = adapter.__dict__["_lorakit_opt_steps"]


def _watched_in(optimizer: torch.optim.Optimizer) -> list:
    """Weak references to the watched adapters whose parameters ``optimizer`` updates (cached per optimiser)."""
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    cached = _OPTIMIZERS.get(optimizer)
    if cached is not None and cached[0] == _GENERATION[0] and cached[1] == n_params:
        return cached[2]
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    refs = [weakref.ref(a) for a in list(_WATCHED) if any(id(p) in ids for p in a.parameters())]
    _OPTIMIZERS[optimizer] = (_GENERATION[0], n_params, refs)
    return refs


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _WATCHED:
        return
    for ref in _watched_in(optimizer):
        adapter = ref()
        if adapter is None or adapter.hooks_done:
            continue
        if not any(p.requires_grad for p in adapter.parameters()):
            continue
        state = adapter.__dict__
        # The hooks run right after this post-hook in a correct loop, so only a *previous* step left unserved
        # proves they are missing.
        if state["_lorakit_opt_steps"] > state["_lorakit_hook_steps"]:
            _warn_missing(adapter.method or type(adapter).__name__)
        state["_lorakit_opt_steps"] += 1


def _warn_missing(method: str) -> None:
    if method in WARNED_METHODS:
        return
    WARNED_METHODS.add(method)
    warnings.warn(
        f"lorakit: method {method!r} needs its training hooks, but optimizer.step() ran without "
        f"hooks.after_step(), so its training-time work (e.g. AdaLoRA's rank allocation) never happens. "
        f"Add these 3 lines to your loop:\n{FIX}\n"
        "(transformers.Trainer: pass callbacks=[lorakit.train.callbacks.LorakitCallback()] or use "
        "lorakit.train.callbacks.LorakitTrainer; lorakit's own Trainer calls them for you.)",
        UserWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """``stacklevel`` pointing at the first frame outside torch and lorakit (the user's ``optimizer.step()``)."""
    # this file is lorakit/methods/watch.py: two directories up is the package
    inside = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    frame, level = sys._getframe(2), 2  # level 1 is _warn_missing itself
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1
