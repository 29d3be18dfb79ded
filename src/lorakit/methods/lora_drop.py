"""LoRA-drop (Zhou et al., COLING 2025, arXiv 2402.07721), methods.md §10 and §17: the layer strategy.

A layer either keeps a LoRA pair of its own (a *selected* layer) or uses the one pair shared by every unselected
layer of its *module type* — same leaf name (e.g. ``q_proj``), layer kind and ``[out, in]`` shape; the shared pair
takes the rank and alpha of the first such layer. ``AdapterConfig.drop_selected`` lists the selected layer paths
(``None`` = every layer has its own pair, which is stage 1 of the recipe). Shared pairs live in the adapter's
shared state, so :func:`lorakit.save` writes each of them once and :func:`lorakit.merge` adds ``s·B_sh A_sh`` to
every layer that uses it.

Choosing the selection is a training procedure, not a layer strategy, so it lives under ``train/``:
:func:`lorakit.train.recipes.lora_drop.run_lora_drop` (also ``lorakit.run_lora_drop``) trains LoRA everywhere on
a sample, measures each layer's importance, selects, and trains again with the shared pairs.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    >>> cfg = lorakit.AdapterConfig(method="lora_drop", r=2, drop_selected=["0"])
    >>> _ = lorakit.attach(net, cfg)
    >>> sorted(lorakit.model.registry(net).shared["default"].pairs)
    ['2-linear-8x8']
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import Adapter, kaiming_uniform, layer_generator
from .lora import can_fuse, fused_low_rank

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer, LayerOps

#: where the recipe stores its importances and selection in the adapter's ``extra`` (saved with the adapter)
EXTRA_KEY = "lora_drop"


def group_key(path: str, ops: "LayerOps") -> str:
    """The module type of a layer: leaf name, kind and shape, e.g. ``"q_proj-linear-64x64"``.

    Example:
        >>> from lorakit.layers import ops_for
        >>> group_key("model.layers.3.self_attn.q_proj", ops_for(torch.nn.Linear(16, 8)))
        'q_proj-linear-8x16'
    """
    return f"{path.rsplit('.', 1)[-1]}-{ops.kind}-{ops.out_features}x{ops.in_features}"


def _init_pair(r: int, n_in: int, n_out: int, kind: str, init: str, generator: torch.Generator):
    """LoRA's initial (A, B): Kaiming/Gaussian A and zero B (embeddings: A = 0, B ~ N(0, 1), as LoRA/PEFT)."""
    if kind == "embedding":
        return torch.zeros(r, n_in), torch.randn(n_out, r, generator=generator)
    if init == "gaussian":
        return torch.randn(r, n_in, generator=generator) / r, torch.zeros(n_out, r)
    return kaiming_uniform((r, n_in), n_in, generator), torch.zeros(n_out, r)


