"""The adapted layer: a base layer plus named adapters.

Every method is written once, in matrix form, against :class:`LayerOps`: a tiny description of how a base layer
kind (Linear, transformers Conv1D, Embedding, Conv2d, 4-bit Linear) maps to a ``[out, in]`` weight matrix and how an
r-wide low-rank path goes through it (``down``: input -> r, ``up``: r -> output). So no method file branches on the
layer type, and no layer code branches on the method.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .quant.linear4bit import Linear4bit, is_conv1d  # the one Conv1D rule (re-exported: lorakit.layers.is_conv1d)

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import Adapter


class UnsupportedLayer(TypeError):
    """A targeted module cannot be adapted."""


# ---------------------------------------------------------------------------------------------------------------
# Layer kinds
# ---------------------------------------------------------------------------------------------------------------
class LayerOps:
    """How a base layer kind looks in ``[out, in]`` matrix form. Stateless apart from the base module's geometry."""

    kind = "linear"
    out_dim = -1  # dimension of the output that indexes output units
    quantized = False
    #: True if ``down``/``up`` are plain ``F.linear`` on the last dimension and per-output vectors broadcast as they
    #: are (Linear, Conv1D, 4-bit Linear): kernels written for that layout (VeRA's, LoRA-FA's) may be used
    matmul_on_last_dim = True

    def __init__(self, base: nn.Module):
        self.base = base

    # geometry
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    # weight as an [out, in] matrix
    def weight_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.base.weight.detach()
        return w if dtype is None else w.to(dtype)

    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        with torch.no_grad():
            self.base.weight.copy_(matrix.to(self.base.weight.dtype))

    def acc_dtype(self) -> torch.dtype:
        """Precision for merges and dense deltas: fp32, or fp64 for fp64 layers."""
        return torch.promote_types(self.weight_matrix().dtype, torch.float32)

    # the low-rank path
    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x -> x Aᵀ for A of shape [r, in]."""
        return F.linear(x, a)

    def up(self, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """z -> z Bᵀ for B of shape [out, r]."""
        return F.linear(z, b)

    def up_add(self, y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """y + scale · z Bᵀ in one fused GEMM where the layout allows it."""
        if y.dim() >= 2 and y.is_contiguous() and z.is_contiguous():
            out = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), b.t(), alpha=scale)
            return out.view(y.shape)
        return y + self.up(z, b) * scale

    def linear(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """x through a full ``[out, in]`` matrix, laid out like this layer (no bias)."""
        return F.linear(x, matrix)

    def base_forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight)

    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def per_out(self, v: torch.Tensor) -> torch.Tensor:
        """Reshape a per-output-unit vector to broadcast against this layer's output."""
        return v

    def per_mid(self, v: torch.Tensor) -> torch.Tensor:
        """Reshape a per-rank vector to broadcast against the r-wide activations from :meth:`down`."""
        return v

    def adapter_dtype(self) -> torch.dtype:
        """Adapters train in fp32 on low-precision bases (as PEFT's autocast_adapter_dtype does)."""
        dtype = self.weight_matrix().dtype if self.quantized else self.base.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point else dtype

    def device(self) -> torch.device:
        return next(t for t in list(self.base.parameters()) + list(self.base.buffers())).device

    def base_fingerprint(self) -> str | None:
        """The exact 4-bit base's fingerprint (:meth:`lorakit.quant.Linear4bit.fingerprint`), or None for a
        full-precision base (which adapters recording a 4-bit base refuse through their own checks)."""
        return None

    def supports_dropout(self) -> bool:
        return True


class Conv1DOps(LayerOps):
    """transformers' GPT-2 ``Conv1D``: weight stored as [in, out] (fan-in-fan-out)."""

    kind = "conv1d"

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[1]

    def weight_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.base.weight.detach().t()
        return w if dtype is None else w.to(dtype)

    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        with torch.no_grad():
            self.base.weight.copy_(matrix.t().to(self.base.weight.dtype))

    def base_forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base.weight


