"""DoRA — Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024), methods.md §6 and §17.

The adapted weight is a magnitude times a direction::

    V = W + s·B A          W' = m ⊙ V / ‖V‖_row          (m ∈ R^out, one norm per output row of [out, in])

``W`` is the weight the layer's forward uses: the stored base weight (dequantised for a 4-bit base, the PiSSA
residual for ``init="pissa"``, including adapters already merged into it). ``m`` starts at ``‖W + s·B A‖_row`` of
that weight, so the model is unchanged at attach for every init.

Forward (the efficient form: no ``[out, in]`` matrix is built and the base output is reused)::

    c = m / n,  n = ‖V‖_row           y' = y + (c − 1) ⊙ (y − b) + c ⊙ s·(x̃ Aᵀ) Bᵀ

where ``y`` is the base output (bias ``b`` included, not rescaled) and ``x̃ = drop(x)``; with dropout active in
training the base term is recomputed on ``x̃`` as PEFT does (``(c − 1) ⊙ x̃ Wᵀ``). The norm comes from the Gram form
``n² = ‖W‖² + 2s·rowsum(B ⊙ W Aᵀ) + s²·rowsum(B A Aᵀ ⊙ B)`` (``‖W‖²`` cached per base weight), which costs one
``[out, r]`` product instead of an ``[out, in]`` temporary; rows whose norm shrank a lot (where the Gram form would
lose digits) are recomputed directly. Computed in fp32 for low-precision bases.

* ``dora_detach_norm=True`` (default, paper §4.3, like PEFT): ``n`` is a constant in backward, computed without
  autograd. ``False`` keeps its gradient (autograd then also keeps ``W`` for it: an fp32 copy on a low-precision
  base).
* A plain ``nn.Linear`` whose only live adapter is this one runs :meth:`DoraAdapter.fused_forward`: one autograd
  node for the whole layer in training, everything in the output buffer in inference.
* Eval / ``torch.no_grad``: ``n`` is computed once and reused until A, B or the base weight change (keyed on their
  version counters and storage) or the base is replaced/merged (``on_base_changed``); entering train mode drops it.
* Merge: ``W ← c ⊙ (W + s·B A)``, exact; ``c`` is cached so unmerge is ``W/c − s·B A`` (rows with ``|c| < 1e-3``
  are kept verbatim). When other adapters' changes were folded in front of it within the same merge call, the
  dense change ``c ⊙ V − W`` is cached instead, so merging never changes the model's function.
* Several active adapters on one layer add their changes: DoRA contributes ``c ⊙ V − W`` relative to the layer's
  weight (as PEFT's forward), whichever position it has.
* ``combine`` of DoRA adapters (weights ``w_i``): the result is the DoRA adapter whose weight is exactly
  ``W + Σ w_i ΔW_i`` with ``ΔW_i = c_i ⊙ V_i − W`` each adapter's full dense change, magnitudes included. Writing
  ``g = 1 + Σ w_i (c_i − 1)`` (per row), ``W + Σ w_i ΔW_i = g ⊙ (W + Σ_i (w_i c_i s_i / g) ⊙ B_i A_i)``, so
  ``how="cat"`` gives a DoRA of rank ``Σ r_i`` with ``A = [A_i]``, ``B = [(w_i c_i s_i / g) ⊙ B_i]``, ``s = 1`` and
  ``m = g ⊙ ‖V‖_row`` (the row norms of the mixed weight); ``how="svd"`` truncates that direction update to
  ``rank`` and keeps the same exact magnitudes. ``how="linear"`` (PEFT's factor averaging) is refused: it has no
  meaning for magnitudes. (``lorakit.combine`` uses this rule when every source is DoRA; a mix of DoRA and other
  methods goes through the generic rule, where only ``how="svd"`` of the dense changes applies.)
* ``nn.Embedding`` is refused (PEFT normalises embeddings per token, not per output row; exclude them).

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(3, 8)
    >>> y0 = net(x)
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="dora", r=2, targets=["0", "2"]))
    >>> torch.allclose(net(x), y0, atol=1e-6)   # m = ‖W‖_row and B = 0: unchanged at attach
    True
    >>> tuple(net[0].adapters["default"].magnitude.shape)
    (8,)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import AdapterConfig
from ..layers import UnsupportedLayer, ops_for
from .base import Adapter
from .lora import LoraAdapter, can_fuse
from .peft_lora import LORA_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import AdaptedLayer, LayerOps

#: rows at a time when a low-precision base is upcast for the norm (bounds the temporary to ~16 MB of fp32)
_CHUNK_ELEMENTS = 1 << 22
#: Gram-form norms below this fraction of ‖W‖² are recomputed directly (cancellation would cost digits)
_GRAM_SAFE = 0.25
#: |c| below this makes W/c lossy at unmerge: such rows are saved verbatim at merge
_SMALL_C = 1e-3


class _FusedDoraLinear(torch.autograd.Function):
    """``c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias`` for a frozen ``nn.Linear`` as one autograd node, ``c = m / n``, n constant.

    Why: the generic path adds the branch into a copy of the base output, keeps two graph nodes for the rescale and
    sums two input gradients. Here the branch goes into the bias-free base output in place, the rescale is one
    pass, and the input gradient is ``(g⊙c) W + s·((g⊙c) B) A`` with an in-place rank-r update. Saved for backward:
    x (if A trains), the r-wide ``x Aᵀ`` (if B trains) and the pre-scale output t (if m trains) — as the generic
    path.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, m, n, scale):
        x2 = x.reshape(-1, x.shape[-1])
        t = F.linear(x2, weight)
        z = x2.mm(a.t())
        t.addmm_(z, b.t(), alpha=scale)
        c = m / n
        y = torch.mul(t, c) if bias is None else torch.addcmul(bias, t, c)
        need_x, _, _, need_a, need_b, need_m, _, _ = ctx.needs_input_grad
        ctx.save_for_backward(x2 if need_a else None, weight if need_x else None, a if need_x else None,
                              b if (need_x or need_a) else None, z if need_b else None, t if need_m else None,
                              c, n)
        ctx.scale, ctx.in_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x2, weight, a, b, z, t, c, n = ctx.saved_tensors
        need_x, _, _, need_a, need_b, need_m, _, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = ga = gb = gm = None
        if need_m:
            gm = (g2 * t).sum(0).div_(n)
        # c is folded into the small factors (B, the r-wide products) instead of the N×out gradient where possible
        if need_x or need_a:
            gz = g2.mm(b * (c * ctx.scale)[:, None])  # [N, r]: s·(g⊙c) B, shared by the input and A gradients
            if need_x:
                # (g⊙c) W: scale whichever of g [N, out] and W [out, in] is smaller
                gw = g2.mm(weight * c[:, None]) if g2.shape[0] > weight.shape[1] else (g2 * c).mm(weight)
                gx = gw.addmm_(gz, a).view(ctx.in_shape)
            if need_a:
                ga = gz.t().mm(x2)
        if need_b:  # (zᵀ g)ᵀ ⊙ c: MKL runs this layout faster than gᵀ z; the copy to B's layout is r·out floats
            gb = z.t().mm(g2).mul_(c * ctx.scale).t().contiguous()
        return gx, None, None, ga, gb, gm, None, None


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current contents: storage, in-place version counter, device, dtype."""
    version = -1 if t.is_inference() else t._version  # inference tensors have no version counter
    return (t.data_ptr(), version, t.device, t.dtype)


class DoraAdapter(LoraAdapter):
    """DoRA: LoRA direction update plus a trainable per-output magnitude ``magnitude`` (see the module docstring)."""

    method = "dora"

    def __init__(self, ops: "LayerOps", config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=self.A.dtype, device=self.A.device))
        self.detach_norm = bool(config.dora_detach_norm)
        # caches (plain attributes: never saved, never cast by model.to(dtype))
        self._wsq: tuple[tuple, torch.Tensor] | None = None  # (base key, ‖W‖²_row)
        self._norm: tuple[tuple, torch.Tensor] | None = None  # (key, n) for eval / no-grad
        self._merged: tuple[torch.Tensor, torch.Tensor | None, Any] | None = None  # (c, dense change, saved rows)

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        super().validate_config(config)
        if not isinstance(config.dora_detach_norm, bool):
            raise ValueError(f"AdapterConfig.dora_detach_norm={config.dora_detach_norm!r} is invalid; allowed: True "
                             "(norm is a constant in backward, paper §4.3) or False (keep its gradient)")

    @classmethod
    def check_layer(cls, ops: "LayerOps", config: "AdapterConfig", path: str) -> None:
        if ops.kind == "embedding":
            raise UnsupportedLayer(
                f"{path}: DoRA does not adapt nn.Embedding (its magnitude would be per embedding dimension, while "
                "PEFT's is per token, so the two would silently disagree); exclude it (AdapterConfig.exclude) or "
                "adapt it with a separate method='lora' adapter"
            )
        super().check_layer(ops, config, path)

    # -- the weight the forward normalises ----------------------------------------------------------------------
    def _own_name(self, layer: "AdaptedLayer") -> str | None:
        return next((n for n, a in layer.adapters.items() if a is self), None)

    def _undone_shifts(self, layer: "AdaptedLayer", keep: set[str] | None = None) -> list[Adapter]:
        """Other adapters whose base-weight shift the layer takes back out while this adapter runs."""
        if keep is None:  # mirror AdaptedLayer: routed batches keep only this adapter, plain forward the active ones
            keep = set() if layer._route is not None else set(layer.active)
        return [a for n, a in layer.adapters.items()
                if a is not self and a.shifts_base and n not in layer.merged and n not in keep]

    def _base_matrix(self, layer: "AdaptedLayer", keep: set[str] | None = None) -> torch.Tensor:
        """``W`` as the forward sees it, ``[out, in]``; a view of the stored weight unless shifts are undone."""
        w = layer.ops.weight_matrix()
        shifts = self._undone_shifts(layer, keep)
        if not shifts:
            return w
        w = w.to(layer.ops.acc_dtype())
        for other in shifts:
            w = w - other.base_shift().to(device=w.device, dtype=w.dtype)
        return w

    def _base_key(self, layer: "AdaptedLayer") -> tuple:
        base = layer.base
        tensors = list(base.parameters()) + list(base.buffers())
        shifts = tuple((id(a), tuple(_tensor_key(b) for b in a.buffers())) for a in self._undone_shifts(layer))
        return (id(base), tuple(_tensor_key(t) for t in tensors), shifts)

    # -- the norm -------------------------------------------------------------------------------------------------
    def weight_norm(self, layer: "AdaptedLayer") -> torch.Tensor:
        """``‖W + s·B A‖_row`` (fp32 or wider) as the forward uses it (cached in eval / under no_grad)."""
        a, b = self.A, self.B
        graph = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        if graph and not self.detach_norm:
            return self._compute_norm(layer, a, b)
        if torch.compiler.is_compiling():
            # the caches are keyed on storage and version counters, which a compiled graph cannot guard on: the
            # graph recomputes n each call (see _compute_norm)
            with torch.no_grad():
                return self._compute_norm(layer, a.detach(), b.detach())
        cacheable = not (self.training and graph)  # FSDP may refill parameters without a version bump: no reuse
        key = (self._base_key(layer), _tensor_key(a), _tensor_key(b), self.scaling) if cacheable else None
        if key is not None and self._norm is not None and self._norm[0] == key:
            n = self._norm[1]
            if not n.is_inference() or torch.is_inference_mode_enabled():
                return n
        with torch.no_grad():
            n = self._compute_norm(layer, a.detach(), b.detach())
        if key is not None:
            self._norm = (key, n)
        return n

    def _compute_norm(self, layer: "AdaptedLayer", a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(a.dtype, torch.float32)
        w = self._base_matrix(layer)
        a, b, s = a.to(acc), b.to(acc), self.scaling
        if torch.compiler.is_compiling():
            # A graph cannot branch on the data (the rare repair below; torch.cond there broke transformers' cache
            # tracing), so it takes the direct form for every row: the same GEMM size as W Aᵀ plus one [out, in]
            # temporary, and no cancellation. Eager numerics are untouched; compiled agrees to rounding.
            return torch.linalg.vector_norm(w.to(acc) + s * (b @ a), dim=1).clamp_min(torch.finfo(acc).tiny)
        wsq = self._weight_sq(layer, w, acc)
        wa = _rows_matmul(w, a.t(), acc)  # W Aᵀ: [out, r]
        n2 = wsq + (2 * s) * (b * wa).sum(1) + (s * s) * ((b @ (a @ a.t())) * b).sum(1)
        bad = n2 < _GRAM_SAFE * wsq
        if bad.any():  # rare: V much shorter than W; compute those rows directly for full precision
            idx = bad.nonzero().squeeze(1)
            direct = torch.linalg.vector_norm(w[idx].to(acc) + s * (b[idx] @ a), dim=1)
            n2 = n2.index_put((idx,), direct.square())
        return n2.clamp_min(torch.finfo(acc).tiny).sqrt()

    def _weight_sq(self, layer: "AdaptedLayer", w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        key = (self._base_key(layer), acc)
        if self._wsq is not None and self._wsq[0] == key:
            wsq = self._wsq[1]
            if not wsq.is_inference() or torch.is_inference_mode_enabled():
                return wsq
        with torch.no_grad():
            wsq = torch.linalg.vector_norm(w, dim=1, dtype=acc).square()
        self._wsq = (key, wsq)
        return wsq

    def _direct_norm(self, w: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W + s·B A)`` in ``acc`` and its row norms (dense; for merge, init and combine)."""
        v = self.scaling * (self.B.detach().to(acc) @ self.A.detach().to(acc))
        v += w.to(device=v.device, dtype=acc)
        return v, torch.linalg.vector_norm(v, dim=1)

    def on_base_changed(self) -> None:
        self._wsq = None
        self._norm = None

    def train(self, mode: bool = True) -> "DoraAdapter":
        if mode:  # parameters may change from here on in ways version counters do not see (e.g. FSDP)
            self._norm = None
        return super().train(mode)

    # -- init -------------------------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator):
        result = super().init_weights(layer, config, generator)
        acc = layer.ops.acc_dtype()
        if isinstance(result, torch.Tensor):  # PiSSA: the residual becomes the base
            w = result
        elif isinstance(result, nn.Module):  # LoftQ: a new (quantised) base; m from its dequantised weight
            w = ops_for(result).weight_matrix(acc)
        else:  # the attached adapter becomes the only active one: other adapters' shifts are undone
            w = self._base_matrix(layer, keep=set())
        _, n = self._direct_norm(w, acc)
        with torch.no_grad():
            self.magnitude.copy_(n.to(self.magnitude.dtype))
        return result

    # -- forward ------------------------------------------------------------------------------------------------
    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ops = layer.ops
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        xd = self.dropout(x) if dropped else x
        # y is the pure base output (bias in, other adapters out) in a routed batch and for the first live adapter
        pure = not dropped and (layer._route is not None or (bool(layer._live) and layer._live[0] is self))
        xa = xd.to(self.A.dtype) if xd.is_floating_point() and xd.dtype != self.A.dtype else xd
        z = ops.down(xa, self.A)
        n = self.weight_norm(layer)
        d = self.magnitude.to(n.dtype) / n - 1  # c − 1
        d_y = ops.per_out(d.to(y.dtype))
        bias = ops.bias()
        if pure:
            base = y
        else:
            base = ops.base_forward_no_bias(xd).to(y.dtype)
            for other in self._undone_shifts(layer):
                base = base - other.shift_output(layer, xd).to(y.dtype)
        # t = base + s·lora; y' = y + (c−1)(y − b) + c·s·lora = t + t·(c−1) − (c−1)·b   when base is y
        t = ops.up_add(base, z, self.B, self.scaling) if z.dtype == base.dtype else \
            base + (ops.up(z, self.B) * self.scaling).to(base.dtype)
        inplace = not (t.requires_grad or d_y.requires_grad)
        if pure:
            out = t.addcmul_(t, d_y) if inplace else torch.addcmul(t, t, d_y)
            if bias is not None:
                e = ops.per_out((d * bias.to(d.dtype)).to(y.dtype))
                out = out.sub_(e) if inplace else out - e
            return out
        # base recomputed (dropout, or other adapters already in y): y' = y + (t − base) + (c−1)·t
        return torch.addcmul(y + (t - base), t, d_y)

    def fused_forward(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer output in one fused op when this is the layer's only live adapter, or None.

        Applies to a plain frozen ``nn.Linear`` without hooks, same-dtype input/factors/magnitude, no autocast, no
        active dropout and a constant norm (detached, or no gradient wanted); otherwise :meth:`apply` runs.
        """
        base = layer.base
        a, b, m = self.A, self.B, self.magnitude
        if type(self).apply is not DoraAdapter.apply or not can_fuse(self, layer, x, (a, b, m)):
            return None
        grad = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or m.requires_grad)
        if grad and not self.detach_norm and (a.requires_grad or b.requires_grad):
            return None
        n = self.weight_norm(layer)
        if grad:
            return _FusedDoraLinear.apply(x, base.weight, base.bias, a, b, m, n, self.scaling)
        # inference: no graph, so everything happens in the base output's buffer
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, base.weight)
        y.addmm_(x2.mm(a.t()), b.t(), alpha=self.scaling).mul_(m / n)
        if base.bias is not None:
            y.add_(base.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    # -- dense change, merge ------------------------------------------------------------------------------------
    def _check_unmerged(self, layer: "AdaptedLayer", what: str) -> None:
        name = self._own_name(layer)
        if name is not None and name in layer.merged:
            raise ValueError(f"{self.path}: DoRA adapter {name!r} is merged; its {what} depends on the un-merged "
                             "weight. Call lorakit.unmerge(model) first.")

    def delta_weight(self, layer: "AdaptedLayer") -> torch.Tensor:
        """The dense change ``c ⊙ (W + s·BA) − W`` (acc dtype) relative to the weight the forward uses."""
        self._check_unmerged(layer, "dense change")
        acc = layer.ops.acc_dtype()
        w = self._base_matrix(layer).to(acc)
        v, n = self._direct_norm(w, acc)
        c = self.magnitude.detach().to(acc) / n
        return v.mul_(c[:, None]).sub_(w)

    def merge_into(self, layer: "AdaptedLayer", w32: torch.Tensor) -> torch.Tensor:
        acc = w32.dtype
        w = self._base_matrix(layer).to(device=w32.device, dtype=acc)  # what the un-merged forward normalised
        v, n = self._direct_norm(w, acc)
        c = self.magnitude.detach().to(acc) / n
        if torch.equal(w, w32):  # the usual case: cache only c (PEFT's scheme)
            small = (c.abs() < _SMALL_C).nonzero().squeeze(1)
            saved = (small, w32[small].clone()) if small.numel() else None
            self._merged = (c, None, saved)
            return v.mul_(c[:, None])
        # other changes were folded in before this one in the same call: add DoRA's change relative to W
        delta = v.mul_(c[:, None]).sub_(w)
        self._merged = (c, delta, None)
        return w32 + delta

    def on_unmerged(self) -> None:
        self._merged = None  # the layer restored its exact pre-merge weight; the undo cache is not needed

    def unmerge_from(self, layer: "AdaptedLayer", w32: torch.Tensor) -> torch.Tensor:
        if self._merged is None:
            raise RuntimeError(f"{self.path}: DoRA unmerge without a merge cache (was the adapter merged by lorakit?)")
        c, delta, saved = self._merged
        self._merged = None
        if delta is not None:
            return w32 - delta.to(w32.device)
        c = c.to(w32.device)
        safe = torch.where(c.abs() < _SMALL_C, torch.ones_like(c), c)
        out = w32 / safe[:, None] - self.scaling * (self.B.detach().to(w32.dtype) @ self.A.detach().to(w32.dtype))
        if saved is not None:
            out[saved[0]] = saved[1].to(out.device)
        return out

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise ValueError(f"{self.path}: a DoRA adapter has no exact low-rank LoRA form (its magnitude rescales "
                         "whole rows of W); combine DoRA adapters with each other (how='cat' or 'svd'), or use "
                         "how='svd' when mixing with other methods")

    # -- mixing -----------------------------------------------------------------------------------------------
    @classmethod
    def combine(cls, layer: "AdaptedLayer", sources: list[tuple[Adapter, float]], how: str,
                rank: int | None = None) -> "DoraAdapter":
        """A DoRA adapter computing ``W + Σ w_i ΔW_i`` (exact for ``cat``; see the module docstring)."""
        path = sources[0][0].path
        if how == "linear":
            raise ValueError("combine(how='linear') is not defined for DoRA adapters (averaging factors ignores the "
                             "magnitudes); use how='cat' (exact, rank = sum of ranks) or how='svd' (rank=...)")
        names = {id(a): n for n, a in layer.adapters.items()}
        for src, _ in sources:
            if src.shifts_base:
                raise ValueError(f"{path}: combine of DoRA adapters does not support adapters that shift the base "
                                 f"weight (init={getattr(src, 'init', '?')!r}); save them converted or mix with "
                                 "another init")
            if names.get(id(src)) in layer.merged:
                raise ValueError(f"{path}: adapter {names.get(id(src))!r} is merged; call lorakit.unmerge(model) "
                                 "before combine")
        acc = layer.ops.acc_dtype()
        w = cls._plain_base(layer, acc)  # the combined adapter alone active: every unmerged shift undone
        g = torch.ones(w.shape[0], dtype=acc, device=w.device)
        a_parts, b_parts = [], []
        for src, weight in sources:
            if isinstance(src, DoraAdapter):
                _, n = src._direct_norm(w, acc)
                c = src.magnitude.detach().to(acc) / n
                a_i, b_i, s_i = src.A.detach(), src.B.detach(), src.scaling
            else:  # a plain low-rank adapter is a DoRA with c = 1
                a_i, b_i, s_i = src.as_lora_factors()
                c = torch.ones_like(g)
            g = g + weight * (c - 1)
            a_parts.append(a_i.to(acc))
            b_parts.append(b_i.to(acc) * (weight * s_i * c)[:, None])
        if bool((g.abs() < 1e-6).any()):
            raise ValueError(f"{path}: these combine weights cancel a row's magnitude (1 + Σ w_i(c_i − 1) = 0); "
                             "choose other weights")
        a = torch.cat(a_parts, dim=0)
        b = torch.cat(b_parts, dim=1) / g[:, None]
        v = w + b @ a
        m = g * torch.linalg.vector_norm(v, dim=1)  # row norms of the mixed weight g ⊙ V (sign kept)
        if how == "svd":
            k = min(rank or max(src.r for src, _ in sources), *v.shape)
            u, sv, vh = torch.linalg.svd(b @ a, full_matrices=False)
            a, b = vh[:k], u[:, :k] * sv[:k]
        r = a.shape[0]
        config = AdapterConfig(method="dora", r=r, alpha=float(r),
                               dora_detach_norm=bool(getattr(sources[0][0], "detach_norm", True)))
        out = cls(layer.ops, config, path)
        out._set(a, b)
        with torch.no_grad():
            out.magnitude.copy_(m.to(out.magnitude.dtype))
        return out

    @staticmethod
    def _plain_base(layer: "AdaptedLayer", acc: torch.dtype) -> torch.Tensor:
        w = layer.ops.weight_matrix(acc)
        for n, a in layer.adapters.items():
            if a.shifts_base and n not in layer.merged:
                w = w - a.base_shift().to(device=w.device, dtype=acc)
        return w

    # -- PEFT's format: LORA with use_dora and a magnitude per layer ---------------------------------------------
    peft_keys = {**LORA_KEYS, "lora_magnitude_vector": "magnitude"}

    @classmethod
    def reads_peft(cls, peft_type: str, cfg: dict[str, Any]) -> bool:
        return cls is DoraAdapter and peft_type == "LORA" and bool(cfg.get("use_dora"))

    @classmethod
    def to_peft(cls, name: str, config: "AdapterConfig", entries: list, shared: nn.Module | None
                ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        cfg, layers, shared_out = super().to_peft(name, config, entries, shared)
        cfg["use_dora"] = True
        for path, layer, adapter in entries:
            m = adapter.magnitude.detach().float()
            # PEFT keeps a conv magnitude as [1, out, 1, 1] (broadcast over the output map), a linear one as [out]
            layers[path]["lora_magnitude_vector"] = m.reshape(1, -1, 1, 1) if layer.ops.kind == "conv2d" \
                else m.reshape(-1)
        return cfg, layers, shared_out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_norm={self.detach_norm}"


def _rows_matmul(w: torch.Tensor, right: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``w @ right`` in ``acc``; a low-precision ``w`` is upcast a block of rows at a time (no full-size copy)."""
    if w.dtype == acc:
        return w @ right
    rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    if rows >= w.shape[0]:
        return w.to(acc) @ right
    return torch.cat([w[i:i + rows].to(acc) @ right for i in range(0, w.shape[0], rows)])
