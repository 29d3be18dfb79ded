"""SoRA — Sparse Low-rank Adaptation (Ding et al., EMNLP 2023), methods.md §9 and §17.

A LoRA with a trainable gate vector ``g ∈ R^r`` between the down and up projections::

    y + s · B (g ⊙ A x)          ΔW = s · B diag(g) A

lorakit's choices (§17): the gate starts at ones (so the adapter starts as plain LoRA); after every optimiser
step the gate takes the proximal step of ``ξ‖g‖₁``, a soft-threshold with threshold ``lr·ξ``::

    g ← sign(g) · max(|g| − lr·ξ, 0)

where ``lr`` is the learning rate the optimiser actually applied to the gate at that step (read from its parameter
group, so warm-up/decay schedules are followed; ``AdapterConfig.sora_lr`` is the fallback when the step could not
be observed). The official code's ``sparse_optimizer.py`` uses ``ξ`` alone as the threshold; to reproduce it
divide your ξ by the gate lr. No extra L1 loss term is added. Gates get their own optimiser group without weight
decay (:meth:`SoraAdapter.optimizer_options`; ``lorakit.make_optimizer`` honours it — when you build the optimiser
yourself, put the ``gate`` parameters in a group with ``weight_decay=0``, a warning reminds you otherwise).

``sora_schedule`` (optional) raises ξ during training (the paper's sparsifying scheduler): either a list of ξ
values spread evenly over ``total_steps`` optimiser steps, or a list of ``[start_step, ξ]`` pairs.

At the end of training (``hooks.finish()``) every layer is pruned to a plain LoRA of rank ``nnz(g)`` — rows of A
and columns of B with ``g_i = 0`` are dropped and the gate is folded into B — which computes exactly the same
function. The adapter then *is* a LoRA (``method="lora"`` with a per-layer ``rank_pattern``), so it saves, loads,
merges and exports like any LoRA; :func:`kept_ranks` / :func:`rank_report` list the result. A layer whose gates
all reached zero keeps a rank-1 all-zero LoRA (it contributes nothing; its kept rank is reported as 0).

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="sora", r=4, targets=["0"], sora_xi=1e-3))
    >>> kept_ranks(net)
    {'0': 4}
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..registry import adapted_layers, registry
from .base import Adapter, kaiming_uniform, whole
from .lora import LoraAdapter, can_fuse, fused_low_rank

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer, LayerOps

EXTRA_KEY = "sora"


def soft_threshold(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of ``threshold·‖g‖₁``: ``sign(g)·max(|g| − threshold, 0)``.

    Example:
        >>> soft_threshold(torch.tensor([0.5, -0.05, -2.0]), 0.1)
        tensor([ 0.4000,  0.0000, -1.9000])
    """
    # written with where() so cut entries are +0.0 (sign(g)·0 would leave -0.0)
    return torch.where(g.abs() > threshold, g - threshold * torch.sign(g), torch.zeros_like(g))