class EmbeddingOps(LayerOps):
    """``nn.Embedding`` seen as a linear map from one-hot vectors: in = num_embeddings, out = embedding_dim."""

    kind = "embedding"
    matmul_on_last_dim = False

    @property
    def in_features(self) -> int:
        return self.base.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base.embedding_dim

    def weight_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.base.weight.detach().t()
        return w if dtype is None else w.to(dtype)

    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        with torch.no_grad():
            self.base.weight.copy_(matrix.t().to(self.base.weight.dtype))

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def linear(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, matrix.t())

    def base_forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def supports_dropout(self) -> bool:
        return False  # dropout on token indices is meaningless; PEFT applies none either


class Conv2dOps(LayerOps):
    """``nn.Conv2d`` (groups=1): in = in_channels·kh·kw, out = out_channels; A is a conv, B a 1x1 conv."""

    kind = "conv2d"
    out_dim = 1
    matmul_on_last_dim = False

    @property
    def in_features(self) -> int:
        w = self.base.weight
        return w.shape[1] * w.shape[2] * w.shape[3]

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[0]

    def weight_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.base.weight.detach().reshape(self.base.weight.shape[0], -1)
        return w if dtype is None else w.to(dtype)

    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        with torch.no_grad():
            self.base.weight.copy_(matrix.reshape(self.base.weight.shape).to(self.base.weight.dtype))

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self._conv(x, a.reshape(a.shape[0], *self.base.weight.shape[1:]))

    def up(self, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, b[:, :, None, None])

    def up_add(self, y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        return y + self.up(z, b) * scale

    def linear(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return self._conv(x, matrix.reshape(self.base.weight.shape))

    def base_forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.base.weight)

    def per_out(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1)

    def per_mid(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1)


class Linear4bitOps(LayerOps):
    """lorakit's 4-bit :class:`~lorakit.quant.linear4bit.Linear4bit`: a read-only ``[out, in]`` matrix dequantised on
    demand (never kept dense); writing the matrix requantises it."""

    kind = "linear"
    quantized = True

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - methods use weight_matrix()
        return self.base.dequantize()

    def weight_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.base.dequantize(dtype or self.base.compute_dtype)

    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        self.base.requantize_(matrix)

    def base_forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.base.compute_dtype
        return F.linear(x.to(cd), self.base.dequantize(cd))

    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def adapter_dtype(self) -> torch.dtype:
        cd = self.base.compute_dtype
        return torch.float32 if cd in (torch.float16, torch.bfloat16) else cd

    def densify(self) -> nn.Module:
        """A plain ``nn.Linear`` in the compute dtype with the dequantised weight (exact)."""
        return self.base.to_linear()

    def base_fingerprint(self) -> str | None:
        return self.base.fingerprint()


_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                                 nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                 nn.InstanceNorm3d) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# norms outside torch (transformers' LlamaRMSNorm, T5LayerNorm; timm's LayerNorm2d) are plain modules named *Norm
_NORM_NAME = re.compile(r"norm(?:[123]d)?$", re.IGNORECASE)


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer: the one rule for weight decay (norms never decay) and quantisation (norms
    stay in fp32).

    Example:
        >>> is_norm(nn.LayerNorm(4)), is_norm(nn.Linear(4, 4))
        (True, False)
    """
    return isinstance(module, _NORM_TYPES) or _NORM_NAME.search(type(module).__name__) is not None


def ops_for(module: nn.Module) -> LayerOps:
    """The :class:`LayerOps` for a base module, or :class:`UnsupportedLayer` naming the type and what is supported.

    Example:
        >>> ops_for(nn.Linear(4, 3)).out_features
        3
    """
    if isinstance(module, Linear4bit):
        return Linear4bitOps(module)
    if isinstance(module, nn.Linear):
        return LayerOps(module)
    if is_conv1d(module):
        return Conv1DOps(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingOps(module)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise UnsupportedLayer(
                f"Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r} is not supported; "
                "only groups=1 and padding_mode='zeros' can be adapted (exclude this module)."
            )
        return Conv2dOps(module)
    raise UnsupportedLayer(
        f"{type(module).__name__} cannot be adapted; supported types: nn.Linear, transformers Conv1D, "
        "nn.Embedding, nn.Conv2d, lorakit Linear4bit."
    )


def is_adaptable(module: nn.Module) -> bool:
    try:
        ops_for(module)
        return True
    except UnsupportedLayer:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The adapted layer
# ---------------------------------------------------------------------------------------------------------------
class TiedPartner(NamedTuple):
    """Another module registering a layer's weight Parameter (tied embeddings): ``module.<attr>`` at ``path``."""

    module: nn.Module
    attr: str
    path: str


