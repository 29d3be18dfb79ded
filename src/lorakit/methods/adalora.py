"""AdaLoRA (Zhang et al., ICLR 2023): SVD-form adapters whose total rank is re-allocated while training.

Per layer, ``ΔW = s · P diag(λ) Q`` stored as triplets: ``A = Q ∈ R^{r×in}``, ``E = λ ∈ R^{r×1}``,
``B = P ∈ R^{out×r}``, with ``s = alpha / (r_init + 1e-5)`` — PEFT's definition: the initial rank stays in the
denominator after pruning, so dropping a triplet with ``λ = 0`` never changes the function. Forward:
``y + s · ((drop(x) Aᵀ) ⊙ λ) Bᵀ``. Init as PEFT: ``λ = 0``, A and B ~ N(0, 0.02²).

Training (methods.md §8; driven by :func:`lorakit.training_hooks`, the transformers callback or lorakit's
Trainer — the method warns once if optimiser steps happen without them):

* loss term: ``orth_reg · mean over all A and B of ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F`` (un-squared, as the official code;
  ``orth_reg = 0.1`` by default as the official scripts, PEFT uses 0.5);
* after each optimiser step ``t`` (gradients still present), while ``t < T − t_final``: element importance
  ``I = |w ⊙ ∂L/∂w|``, ``Ī ← β1 Ī + (1 − β1) I``, ``Ū ← β2 Ū + (1 − β2)|I − Ī|``, triplet score
  ``S_i = Ī·Ū(λ_i) + mean_j Ī·Ū(A_ij) + mean_k Ī·Ū(B_ki)``;
* cubic budget ``b(t)`` (:func:`budget_schedule`) over all layers of the adapter; at masking steps the
  ``b(0) − b(t)`` lowest-scored triplets get ``λ = 0`` (exactly that many: ties broken by position);
* at ``t = T − t_final`` the kept set is frozen at the target budget ``target_r × n_layers`` and re-applied after
  every later step;
* ``finish()``: each layer is pruned to its kept triplets (``final_ranks`` in the config; rank 0 allowed), so the
  total kept rank is exactly the target budget and :func:`lorakit.save` writes only the kept triplets.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    >>> cfg = lorakit.AdapterConfig(method="adalora", r=4, target_r=2, total_steps=4, targets=["0", "2"])
    >>> _ = lorakit.attach(net, cfg)
    >>> opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    >>> hooks = lorakit.training_hooks(net)
    >>> for _ in range(4):
    ...     loss = net(torch.randn(4, 8)).pow(2).mean() + lorakit.regularization_loss(net)
    ...     loss.backward(); opt.step(); hooks.after_step(); opt.zero_grad()
    >>> hooks.finish()
    >>> sum(rank_report(net).values())
    4
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..registry import adapted_layers, registry
from .base import Adapter, placed_like, whole
from .lora import can_fuse, fused_low_rank
from .peft_lora import PEFT_MODEL_PREFIX, peft_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer, LayerOps

#: importance state per parameter: smoothed sensitivity Ī ("ipt_") and uncertainty Ū ("unc_")
_SCORE_BUFFERS = ("ipt_A", "unc_A", "ipt_E", "unc_E", "ipt_B", "unc_B")
_MASK_BUFFERS = ("kept", "final_keep")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"AdapterConfig.{field}={value!r} is invalid for method='adalora'; allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def budget_schedule(step: int, initial: int, target: int, t_init: int, t_final: int, total_steps: int,
                    delta_t: int) -> tuple[int, bool]:
    """AdaLoRA's cubic budget: ``(total kept triplets at step t, whether to mask at t)``.

    ``t ≤ t_init``: ``(initial, False)``; ``t > T − t_final``: ``(target, True)``; otherwise
    ``⌊target + (initial − target)·(1 − (t − t_init)/(T − t_final − t_init))³⌋`` with masking when
    ``t mod delta_t = 0``.

    Example:
        >>> budget_schedule(5, initial=24, target=8, t_init=0, t_final=0, total_steps=10, delta_t=1)
        (10, True)
    """
    if step <= t_init:
        return initial, False
    if step > total_steps - t_final:
        return target, True
    progress = 1 - (step - t_init) / (total_steps - t_final - t_init)
    return int((initial - target) * (progress ** 3) + target), step % delta_t == 0


class AdaLoraAdapter(Adapter):
    """One layer's AdaLoRA triplets ``(A, E, B)`` plus its importance averages while training."""

    method = "adalora"
    default_r = 12  # PEFT's init_r
    needs_hooks = True
    allowed_inits = ("kaiming",)  # the config default; AdaLoRA always uses its own init (λ = 0, A, B ~ N(0, 0.02²))

    def __init__(self, ops: "LayerOps", config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        self.r_init = config.rank_for(path)
        final = config.final_ranks
        self.r = int(final[path]) if final is not None and path in final else self.r_init
        self.alpha = config.alpha_for(path)
        self.scaling = self.alpha / (self.r_init + 1e-5)  # PEFT: lora_alpha / (ranknum + 1e-5), ranknum = r_init
        #: True once pruned by finish() (or loaded pruned): no more allocation, no warning, no regulariser
        self.hooks_done = final is not None
        dtype, device = ops.adapter_dtype(), ops.device()
        self.A = nn.Parameter(torch.zeros(self.r, self.in_features, dtype=dtype, device=device))
        self.E = nn.Parameter(torch.zeros(self.r, 1, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=dtype, device=device))
        # training state: not part of the saved adapter (the hooks checkpoint it), created on first use
        for name in _SCORE_BUFFERS + _MASK_BUFFERS:
            self.register_buffer(name, None, persistent=False)

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        super().validate_config(config)
        if config.scaling != "standard":
            _fail("scaling", config.scaling, "'standard' (AdaLoRA's scaling is alpha / r_init)")
        if not _is_int(config.target_r) or config.target_r < 1:
            _fail("target_r", config.target_r, "an integer >= 1, the average rank per layer at the end (required)")
        if config.rank_pattern is None and config.target_r > config.r:
            _fail("target_r", config.target_r, f"at most r={config.r} (the initial rank)")
        if not _is_int(config.total_steps) or config.total_steps < 1:
            _fail("total_steps", config.total_steps,
                  "an integer >= 1, the number of optimiser steps of the run (required for the budget schedule)")
        for name in ("t_init", "t_final"):
            value = getattr(config, name)
            if not _is_int(value) or value < 0:
                _fail(name, value, "an integer >= 0")
        if not _is_int(config.delta_t) or config.delta_t < 1:
            _fail("delta_t", config.delta_t, "an integer >= 1")
        if config.t_init + config.t_final >= config.total_steps:
            _fail("t_init", config.t_init, f"t_init + t_final (t_final={config.t_final}) < total_steps="
                                           f"{config.total_steps}, so that the rank budget has steps to decrease")
        for name in ("beta1", "beta2"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                _fail(name, value, "a number in (0, 1)")
        if (isinstance(config.orth_reg, bool) or not isinstance(config.orth_reg, (int, float))
                or not math.isfinite(config.orth_reg) or config.orth_reg < 0):
            _fail("orth_reg", config.orth_reg, "a finite number >= 0")
        final = config.final_ranks
        if final is not None and (not isinstance(final, dict) or not all(
                isinstance(k, str) and _is_int(v) and v >= 0 for k, v in final.items())):
            _fail("final_ranks", final, "None or {layer path: kept rank >= 0} (written by AdaLoRA's finish)")

    @classmethod
    def check_layer(cls, ops: "LayerOps", config: "AdapterConfig", path: str) -> None:
        final = config.final_ranks
        if final is not None and path in final and final[path] > config.rank_for(path):
            raise ValueError(f"AdapterConfig.final_ranks[{path!r}]={final[path]} exceeds the layer's initial rank "
                             f"{config.rank_for(path)}")

    @classmethod
    def make_shared(cls, config: "AdapterConfig", targets: list, name: str,
                    existing: nn.Module | None = None) -> None:
        # Nothing is shared; this is the one place that sees every target before the model changes, so the global
        # budget is checked here.
        if config.final_ranks is None:
            initial = sum(config.rank_for(path) for path, _ in targets)
            target = config.target_r * len(targets)
            if target > initial:
                _fail("target_r", config.target_r, f"a final budget target_r × {len(targets)} layers = {target} "
                                                   f"not above the initial total rank {initial}")
        return None

    # -- init / forward / weights -------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator) -> None:
        with torch.no_grad():
            self.E.zero_()
            self.A.copy_(torch.randn(self.A.shape, generator=generator) * 0.02)
            self.B.copy_(torch.randn(self.B.shape, generator=generator) * 0.02)
        return None

    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.r == 0:
            return y
        xa = self.dropout(x)
        if xa.is_floating_point() and xa.dtype != self.A.dtype:
            xa = xa.to(self.A.dtype)
        # scale the r-wide activations by λ instead of building A ⊙ λ: same result, no [r, in] temporary
        z = layer.ops.down(xa, self.A) * layer.ops.per_mid(self.E.view(-1))
        if z.dtype == y.dtype:
            return layer.ops.up_add(y, z, self.B, self.scaling)
        return y + (layer.ops.up(z, self.B) * self.scaling).to(y.dtype)

    def fused_forward(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor | None:
        """The layer output in one fused op (LoRA's, with ``A·diag(λ)`` as the down factor), or None."""
        if self.r == 0 or not can_fuse(self, layer, x, (self.A, self.E, self.B)):
            return None
        return fused_low_rank(layer, x, self.A * self.E, self.B, self.scaling)  # [r, in] temporary: tiny

    def delta_weight(self, layer: "AdaptedLayer | None" = None) -> torch.Tensor:
        acc = torch.promote_types(self.A.dtype, torch.float32)
        return self.scaling * (self.B.to(acc) @ (self.A.to(acc) * self.E.to(acc)))

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (self.A * self.E).detach(), self.B.detach(), self.scaling

    def param_role(self, param_name: str) -> str:
        if param_name.endswith("E") and self.layer_kind != "embedding":
            return "vector"  # λ is a vector stored as [r, 1]: it keeps the base learning rate under LoRA+
        return super().param_role(param_name)

    # -- importance ---------------------------------------------------------------------------------------------
    def update_importance(self, beta1: float, beta2: float) -> None:
        """One EMA update of sensitivity and uncertainty from the current weights and gradients (methods.md §8)."""
        type(self).update_importances([self], beta1, beta2)

    @staticmethod
    @torch.no_grad()
    def update_importances(adapters: list["AdaLoraAdapter"], beta1: float, beta2: float) -> None:
        """:meth:`update_importance` for many adapters at once, with multi-tensor (``_foreach``) ops: per step
        this is ~10 small ops per parameter, whose Python/dispatch overhead otherwise rivals their work."""
        params, grads, avgs, uncs = [], [], [], []
        for a in adapters:
            for pname in ("A", "E", "B"):
                p = getattr(a, pname)
                if p.grad is None:
                    continue
                avg, unc = a._buffers["ipt_" + pname], a._buffers["unc_" + pname]
                if avg is None:
                    avg, unc = torch.zeros_like(p), torch.zeros_like(p)
                    a._buffers["ipt_" + pname], a._buffers["unc_" + pname] = avg, unc
                params.append(p)
                grads.append(p.grad)
                avgs.append(avg)
                uncs.append(unc)
        if not params:
            return
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        # the same roundings as β·Ī + (1 − β)·I written out
        torch._foreach_mul_(avgs, beta1)
        torch._foreach_add_(avgs, torch._foreach_mul(ipt, 1 - beta1))
        dev = torch._foreach_sub(ipt, avgs)  # against the just-updated Ī, as the official code
        torch._foreach_abs_(dev)
        torch._foreach_mul_(dev, 1 - beta2)
        torch._foreach_mul_(uncs, beta2)
        torch._foreach_add_(uncs, dev)

    def has_scores(self) -> bool:
        return any(getattr(self, n) is not None for n in _SCORE_BUFFERS)

    def triplet_scores(self) -> torch.Tensor:
        """``S_i = s(λ_i) + mean_j s(A_ij) + mean_k s(B_ki)`` with ``s = Ī·Ū`` (0 where no gradient was seen)."""
        def score(pname: str, dim: int | None) -> torch.Tensor:
            avg, unc = getattr(self, "ipt_" + pname), getattr(self, "unc_" + pname)
            if avg is None:
                return torch.zeros(self.r, dtype=self.E.dtype, device=self.E.device)
            s = whole(avg) * whole(unc)  # FSDP2: the averages are sharded like their parameters; scores are global
            return s.view(-1) if dim is None else s.mean(dim=dim)

        return score("E", None) + (score("A", 1) + score("B", 0))

    def magnitude_scores(self) -> torch.Tensor:
        """``|λ_i|·‖A_i‖·‖B_:,i‖``: the size of each triplet's term, used when no importance was ever measured."""
        with torch.no_grad():
            return whole(self.E).view(-1).abs() * whole(self.A).norm(dim=1) * whole(self.B).norm(dim=0)

    @torch.no_grad()
    def apply_keep(self, keep: torch.Tensor) -> None:
        """Zero λ of the triplets not kept (they stay trainable and may regrow until the final phase)."""
        self.E.masked_fill_(placed_like(~keep.view(-1, 1), self.E), 0.0)  # FSDP2: each rank masks its shard
        self.kept = keep

    def prune(self, keep: torch.Tensor) -> None:
        """Shrink the parameters to the kept triplets (the function is unchanged when the others have λ = 0)."""
        idx = keep.nonzero().view(-1).to(self.A.device)
        with torch.no_grad():  # under FSDP2 the pruned triplets are whole tensors on every rank
            a, e, b = whole(self.A)[idx].clone(), whole(self.E)[idx].clone(), whole(self.B)[:, idx].clone()
        trains = self.A.requires_grad
        self.A = nn.Parameter(a, requires_grad=trains)
        self.E = nn.Parameter(e, requires_grad=trains)
        self.B = nn.Parameter(b, requires_grad=trains)
        self.r = int(idx.numel())
        self.hooks_done = True
        for name in _SCORE_BUFFERS + _MASK_BUFFERS:
            setattr(self, name, None)

    def current_rank(self) -> int:
        """Triplets currently kept: the pruned rank, or the last mask's count, or r before any masking."""
        if self.hooks_done:
            return self.r
        for mask in (self.final_keep, self.kept):
            if mask is not None:
                return int(mask.sum())
        return self.r

    # -- training hooks (the global budget needs every layer of the adapter at once) -----------------------------
    @staticmethod
    def _live(entries: list) -> list:
        return [a for _, _, a in entries if not a.hooks_done]

    @staticmethod
    def _top(adapters: list["AdaLoraAdapter"], budget: int) -> list[torch.Tensor]:
        """Per adapter a bool mask keeping exactly ``budget`` triplets in total, the highest scores."""
        measured = any(a.has_scores() for a in adapters)
        scores = [(a.triplet_scores() if measured else a.magnitude_scores()).detach().float() for a in adapters]
        device = scores[0].device
        flat = torch.cat([s.to(device) for s in scores])
        drop = min(max(flat.numel() - budget, 0), flat.numel())
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=device)
        if drop:
            # the `drop` lowest scores (PEFT/official: S ≤ kthvalue, identical unless scores tie; a stable sort
            # keeps the count exact under ties)
            keep[torch.argsort(flat, stable=True)[:drop]] = False
        return [k.to(a.E.device) for k, a in zip(keep.split([s.numel() for s in scores]), adapters)]

    @classmethod
    def adapter_after_step(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig",
                           step: int) -> None:
        live = cls._live(entries)
        if not live:
            return
        final_at = config.total_steps - config.t_final
        target = config.target_r * len(live)
        if step < final_at:
            cls.update_importances(live, config.beta1, config.beta2)
            budget, mask_now = budget_schedule(step, sum(a.r for a in live), target, config.t_init, config.t_final,
                                               config.total_steps, config.delta_t)
            if mask_now:
                for a, keep in zip(live, cls._top(live, budget)):
                    a.apply_keep(keep)
            return
        if any(a.final_keep is None for a in live):  # t = T - t_final (or later, if it was missed): freeze the set
            for a, keep in zip(live, cls._top(live, target)):
                a.final_keep = keep
                for buf in _SCORE_BUFFERS:
                    setattr(a, buf, None)
        for a in live:
            a.apply_keep(a.final_keep)

    @classmethod
    def adapter_finish(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig") -> None:
        live = cls._live(entries)
        if not live:
            return
        if all(a.final_keep is not None for a in live):
            keeps = [a.final_keep for a in live]
        else:  # training stopped before T - t_final: allocate the target budget now from the scores so far
            keeps = cls._top(live, config.target_r * len(live))
        by_adapter = {id(a): keep for a, keep in zip(live, keeps)}
        for _, layer, a in entries:
            if id(a) not in by_adapter:
                continue
            merged = name in layer.merged
            if merged:  # keep merged weights consistent with what unmerge will subtract
                layer.unmerge([name])
            if hasattr(a.A, "device_mesh"):
                # FSDP2 re-registers the parameters it manages on this module object around every forward (an
                # evaluation after finish would bring the unpruned ones back): the pruned adapter, holding whole
                # tensors, is a new module in its place
                pruned = copy.deepcopy(a)
                pruned.prune(by_adapter[id(a)])
                a.hooks_done = True
                layer.adapters[name] = pruned
                layer.refresh()
            else:
                a.prune(by_adapter[id(a)])
            if merged:
                layer.merge([name])

        ranks = {path: layer.adapters[name].r for path, layer, _ in entries}
        reg = registry(model)
        reg.configs[name] = config.replace(final_ranks=ranks)
        reg.extra.setdefault(name, {})["final_ranks"] = dict(ranks)

    @classmethod
    def adapter_regularization(cls, entries: list, config: "AdapterConfig") -> torch.Tensor | None:
        if not config.orth_reg:
            return None
        # ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F of every live adapter; same-shaped matrices go through one batched product
        # (one graph node per shape instead of several per matrix)
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for _, _, a in entries:
            if a.hooks_done:
                continue
            # (whole under FSDP2, outside the forward: differentiable gathers, each rank's gradient is its shard's)
            for m in (whole(a.A), whole(a.B).t()):  # both as [r, n]: the Gram matrix is m mᵀ
                by_shape.setdefault((tuple(m.shape), m.dtype, m.device), []).append(m)
        terms = []
        # exact fp32 even inside a bf16 autocast region (the term is tiny matrices, cost is negligible)
        with torch.autocast(next(iter(by_shape))[2].type if by_shape else "cpu", enabled=False):
            for (shape, dtype, device), mats in by_shape.items():
                stacked = torch.stack(mats)
                gram = torch.bmm(stacked, stacked.transpose(1, 2))
                eye = torch.eye(shape[0], dtype=dtype, device=device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        if not terms:
            return None
        return config.orth_reg * torch.cat(terms).mean()

    @classmethod
    def adapter_state_dict(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig") -> dict:
        out = {}
        for path, _, a in entries:
            # copies: the averages are updated in place by later steps
            # (whole tensors: under FSDP2 every rank calls this, in the same order)
            state = {n: whole(getattr(a, n)).clone() for n in _SCORE_BUFFERS + _MASK_BUFFERS
                     if getattr(a, n) is not None}
            if state:
                out[path] = state
        return out

    @classmethod
    def adapter_load_state_dict(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig",
                                state: dict) -> None:
        for path, _, a in entries:
            for n, t in state.get(path, {}).items():
                if n in _SCORE_BUFFERS + _MASK_BUFFERS:
                    t = t.to(a.E.device, copy=True)
                    # FSDP2: an average is sharded like its parameter (the checkpoint holds the whole tensor)
                    setattr(a, n, placed_like(t, getattr(a, n[4:])) if n in _SCORE_BUFFERS else t)

    # -- PEFT's format: ADALORA ---------------------------------------------------------------------------------
    # PEFT gives every layer ``init_r`` triplets and the scaling ``lora_alpha / (init_r + 1e-5)``, and describes
    # pruned layers by ``rank_pattern`` = ``{"<path>.lora_E": [bool] * init_r}`` next to shrunk tensors. lorakit
    # reads that as ``r = init_r`` plus ``final_ranks`` (what its own ``finish()`` records), and writes pruned or
    # smaller layers the same way, folding any per-layer scaling PEFT cannot express into ``λ``.
    peft_type = "ADALORA"
    peft_keys = {"lora_A": "A", "lora_B": "B", "lora_E": "E"}

    @classmethod
    def reads_peft(cls, peft_type: str, cfg: dict[str, Any]) -> bool:
        return peft_type == "ADALORA"

    @classmethod
    def to_peft(cls, name: str, config: "AdapterConfig", entries: list, shared: nn.Module | None
                ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """A layer with fewer triplets than ``init_r`` (pruned by ``finish()``, or a smaller initial rank) is
        written shrunk with a ``rank_pattern`` bool mask of length ``init_r`` (PEFT's own layout after rank
        allocation, which resizes its modules on load), and a layer whose scaling differs from PEFT's single one
        has the ratio folded into ``λ`` (``E``): the same function either way."""
        bad = [p for p, layer, _ in entries if layer.ops.kind == "embedding"]
        if bad:
            raise ValueError(f"AdaLoRA adapter on embedding layer(s) {bad[:3]} cannot be written for PEFT, whose "
                             f"AdaLoRA adapts Linear, Conv1D and Conv2d layers only")
        init_r = max(a.r_init for _, _, a in entries)
        alphas = [a.alpha for _, _, a in entries]
        alpha = max(set(alphas), key=alphas.count)
        peft_scaling = alpha / (init_r + 1e-5)
        rank_pattern, layers = {}, {}
        for path, _, adapter in entries:
            e = adapter.E.detach().float()
            if adapter.scaling != peft_scaling:
                e = e * (adapter.scaling / peft_scaling)
            layers[path] = {"lora_A": adapter.A.detach().float(), "lora_E": e, "lora_B": adapter.B.detach().float()}
            if adapter.r < init_r:
                rank_pattern[f"{path}.lora_E"] = [True] * adapter.r + [False] * (init_r - adapter.r)
        # r is unused by PEFT's AdaLoRA (it warns unless r is its default, 8)
        cfg = dict(r=8, init_r=init_r, target_r=int(config.target_r), lora_alpha=alpha, total_step=config.total_steps,
                   tinit=config.t_init, tfinal=config.t_final, deltaT=config.delta_t, beta1=config.beta1,
                   beta2=config.beta2, orth_reg_weight=config.orth_reg, lora_dropout=float(config.dropout),
                   rank_pattern=rank_pattern or None, init_lora_weights=True)
        return cfg, layers, {}

    @classmethod
    def from_peft(cls, cfg: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]],
                  shared: dict[str, torch.Tensor], ops: dict[str, "LayerOps"], folder: Path
                  ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """``r = init_r`` always (it sets the scaling alpha/(init_r + 1e-5)); layers pruned by rank allocation get
        their kept rank from ``final_ranks``, as lorakit's own ``finish()`` records it."""
        init_r = peft_number(cfg, "init_r", 12, folder)
        masks = _peft_rank_masks(cfg, folder)
        unknown = sorted(set(masks) - set(layers))
        if unknown:
            raise ValueError(f"{folder}: AdaLoRA rank_pattern names layers without adapter tensors: {unknown[:4]}")
        out, final = {}, {}
        for path, named in layers.items():
            lacking = [k for k in ("A", "E", "B") if k not in named]
            if lacking:
                raise ValueError(f"{folder}: AdaLoRA layer {path} lacks lora_{', lora_'.join(lacking)}")
            layer_ops = ops[path]
            if layer_ops.kind == "embedding":
                raise ValueError(f"{folder}: AdaLoRA layer {path} is an embedding, which AdaLoRA does not adapt")
            a, e, b = named["A"], named["E"], named["B"]
            # explicit shapes: rank-0 layers have zero-size tensors, where a -1 dimension is ambiguous
            a, e = a.reshape(a.shape[0], math.prod(a.shape[1:])), e.reshape(e.numel(), 1)
            b = b.reshape(b.shape[0], math.prod(b.shape[1:]))
            rows = a.shape[0]
            mask = masks.get(path)
            if mask is not None:
                if len(mask) != init_r:
                    raise ValueError(f"{folder}: AdaLoRA rank_pattern mask of {path} has {len(mask)} entries; "
                                     f"init_r={init_r} needs one per initial triplet")
                kept = sum(mask)
                if rows == init_r and kept < init_r:  # full-size tensors next to a mask: keep the masked triplets
                    idx = torch.tensor(mask)
                    a, e, b, rows = a[idx], e[idx], b[:, idx], kept
                if rows != kept:
                    raise ValueError(f"{folder}: AdaLoRA layer {path} has {rows} triplets but its rank_pattern "
                                     f"mask keeps {kept}")
            elif rows != init_r:
                raise ValueError(f"{folder}: AdaLoRA layer {path} has {rows} triplets, init_r={init_r}, and no "
                                 f"rank_pattern entry '{path}.lora_E' saying which were kept")
            if (tuple(a.shape) != (rows, layer_ops.in_features) or tuple(b.shape) != (layer_ops.out_features, rows)
                    or e.shape[0] != rows):
                raise ValueError(f"{folder}: AdaLoRA layer {path} is {layer_ops.out_features}x"
                                 f"{layer_ops.in_features} but the adapter has A {tuple(named['A'].shape)}, "
                                 f"E {tuple(named['E'].shape)}, B {tuple(named['B'].shape)}")
            out[path] = {"A": a, "E": e, "B": b}
            final[path] = rows
        alpha = peft_number({"lora_alpha": cfg.get("lora_alpha", 8) or 0}, "lora_alpha", 8, folder, float, 0)
        target_r = peft_number(cfg, "target_r", 8, folder)
        kwargs = dict(r=init_r, alpha=alpha if alpha > 0 else float(init_r),  # PEFT: lora_alpha, or r when it is 0
                      final_ranks=final if masks else None,
                      # a finished adapter no longer uses target_r; keep it valid for lorakit's checks
                      target_r=min(target_r, init_r) if masks else target_r,
                      total_steps=cfg.get("total_step"), t_init=peft_number(cfg, "tinit", 0, folder, int, 0),
                      t_final=peft_number(cfg, "tfinal", 0, folder, int, 0),
                      delta_t=peft_number(cfg, "deltaT", 1, folder),
                      beta1=peft_number(cfg, "beta1", 0.85, folder, float, 0),
                      beta2=peft_number(cfg, "beta2", 0.85, folder, float, 0),
                      orth_reg=peft_number(cfg, "orth_reg_weight", 0.5, folder, float, 0))
        return kwargs, out, {}

    def extra_repr(self) -> str:
        return f"method=adalora, r={self.r}, r_init={self.r_init}, scaling={self.scaling:g}"



def _peft_rank_masks(cfg: dict[str, Any], folder: Path) -> dict[str, list[bool]]:
    """PEFT's AdaLoRA ``rank_pattern`` after rank allocation: ``{"<path>.lora_E": [bool] * init_r}`` ->
    ``{path: mask}``."""
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{folder}: AdaLoRA rank_pattern={pattern!r} must be a JSON object or null")
    masks = {}
    for key, mask in pattern.items():
        if ".lora_E" not in key:
            raise ValueError(f"{folder}: AdaLoRA rank_pattern key {key!r} is not '<module path>.lora_E'")
        if not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask):
            raise ValueError(f"{folder}: AdaLoRA rank_pattern[{key!r}] must be a list of booleans (one per "
                             f"initial triplet); got {mask!r}")
        path = key.split(".lora_E")[0]  # PEFT may leave the adapter name after it: "<path>.lora_E.default"
        masks[path[len(PEFT_MODEL_PREFIX):] if path.startswith(PEFT_MODEL_PREFIX) else path] = mask
    return masks

def rank_report(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Kept rank per layer of AdaLoRA adapter ``name`` (final after ``finish``; the current mask before).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="adalora", r=4, target_r=2, total_steps=10))
        >>> rank_report(net)
        {'0': 4}
    """
    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(reg.configs)}")
    if reg.configs[name].method != "adalora":
        raise ValueError(f"adapter {name!r} is method={reg.configs[name].method!r}; rank_report needs 'adalora'")
    return {path: layer.adapters[name].current_rank() for path, layer in adapted_layers(model)
            if name in layer.adapters}