def xi_at(config: "AdapterConfig", step: int) -> float:
    """The soft-threshold strength ξ at optimiser ``step`` (counting from 1).

    Without ``sora_schedule`` this is ``sora_xi``. A list of values is spread evenly over ``total_steps``
    (value ``k`` of ``n`` covers steps ``(k·T/n, (k+1)·T/n]``; the last value holds after ``T``). A list of
    ``[start_step, ξ]`` pairs gives ξ from each start step on (``sora_xi`` before the first one).

    Example:
        >>> from lorakit import AdapterConfig
        >>> cfg = AdapterConfig(method="sora", sora_schedule=[0.0, 1e-3], total_steps=10)
        >>> xi_at(cfg, 5), xi_at(cfg, 6)
        (0.0, 0.001)
    """
    schedule = config.sora_schedule
    if not schedule:
        return float(config.sora_xi)
    if _is_pairs(schedule):
        xi = float(config.sora_xi)
        for start, value in schedule:
            if step >= start:
                xi = float(value)
        return xi
    n = len(schedule)
    index = min(n - 1, max(0, (step - 1) * n // int(config.total_steps)))
    return float(schedule[index])


def _is_pairs(schedule: Any) -> bool:
    return all(isinstance(v, (list, tuple)) for v in schedule)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- observing the gate's learning rate ----------------------------------------------------------------------------
# The prox threshold is lr·ξ with the lr the optimiser used for the gate at this very step. A global optimizer
# step post-hook (cheap: it returns at once while no SoRA adapter exists) reads it from the gate's param group.
_LIVE: "weakref.WeakSet[SoraAdapter]" = weakref.WeakSet()
_HOOK: Any = None
_WARNED_DECAY: set[str] = set()


def _observe_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _LIVE:
        return
    gates = {id(a.gate): a for a in list(_LIVE)}
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = gates.get(id(p))
            if owner is None or owner.gate is not p:
                continue
            lr = group.get("lr", None)
            owner._step_lr = float(lr) if lr is not None else None
            decay = group.get("weight_decay", 0.0) or 0.0
            if float(decay) != 0.0 and not _WARNED_DECAY:  # once per process
                _WARNED_DECAY.add(owner.path)
                warnings.warn(
                    f"SoRA gate of {owner.path!r} (and maybe others) is in an optimiser group with weight_decay={decay}; gates must "
                    "not decay (methods.md §9). Build the optimiser with lorakit.make_optimizer, or put the "
                    "'gate' parameters in their own group with weight_decay=0.", stacklevel=3)


def _ensure_hook() -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_observe_step)


class SoraAdapter(Adapter):
    """SoRA: LoRA with a soft-thresholded gate; see the module docstring."""

    method = "sora"
    needs_hooks = True
    allowed_inits = ("kaiming",)

    def __init__(self, ops: "LayerOps", config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        dtype, device = ops.adapter_dtype(), ops.device()
        self.A = nn.Parameter(torch.zeros(self.r, self.in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=dtype, device=device))
        self.gate = nn.Parameter(torch.ones(self.r, dtype=dtype, device=device))
        self._config = config  # for the schedule and the fallback lr in after_step
        self._step_lr: float | None = None
        _LIVE.add(self)  # lets the step hook find this gate
        _ensure_hook()

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy / unpickling bypass __init__
        super().__setstate__(state)
        _LIVE.add(self)
        _ensure_hook()

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        super().validate_config(config)
        if not _number(config.sora_xi) or config.sora_xi < 0:
            raise ValueError(f"AdapterConfig.sora_xi={config.sora_xi!r} is invalid; allowed: a number >= 0")
        if config.sora_lr is not None and (not _number(config.sora_lr) or config.sora_lr <= 0):
            raise ValueError(f"AdapterConfig.sora_lr={config.sora_lr!r} is invalid; allowed: None (the main lr) "
                             "or a positive number")
        schedule = config.sora_schedule
        if schedule is None:
            return
        allowed = ("None, a non-empty non-decreasing list of xi values >= 0 (with total_steps), or a list of "
                   "[start_step, xi] pairs with increasing start steps")
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, (list, tuple)) or not schedule:
            raise ValueError(f"AdapterConfig.sora_schedule={schedule!r} is invalid; allowed: {allowed}")
        if _is_pairs(schedule):
            ok = all(len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool) and p[0] >= 0
                     and _number(p[1]) and p[1] >= 0 for p in schedule)
            ok = ok and all(a[0] < b[0] for a, b in zip(schedule, schedule[1:]))
        else:
            ok = all(_number(v) and v >= 0 for v in schedule)
            ok = ok and all(a <= b for a, b in zip(schedule, schedule[1:]))
            if ok and (not isinstance(config.total_steps, int) or config.total_steps < 1):
                raise ValueError(f"AdapterConfig.total_steps={config.total_steps!r} is invalid for a sora_schedule "
                                 "given as a list of values; set total_steps to the number of optimiser steps "
                                 "(or give [start_step, xi] pairs)")
        if not ok:
            raise ValueError(f"AdapterConfig.sora_schedule={schedule!r} is invalid; allowed: {allowed}")
        config.sora_schedule = [list(p) for p in schedule] if _is_pairs(schedule) else list(schedule)

    # -- init / forward -----------------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator):
        with torch.no_grad():
            self.A.copy_(kaiming_uniform((self.r, self.in_features), self.in_features, generator))
            self.B.zero_()
            self.gate.fill_(1.0)  # §17: start as plain LoRA (the official code draws randn)
        return None

    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xa = self.dropout(x)
        if xa.is_floating_point() and xa.dtype != self.A.dtype:
            xa = xa.to(self.A.dtype)
        z = layer.ops.down(xa, self.A) * layer.ops.per_mid(self.gate)
        if z.dtype == y.dtype:
            return layer.ops.up_add(y, z, self.B, self.scaling)
        return y + (layer.ops.up(z, self.B) * self.scaling).to(y.dtype)

    def fused_forward(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor | None:
        """The layer output in one fused op (LoRA's, with ``diag(g)·A`` as the down factor), or None."""
        if not can_fuse(self, layer, x, (self.A, self.gate, self.B)):
            return None
        return fused_low_rank(layer, x, self.A * self.gate.view(-1, 1), self.B, self.scaling)

    def delta_weight(self, layer: "AdaptedLayer | None" = None) -> torch.Tensor:
        acc = torch.promote_types(self.A.dtype, torch.float32)
        return self.scaling * ((self.B.to(acc) * self.gate.to(acc)) @ self.A.to(acc))

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A.detach(), self.B.detach() * self.gate.detach(), self.scaling

    # -- training hooks -----------------------------------------------------------------------------------------
    def optimizer_options(self, param_name: str, config: "AdapterConfig") -> dict | None:
        """Gates: no weight decay, and ``sora_lr`` if set (their own parameter group)."""
        if param_name.split(".")[-1] != "gate":
            return None
        options: dict[str, Any] = {"weight_decay": 0.0}
        if config.sora_lr is not None:
            options["lr"] = float(config.sora_lr)
        return options

    def after_step(self, layer: "AdaptedLayer", step: int) -> None:
        """Proximal step on the gate: ``g ← sign(g)·max(|g| − lr·ξ, 0)``."""
        if not self.gate.requires_grad:
            return
        lr = self._step_lr if self._step_lr is not None else self._config.sora_lr
        if lr is None:
            raise RuntimeError(
                f"SoRA ({self.path}): the optimiser step that updated the gate was not observed, so its learning "
                "rate is unknown; set AdapterConfig.sora_lr to the gate learning rate")
        threshold = lr * xi_at(self._config, step)
        if threshold > 0:
            with torch.no_grad():
                self.gate.copy_(soft_threshold(self.gate, threshold))

    @classmethod
    def adapter_finish(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig") -> None:
        """Replace every layer's SoRA adapter by the plain LoRA of rank ``nnz(g)`` computing the same function."""

        merged = [path for path, layer, _ in entries if name in layer.merged]
        if merged:
            raise ValueError(f"SoRA adapter {name!r} is merged in {merged[:3]}; call lorakit.unmerge(model) "
                             "before finishing (pruning re-creates the factors)")
        pruned = []
        for path, layer, adapter in entries:
            if not isinstance(adapter, SoraAdapter):
                return  # already finished
            # whole tensors under FSDP2 (the gate step is elementwise and runs on shards; pruning needs all of it)
            gate, a_full, b_full = (whole(t.detach()) for t in (adapter.gate, adapter.A, adapter.B))
            mask = gate != 0
            k = int(mask.sum())
            if k:
                a = a_full[mask]
                b = b_full[:, mask] * gate[mask]
            else:  # keep a zero rank-1 LoRA: a rank-0 adapter does not exist in the config
                a = adapter.A.new_zeros(1, adapter.in_features)
                b = adapter.B.new_zeros(adapter.out_features, 1)
            pruned.append((path, layer, adapter, a, b, k))
        ranks = {path: max(k, 1) for path, *_, k in pruned}
        alphas = {}
        for path, _, adapter, _, _, k in pruned:
            r = max(k, 1)
            alphas[path] = adapter.scaling * (math.sqrt(r) if config.scaling == "rslora" else r)
        new_config = config.replace(method="lora", r=max(ranks.values()), rank_pattern=ranks,
                                    alpha_pattern=alphas, init="kaiming")
        built = []
        for path, layer, adapter, a, b, k in pruned:
            lora = LoraAdapter(layer.ops, new_config, path)
            lora.scaling = adapter.scaling  # exactly the old s (alpha/r may differ in the last bit)
            lora._set(a, b)
            lora.train(adapter.training)
            for p in lora.parameters():
                p.requires_grad_(adapter.A.requires_grad)
            built.append((layer, lora))
        # commit
        for layer, lora in built:
            layer.adapters[name] = lora
            layer.refresh()
        reg = registry(model)
        reg.configs[name] = new_config
        reg.extra.setdefault(name, {})[EXTRA_KEY] = {
            "finished": True,
            "initial_ranks": {path: adapter.r for path, _, adapter, *_ in pruned},
            "kept_ranks": {path: k for path, *_, k in pruned},
            "scaling": {path: adapter.scaling for path, _, adapter, *_ in pruned},
        }


def kept_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Per layer path, the number of non-zero gates (during training) or the kept rank (after ``finish``).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="sora", r=2))
        >>> kept_ranks(net)
        {'0': 2}
    """

    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(reg.configs)}")
    info = reg.extra.get(name, {}).get(EXTRA_KEY)
    if info and info.get("finished"):
        return dict(info["kept_ranks"])
    if reg.configs[name].method != "sora":
        raise ValueError(f"adapter {name!r} is {reg.configs[name].method!r}, not a SoRA adapter")
    return {path: int((layer.adapters[name].gate != 0).sum())
            for path, layer in adapted_layers(model) if name in layer.adapters}


def rank_report(model: nn.Module, name: str = "default") -> str:
    """A table of initial and kept ranks per layer, with the total.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="sora", r=2))
        >>> rank_report(net).splitlines()[-1].split()
        ['total', '2', '2']
    """

    kept = kept_ranks(model, name)
    reg = registry(model)
    info = reg.extra.get(name, {}).get(EXTRA_KEY) or {}
    initial = info.get("initial_ranks") or {p: reg.configs[name].rank_for(p) for p in kept}
    width = max([len(p) for p in kept] + [36])
    lines = [f"{'layer':<{width}}{'r':>8}{'kept':>8}"]
    for path, k in kept.items():
        lines.append(f"{path:<{width}}{initial[path]:>8}{k:>8}")
    lines.append(f"{'total':<{width}}{sum(initial.values()):>8}{sum(kept.values()):>8}")
    return "\n".join(lines)


__all__ = ["SoraAdapter", "kept_ranks", "rank_report", "soft_threshold", "xi_at"]