class Untied(NamedTuple):
    """While merge has given a layer its own copy of a tied weight: the shared Parameter and who else holds it."""

    original: nn.Parameter
    partners: tuple[TiedPartner, ...]


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters. Created by :func:`lorakit.attach`; users rarely build one by hand.

    Forward: ``base(x)`` plus, for every active un-merged adapter, that adapter's contribution; in a routed batch
    (:func:`lorakit.route`) each example gets only its own adapter's contribution.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.ops = ops_for(base)
        self.active: list[str] = []
        self.merged: list[str] = []  # merge order
        self.disabled = False
        self._route: "RouteState | None" = None
        self._live: list["Adapter"] = []
        # (the single live adapter,), whose fused base+branch forward is tried first; a tuple so it is not a submodule
        self._fast: tuple = ()
        # the base weight as it was before the first merged adapter, in its own dtype and layout: unmerge restores
        # it bit-exactly (a buffer, so it follows .to(); not persistent, so it is never saved)
        self.register_buffer("merge_stash", None, persistent=False)
        # other modules registering this layer's weight Parameter (tied embeddings); set by lorakit.attach/merge.
        # Tuples, so nothing here becomes a submodule or parameter.
        self.tied_partners: tuple[TiedPartner, ...] = ()
        # while merge has given this layer its own copy of a tied weight
        self.untied: Untied | None = None

    # -- attribute pass-through so code reading e.g. `layer.weight.dtype` keeps working -------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = super().__getattr__("base")
            return getattr(base, name)

    # -- state ----------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute the list of adapters the fast path runs (call after any state change)."""
        if self.disabled:
            self._live = []
        else:
            self._live = [self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged]
        live = self._live
        self._fast = (live[0],) if len(live) == 1 else ()

    def add(self, name: str, adapter: "Adapter") -> None:
        adapter.train(self.base.training)  # a new module defaults to train mode; follow the model's mode
        self.adapters[name] = adapter
        self.refresh()

    def remove(self, name: str) -> None:
        """Remove one adapter; a merged one is unmerged first, a base shift it applied is undone."""
        if name in self.merged:
            self.unmerge(names=[name])
        adapter = self.adapters[name]
        shift = adapter.base_shift()
        if shift is not None:
            self.change_base_weight(lambda w: w - shift)
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]
        self.refresh()

    def set_active(self, names: Sequence[str]) -> None:
        self.active = [n for n in names if n in self.adapters]
        self.refresh()

    def set_route(self, state: "RouteState | None") -> None:
        """Route each batch row through its own adapter while ``state`` is set (:func:`lorakit.route`)."""
        self._route = state

    def change_base_weight(self, fn) -> None:
        """Apply ``fn`` (an acc-dtype ``[out, in]`` matrix -> matrix) to the *un-merged* base weight (base shifts:
        PiSSA's residual, Delta-LoRA, restore). Merged adapters are folded back on top afterwards, so the merge stash
        always holds the true base and unmerge stays exact."""
        remerge = list(self.merged) if self.merge_stash is not None else []
        if remerge:
            self._restore_stash()
        w32 = self.ops.weight_matrix(self.ops.acc_dtype())
        self.ops.set_weight_matrix(fn(w32))
        for adapter in self.adapters.values():
            adapter.on_base_changed()
        if remerge:
            self.merge(remerge)
        self.refresh()

    # -- merge ----------------------------------------------------------------------------------------------
    # Exactness: the first merge keeps the pre-merge weight (``merge_stash``, its own dtype). Unmerging every
    # adapter copies it back, so the base is bit-identical in every dtype, however many merge/unmerge cycles ran.
    # A partial unmerge restores the stash and folds the remaining adapters in again, in fp32 (fp64 for fp64
    # layers), rounded once to the weight's dtype. Cost: one copy of each merged layer's weight until unmerge or
    # unload. A merge whose result is not finite in the weight's dtype (fp16 overflow, NaN factors) is refused
    # before anything changes.
    def _pending(self, names: Iterable[str]) -> list[str]:
        return [n for n in dict.fromkeys(names) if n in self.adapters and n not in self.merged]

    def _weight_dtype(self) -> torch.dtype:
        """The dtype the merged weight is stored in (a 4-bit base: its compute dtype, which merge densifies to)."""
        if self.ops.quantized:
            return getattr(self.base, "compute_dtype", None) or self.ops.weight_matrix().dtype
        return self.ops.weight.dtype

    def _merged_matrix(self, names: list[str]) -> torch.Tensor:
        """The ``[out, in]`` weight with ``names`` folded in, rounded to the weight's dtype; raises ValueError if a
        weight would become inf/NaN. Changes nothing (beyond merge caches the adapters keep for themselves)."""
        dtype = self._weight_dtype()
        with torch.no_grad():
            w32 = self.ops.weight_matrix(dtype).to(self.ops.acc_dtype())
            for name in names:
                w32 = self.adapters[name].merge_into(self, w32)
            new = w32.to(dtype)
        if not bool(torch.isfinite(new).all()):
            bad = ~torch.isfinite(new) & torch.isfinite(self.ops.weight_matrix(dtype))
            if bool(bad.any()):
                path = self.adapters[names[0]].path
                count = int(bad.sum())
                if bool(torch.isfinite(w32[bad]).all()):
                    peak = float(w32[bad].abs().max())
                    why = (f"would overflow {dtype}: {count} merged weights exceed its largest value "
                           f"{torch.finfo(dtype).max:.6g} (largest |w| = {peak:.4g})")
                else:
                    why = f"gives {count} non-finite (NaN/inf) weights: the adapter's change itself is not finite"
                raise ValueError(
                    f"merge of adapter(s) {names} into {path!r} ({dtype}) {why}; nothing was merged. Merge in "
                    "float32 or bfloat16 instead (e.g. model.float(), or load the model with dtype=torch."
                    "bfloat16), or keep the adapter un-merged."
                )
        return new

    def check_merge(self, names: Iterable[str]) -> None:
        """Raise the error :meth:`merge` would raise, without changing anything (lets a model-wide merge refuse
        before touching any layer)."""
        names = self._pending(names)
        if names:
            self._merged_matrix(names)
            for name in names:  # not merged yet: drop undo caches merge_into may have built
                self.adapters[name].on_unmerged()

    def _untie(self) -> tuple[str, ...]:
        """Give the base its own copy of a weight Parameter it shares with other modules (tied embeddings), so a
        merge changes only this layer. Returns the partners' paths (empty if the weight is not shared)."""
        weight = None if self.ops.quantized else self.base._parameters.get("weight")
        if weight is None:
            return ()
        candidates = self.tied_partners + (self.untied.partners if self.untied is not None else ())
        partners: list[TiedPartner] = []
        seen: set[tuple[int, str]] = set()
        for partner in candidates:
            key = (id(partner.module), partner.attr)
            if partner.module._parameters.get(partner.attr) is weight and key not in seen:
                seen.add(key)
                partners.append(partner)
        if not partners:
            return ()
        self.base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.untied = Untied(weight, tuple(partners))
        return tuple(partner.path for partner in partners)

    def _retie(self) -> None:
        """After a full unmerge: share the original Parameter again if every partner still holds it unchanged
        (else the layer keeps its own, equal-valued copy: outputs are exact either way)."""
        if self.untied is None:
            return
        original, partners = self.untied
        weight = self.base.weight
        if (all(p.module._parameters.get(p.attr) is original for p in partners) and original.shape == weight.shape
                and original.dtype == weight.dtype and original.device == weight.device
                and torch.equal(original.detach(), weight.detach())):
            self.base.weight = original
            self.untied = None

    def _restore_stash(self) -> None:
        """Copy the pre-merge weight back (bit-exact) and mark every adapter un-merged."""
        with torch.no_grad():
            self.base.weight.copy_(self.merge_stash)
        self.merge_stash = None
        for name in self.merged:
            self.adapters[name].on_unmerged()
        self.merged = []

    def merge(self, names: Iterable[str]) -> tuple[str, ...]:
        """Fold adapters ``names`` into the base weight (fp32/fp64 accumulation, rounded once).

        Exact to undo: the pre-merge weight is kept, so :meth:`unmerge` of every adapter restores it bit-exactly in
        every dtype. A result that is not finite in the weight's dtype raises ValueError before any change. A
        weight shared with other modules (tied embeddings) is first given its own copy, so only this layer
        changes; returns the paths of those partners (empty if none).
        """
        names = self._pending(names)
        if not names:
            return ()
        new = self._merged_matrix(names)  # may raise: nothing has changed yet
        if self.ops.quantized:
            # Merging into 4-bit would silently change the function; dequantise to the compute dtype instead.
            self.base = self.ops.densify()
            self.ops = ops_for(self.base)
        untied: tuple[str, ...] = ()
        if not self.merged:
            untied = self._untie()
            self.merge_stash = self.base.weight.detach().clone()
        self.ops.set_weight_matrix(new)
        self.merged.extend(names)
        for adapter in self.adapters.values():
            adapter.on_base_changed()
        self.refresh()
        return untied

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """Undo :meth:`merge` for ``names`` (default: all merged adapters).

        Unmerging every adapter restores the pre-merge weight bit-exactly (and re-ties a weight that merge had
        untied, if its partners still hold it unchanged); a partial unmerge gives the original weight plus the
        remaining adapters' changes, accumulated in fp32 and rounded once.
        """
        wanted = set(self.merged if names is None else names)
        if not wanted & set(self.merged):
            return
        stash = self.merge_stash
        if stash is None or tuple(stash.shape) != tuple(self.base.weight.shape):
            self._unmerge_by_subtraction(wanted)  # no stash (merged by older code): best effort, as before
            return
        keep = [n for n in self.merged if n not in wanted]
        previous = (self.base.weight.detach().clone(), list(self.merged)) if keep else None
        self._restore_stash()
        if keep:
            try:
                self.merge(keep)
            except ValueError:  # the remaining set alone overflows: put the merged state back as it was
                with torch.no_grad():
                    self.base.weight.copy_(previous[0])
                self.merge_stash, self.merged = stash, previous[1]
                for adapter in self.adapters.values():
                    adapter.on_base_changed()
                self.refresh()
                raise
        else:
            self._retie()
        for adapter in self.adapters.values():
            adapter.on_base_changed()
        self.refresh()

    def _unmerge_by_subtraction(self, wanted: set[str]) -> None:
        w32 = self.ops.weight_matrix(self.ops.acc_dtype())
        # Undo in reverse merge order; adapters merged after a wanted one are undone and redone to keep exactness.
        redo = []
        while wanted & set(self.merged):
            name = self.merged.pop()
            w32 = self.adapters[name].unmerge_from(self, w32)
            if name not in wanted:
                redo.append(name)
        for name in reversed(redo):
            w32 = self.adapters[name].merge_into(self, w32)
            self.merged.append(name)
        self.ops.set_weight_matrix(w32)
        for adapter in self.adapters.values():
            adapter.on_base_changed()
        self.refresh()

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fast = self._fast
        if fast and self._route is None and not args and not kwargs and not self._shift_adapters_off():
            y = fast[0].fused_forward(self, x)  # None when the adapter's fused path does not apply right now
            if y is not None:
                return y
        y = self.base(x, *args, **kwargs)
        if self._route is not None and not self.disabled:
            return self._routed_forward(x, y)
        if self._shift_adapters_off():
            y = self._undo_shifts(x, y, keep=self.active)
        for adapter in self._live:
            y = adapter.apply(self, x, y)
        return y

    def _shift_adapters_off(self) -> bool:
        """True if some adapter that shifted the base weight is not part of the current computation."""
        for name, adapter in self.adapters.items():
            if adapter.shifts_base and (self.disabled or name not in self.active) and name not in self.merged:
                return True
        return False

    def _undo_shifts(self, x: torch.Tensor, y: torch.Tensor, keep: Iterable[str]) -> torch.Tensor:
        keep = set(keep) if not self.disabled else set()
        for name, adapter in self.adapters.items():
            if adapter.shifts_base and name not in keep and name not in self.merged:
                y = y - adapter.shift_output(self, x).to(y.dtype)
        return y

    def _routed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        route = self._route
        if self.merged:
            raise RuntimeError(
                f"route() cannot run with merged adapters {self.merged}: their deltas are inside the weights of "
                "every example. Call lorakit.unmerge(model) first."
            )
        if x.shape[0] != route.batch_size:
            raise ValueError(
                f"route() was given {route.batch_size} adapter names but the layer input has batch size "
                f"{x.shape[0]}; pass one name (or None) per example."
            )
        pieces = []
        for name, index in route.groups(x.device):
            xs, ys = x.index_select(0, index), y.index_select(0, index)
            ys = self._undo_shifts(xs, ys, keep=[name] if name is not None else [])
            if name is not None and name in self.adapters:
                ys = self.adapters[name].apply(self, xs, ys)
            pieces.append((index, ys))
        out = y
        for index, ys in pieces:
            out = out.index_copy(0, index, ys)
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, merged={self.merged}"


