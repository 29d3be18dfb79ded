"""Delta-LoRA (Zi et al., 2023, arXiv 2309.02411), methods.md §11 and §17.

LoRA whose frozen weight also moves, without gradients or optimiser state: after every optimiser step ``t`` past
``delta_start`` (K, default 500)::

    W_{t+1} = W_t + λ · s · (B_{t+1} A_{t+1} − B_t A_t)          λ = delta_lambda (default 2)

and the forward is the LoRA forward on the moving base, ``y = x W_tᵀ + b + s·(x Aᵀ) Bᵀ``. The branch has no
dropout (the paper removes it so that the gradient w.r.t. BA equals the one w.r.t. W): ``dropout > 0`` is refused.

The update runs in ``hooks.after_step()`` (``lorakit.training_hooks``, the transformers callback or lorakit's
Trainer), once per optimiser step; the adapter keeps a copy of the previous ``(A, B)`` to form the difference.

Precision: the per-step change is tiny, so the accumulated change ``shift = Σ λ·s·Δ(BA)`` is kept in an fp32
buffer (:meth:`DeltaLoraAdapter.base_shift`). An fp32/fp64 base receives each update directly; a bf16/fp16 base is
set to ``round(W₀ + shift)`` every step (``W₀`` cached in the base dtype), so updates below the bf16 resolution
accumulate instead of being rounded away. Memory: one fp32 ``[out, in]`` buffer per adapted layer (plus a
base-dtype copy of ``W₀`` for 16-bit bases) — the price of a full-rank change.

What is saved: ``A``, ``B`` and ``shift`` (= ``W_T − W₀`` in fp32, the full-rank change of the touched weights).
:func:`lorakit.load` onto the *original* base weights re-applies ``shift`` to the base, so the loaded model computes
the trained function ``W₀ + shift + s·BA``. Removing the adapter (:func:`lorakit.delete`,
``lorakit.unload(merge=False)``) or disabling it restores ``W₀``; :func:`lorakit.merge` folds ``s·BA`` into the
shifted base, and ``lorakit.unload(model)`` returns plain modules holding ``W_T + s·B_T A_T``.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="delta_lora", r=2, delta_start=0))
    >>> opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    >>> hooks = lorakit.training_hooks(net)
    >>> for _ in range(3):
    ...     net(torch.randn(4, 8)).pow(2).mean().backward(); opt.step()
    ...     hooks.after_step()
    ...     opt.zero_grad()
    >>> bool(net[0].adapters["default"].base_shift().abs().sum() > 0)
    True
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Adapter, placed_like, whole
from .lora import LoraAdapter

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer, LayerOps

LOW_PRECISION = (torch.float16, torch.bfloat16)


class DeltaLoraAdapter(LoraAdapter):
    """Delta-LoRA: LoRA plus ``W += λ·s·Δ(BA)`` after each optimiser step past ``delta_start``."""

    method = "delta_lora"
    needs_hooks = True
    shifts_base = True
    peft_type = None
    peft_refusal = ("Delta-LoRA, which moves the base weights themselves (W += λ·s·Δ(BA) after every step); "
                    "PEFT's format holds only adapter tensors for the original base weights, so it cannot express "
                    "that. Merge it and export the full model instead (lorakit export / lorakit.unload(model, "
                    "merge=True)), or save it in lorakit's format")
    allowed_inits = ("kaiming", "gaussian", "init_b", "orthogonal")

    def __init__(self, ops: "LayerOps", config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        device = ops.device()
        acc = ops.acc_dtype()
        self.delta_lambda = float(config.delta_lambda)
        self.delta_start = int(config.delta_start)
        # the accumulated change of the base weight, saved with the adapter
        self.register_buffer("shift", torch.zeros(self.out_features, self.in_features, dtype=acc, device=device))
        # (A, B) before the current optimiser step; derived state, not saved
        self.register_buffer("A_prev", torch.zeros_like(self.A), persistent=False)
        self.register_buffer("B_prev", torch.zeros_like(self.B), persistent=False)
        self.register_buffer("w0", None, persistent=False)  # 16-bit bases: W₀ in the base dtype, built lazily

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        super().validate_config(config)
        if config.dropout:
            raise ValueError(
                f"AdapterConfig.dropout={config.dropout!r} is invalid for method='delta_lora': the branch must have "
                "no dropout (the base update λ·s·Δ(BA) assumes the gradient w.r.t. BA equals the one w.r.t. W); "
                "set dropout=0.0")
        lam = config.delta_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"AdapterConfig.delta_lambda={lam!r} is invalid; allowed: a finite number >= 0 "
                             "(the paper uses 2)")
        start = config.delta_start
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"AdapterConfig.delta_start={start!r} is invalid; allowed: an integer >= 0 "
                             "(optimiser steps of plain LoRA before W starts moving; the paper uses 500)")

    @classmethod
    def check_layer(cls, ops: "LayerOps", config: "AdapterConfig", path: str) -> None:
        super().check_layer(ops, config, path)
        if ops.quantized:
            raise ValueError(f"method='delta_lora' updates the base weight, which a quantised base cannot take; "
                             f"{path} is 4-bit (use a 16/32-bit base or exclude it)")

    # -- init / state -------------------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator):
        result = super().init_weights(layer, config, generator)
        self._snapshot()
        return result

    def _snapshot(self) -> None:
        with torch.no_grad():  # (whole tensors under FSDP2: the product B A needs all of both)
            self.A_prev.copy_(whole(self.A.detach()))
            self.B_prev.copy_(whole(self.B.detach()))

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        super().import_state(state)
        self._snapshot()  # the next step's difference starts from the loaded factors
        self.w0 = None

    def base_shift(self) -> torch.Tensor | None:
        # a copy: callers hold it across updates of the buffer (io.restore compares before/after)
        return self.shift.clone()

    def shift_output(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor:
        return layer.ops.linear(x, self.shift.to(x.dtype))

    def on_base_changed(self) -> None:
        self.w0 = None  # someone else changed W (merge, restore): re-derive W₀ from W − shift next time

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise ValueError("Delta-LoRA's change to the original weights is full-rank (the base shift plus s·BA), so "
                         "it cannot be mixed as low-rank factors; merge it instead (lorakit.merge)")

    @classmethod
    def combine(cls, layer: "AdaptedLayer", sources: list, how: str, rank: int | None = None) -> "Adapter":
        raise ValueError("combine() is not available for Delta-LoRA adapters: their change includes a full-rank "
                         "base shift; merge them instead (lorakit.merge)")

    # -- training hook --------------------------------------------------------------------------------------------
    def after_step(self, layer: "AdaptedLayer", step: int) -> None:
        """``W += λ·s·(B A − B_prev A_prev)`` if ``step > delta_start``; then remember the current ``(A, B)``."""
        merged = any(layer.adapters[n] is self for n in layer.merged if n in layer.adapters)
        if step > self.delta_start and not merged:
            with torch.no_grad():
                acc = self.shift.dtype
                # B A − B_prev A_prev as one GEMM of width 2r
                b = torch.cat([whole(self.B.detach()).to(acc), -self.B_prev.to(acc)], dim=1)
                a = torch.cat([whole(self.A.detach()).to(acc), self.A_prev.to(acc)], dim=0)
                diff = (self.delta_lambda * self.scaling) * (b @ a)
                self._move_base(layer, diff)
        self._snapshot()

    def _move_base(self, layer: "AdaptedLayer", diff: torch.Tensor) -> None:
        ops = layer.ops
        dtype = ops.weight_matrix().dtype
        if layer.merged:  # other adapters are folded into W: move the un-merged base, they are folded back on top
            self.shift += diff
            layer.change_base_weight(lambda w: w + diff)
            return
        # under FSDP2 the weight matrix is a DTensor: shift and diff (whole, equal on every rank) are cut to its shard
        if dtype in LOW_PRECISION:
            if self.w0 is None:  # W = round(W₀ + shift) before this update
                w = ops.weight_matrix(self.shift.dtype)
                self.w0 = (w - placed_like(self.shift, w)).to(dtype)
            self.shift += diff
            ops.set_weight_matrix(self.w0.to(self.shift.dtype) + placed_like(self.shift, self.w0))
        else:
            self.shift += diff
            w = ops.weight_matrix(self.shift.dtype)
            ops.set_weight_matrix(w + placed_like(diff, w))
        for other in layer.adapters.values():
            if other is not self:
                other.on_base_changed()


__all__ = ["DeltaLoraAdapter"]