class SharedPair(nn.Module):
    """One LoRA pair used by every unselected layer of a module type."""

    def __init__(self, r: int, scaling: float, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.r, self.scaling = r, scaling
        self.A = nn.Parameter(torch.zeros(r, n_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(n_out, r, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class SharedPairs(nn.Module):
    """LoRA-drop's shared state: ``pairs[module type]`` and ``members[module type]`` (layer paths using it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = nn.ModuleDict()
        self.members: dict[str, list[str]] = {}


class LoraDropAdapter(Adapter):
    """A LoRA pair of its own (selected layers) or the shared pair of its module type (the rest)."""

    method = "lora_drop"
    allowed_inits = ("kaiming", "gaussian")

    def __init__(self, ops: "LayerOps", config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        self.group = group_key(path, ops)
        self.own = config.drop_selected is None or path in config.drop_selected
        self.init = config.init
        if self.own:
            dtype, device = ops.adapter_dtype(), ops.device()
            self.A = nn.Parameter(torch.zeros(self.r, self.in_features, dtype=dtype, device=device))
            self.B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=dtype, device=device))
        else:
            if shared is None or self.group not in shared.pairs:  # pragma: no cover - make_shared builds it
                raise ValueError(f"{path}: no shared LoRA-drop pair for module type {self.group!r}")
            self.shared = shared  # registered here too, so .to()/parameters() reach it
            pair = shared.pairs[self.group]
            self.r, self.scaling = pair.r, pair.scaling

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        super().validate_config(config)

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number(config.drop_fraction) or not 0 < config.drop_fraction <= 1:
            raise ValueError(f"AdapterConfig.drop_fraction={config.drop_fraction!r} is invalid; allowed: a number "
                             "in (0, 1] (share of the training data used to measure importance)")
        if not number(config.drop_threshold) or not 0 < config.drop_threshold <= 1:
            raise ValueError(f"AdapterConfig.drop_threshold={config.drop_threshold!r} is invalid; allowed: a number "
                             "in (0, 1] (cumulative importance share of the selected layers)")
        top = config.drop_top_n
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
            raise ValueError(f"AdapterConfig.drop_top_n={top!r} is invalid; allowed: None or an integer >= 1")
        sel = config.drop_selected
        if sel is not None:
            if isinstance(sel, str) or not isinstance(sel, (list, tuple)) or not all(
                    isinstance(p, str) and p for p in sel):
                raise ValueError(f"AdapterConfig.drop_selected={sel!r} is invalid; allowed: None (every layer has "
                                 "its own pair) or a list of layer paths")
            config.drop_selected = list(sel)

    @classmethod
    def make_shared(cls, config: "AdapterConfig", targets: list[tuple[str, "LayerOps"]], name: str,
                    existing: nn.Module | None = None) -> nn.Module | None:
        if config.drop_selected is None:
            return None
        paths = {p for p, _ in targets}
        unknown = [p for p in config.drop_selected if p not in paths]
        if unknown:
            raise ValueError(f"AdapterConfig.drop_selected names layers that are not targets: {unknown[:5]}; "
                             f"targets are e.g. {sorted(paths)[:5]}")
        shared = SharedPairs()
        selected = set(config.drop_selected)
        for path, ops in targets:
            if path in selected:
                continue
            key = group_key(path, ops)
            if key not in shared.pairs:
                r = config.rank_for(path)
                pair = SharedPair(r, config.scaling_value(path), ops.in_features, ops.out_features,
                                  ops.adapter_dtype(), ops.device())
                a, b = _init_pair(r, ops.in_features, ops.out_features, ops.kind, config.init,
                                  layer_generator(config, f"{name}:shared:{key}"))
                with torch.no_grad():
                    pair.A.copy_(a)
                    pair.B.copy_(b)
                shared.pairs[key] = pair
                shared.members[key] = []
            shared.members[key].append(path)
        return shared if len(shared.pairs) else None

    # -- init / forward -----------------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator):
        if self.own:
            a, b = _init_pair(self.r, self.in_features, self.out_features, self.layer_kind, config.init, generator)
            self.set_factors(a, b)
        return None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) this layer uses: its own, or its module type's shared pair."""
        if self.own:
            return self.A, self.B
        pair = self.shared.pairs[self.group]
        return pair.A, pair.B

    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy values into this layer's (A, B) (for a shared pair: into the pair every member uses)."""
        A, B = self.factors()
        with torch.no_grad():
            A.copy_(a.to(A.device, A.dtype))
            B.copy_(b.to(B.device, B.dtype))

    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        xa = self.dropout(x)
        if xa.is_floating_point() and xa.dtype != A.dtype:
            xa = xa.to(A.dtype)
        z = layer.ops.down(xa, A)
        if z.dtype == y.dtype:
            return layer.ops.up_add(y, z, B, self.scaling)
        return y + (layer.ops.up(z, B) * self.scaling).to(y.dtype)

    def fused_forward(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor | None:
        """The layer output in one fused op (LoRA's, with this layer's own or shared pair), or None."""
        A, B = self.factors()
        if not can_fuse(self, layer, x, (A, B)):
            return None
        return fused_low_rank(layer, x, A, B, self.scaling)

    def branch_output(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor:
        """``s·B A x`` without dropout: the quantity whose squared norm is the layer's importance."""
        A, B = self.factors()
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        return layer.ops.up(layer.ops.down(x, A), B) * self.scaling

    def delta_weight(self, layer: "AdaptedLayer | None" = None) -> torch.Tensor:
        A, B = self.factors()
        acc = torch.promote_types(A.dtype, torch.float32)
        return self.scaling * (B.to(acc) @ A.to(acc))

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B = self.factors()
        return A.detach(), B.detach(), self.scaling

    def extra_repr(self) -> str:
        return super().extra_repr() + (", own pair" if self.own else f", shared pair {self.group}")


__all__ = ["EXTRA_KEY", "LoraDropAdapter", "SharedPair", "SharedPairs", "group_key"]