class ModuleCopies(nn.Module):
    """A module that adapters train whole (``modules_to_save``): the original, untouched and frozen, plus one
    copy per adapter that trains it. Put in place of the module by :func:`lorakit.attach`; removed by
    :func:`lorakit.delete` (with the last copy) and :func:`lorakit.unload`.

    Forward runs the copy of the active adapter that owns one, else the original (also inside
    :func:`lorakit.disabled`). Several active adapters owning a copy are refused: two heads have no meaningful sum.
    In a :func:`lorakit.route` batch every example runs through its own adapter's copy (``None``: the original);
    the module's first argument must then be batch-first. Attribute reads (``wrapper.weight``) go to the module a
    forward would run now, so code such as transformers' ``get_output_embeddings().weight`` keeps working.

    A copy owns its tensors: when the original shares its weight with another module (an output head tied to the
    input embeddings), the original stays tied and untouched, and each adapter's copy is untied from it (two tied
    modules both in ``modules_to_save`` get two independent copies). ``lorakit.unload(merge=True)`` puts the active
    adapter's copy in place, so the plain model holds a head of its own (transformers loads such a saved model
    untied, as the two tensors differ).
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self._route: "RouteState | None" = None
        self.path = ""  # where it sits in the model, for error messages

    def set_route(self, state: "RouteState | None") -> None:
        """Run each batch row through its own adapter's copy while ``state`` is set (:func:`lorakit.route`)."""
        self._route = state

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_modules" not in self.__dict__:
                raise
            return getattr(self.current(), name)

    # -- state ----------------------------------------------------------------------------------------------
    def owners(self) -> list[str]:
        """Active adapters that own a copy (none while disabled)."""
        return [] if self.disabled else [n for n in self.active if n in self.copies]

    def current(self) -> nn.Module:
        """The module a plain forward runs now; a clear error if several active adapters own different copies.

        Copies equal bit for bit are one module, so they run (a 0.1.0 folder whose adapters shared one head loads
        as such copies); the check costs a comparison only in that rare several-owners case."""
        owners = self.owners()
        if len(owners) > 1 and not self._identical([self.copies[n] for n in owners]):
            raise ValueError(
                f"adapters {owners} are active together and each trained its own copy of module "
                f"{self.path or type(self.original).__name__!r} (modules_to_save); there is no meaningful sum "
                f"of two such modules. Activate one of them (lorakit.set_active(model, {owners[0]!r})) or give "
                f"each example its adapter with lorakit.route(model, names)"
            )
        return self.copies[owners[0]] if owners else self.original

    @staticmethod
    def _identical(modules: list[nn.Module]) -> bool:
        first = modules[0].state_dict()
        for other in modules[1:]:
            state = other.state_dict()
            if state.keys() != first.keys() or not all(
                    state[k].shape == first[k].shape and state[k].dtype == first[k].dtype
                    and torch.equal(state[k], first[k]) for k in first):
                return False
        return True

    def add(self, name: str, module: nn.Module) -> None:
        self.copies[name] = module

    def remove(self, name: str) -> None:
        del self.copies[name]
        self.active = [n for n in self.active if n != name]

    def set_active(self, names: Sequence[str]) -> None:
        self.active = [n for n in names if n in self.copies]

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._route is None or self.disabled:
            return self.current()(*args, **kwargs)
        route = self._route
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"route(): module {self.path!r} (modules_to_save) must get a batch-first tensor as "
                             f"its first argument to give each example its own adapter's copy")
        if x.shape[0] != route.batch_size:
            raise ValueError(
                f"route() was given {route.batch_size} adapter names but module {self.path!r} got batch size "
                f"{x.shape[0]}; pass one name (or None) per example."
            )
        groups = [(self.copies[n] if n in self.copies else self.original, index) for n, index in route.groups(x.device)]
        if len({id(m) for m, _ in groups}) == 1:  # every example runs the same module: one call
            return groups[0][0](*args, **kwargs)
        extra = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if extra:
            raise ValueError(f"route(): module {self.path!r} (modules_to_save) takes more than one tensor, so lorakit "
                             f"cannot split its inputs per example; route batches whose examples share its copy")
        out = None
        for module, index in groups:
            ys = module(x.index_select(0, index), *args[1:], **kwargs)
            if not isinstance(ys, torch.Tensor):
                raise ValueError(f"route(): module {self.path!r} (modules_to_save) returns "
                                 f"{type(ys).__name__}, not a tensor; route batches whose examples share its copy")
            if out is None:
                out = ys.new_zeros((route.batch_size, *ys.shape[1:]))
            out = out.index_copy(0, index, ys)
        return out

    def extra_repr(self) -> str:
        return f"copies={list(self.copies)}, active={self.active}"


class RouteState:
    """Per-example adapter assignment shared by every layer during a :func:`lorakit.route` block."""

    def __init__(self, names: Sequence[str | None]):
        self.names = list(names)
        self.batch_size = len(self.names)
        order: dict[str | None, list[int]] = {}
        for i, n in enumerate(self.names):
            order.setdefault(n, []).append(i)
        self._groups = list(order.items())
        self._cache: dict[torch.device, list[tuple[str | None, torch.Tensor]]] = {}

    def groups(self, device: torch.device) -> list[tuple[str | None, torch.Tensor]]:
        if device not in self._cache:
            self._cache[device] = [(n, torch.tensor(ix, dtype=torch.long, device=device)) for n, ix in self._groups]
        return self._cache[device]

