"""LoRA-FA — LoRA with a frozen random A (Zhang et al., 2023, arXiv 2308.03303), methods.md §5 and §17.

``ΔW = s·B A`` exactly as LoRA, but A keeps its random initial value (Kaiming-uniform, or ``init="gaussian"``) and
only B trains, starting at 0. Inits that start A at zero (``init="init_b"``) or B away from zero (PiSSA, LoftQ,
orthogonal) are refused: with A frozen they would give an adapter that cannot learn or is not LoRA-FA.
On embeddings LoRA puts the randomness in B; LoRA-FA needs it in A, so there ``A ~ N(0, 1)`` and ``B = 0``.

**Memory.** B's gradient ``s·gᵀz`` needs only the r-wide ``z = drop(x) Aᵀ``; with A frozen nothing needs the layer
input x. The forward is therefore written so autograd keeps only z (and references to the weights):

* without dropout (or in eval) the ordinary graph already does this — PyTorch saves an operand only when the other
  one needs a gradient, and A does not;
* with dropout, ``nn.Dropout`` would keep an input-sized mask, so a small autograd function regenerates the mask in
  backward from a stored seed instead (Linear/Conv1D/4-bit layers; Conv2d falls back to ``nn.Dropout``).

The gradient into x through the adapter, ``s·(g B) A``, is still propagated (it needs B and A, not x), so earlier
layers get exactly the gradient LoRA with a frozen A gives.

**Saving.** ``A_seed`` (one int64 buffer) regenerates A. ``AdapterConfig.save_projection=True`` (default) saves A
as well; ``False`` saves only B and the seed (half the file) and regenerates A at load on the CPU generator.

**Optimiser.** Plain AdamW on B is the default (§17). :class:`LoraFAOptimizer` is PEFT's projected-gradient update
(the later LoRA-FA method): B's gradient is replaced by ``(1/s²)·g_B·(A Aᵀ + δI)⁺`` before an AdamW step.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="lora_fa", r=4, targets=["0"]))
    >>> lorakit.trainable_parameters(net)[0]   # B only: 16 x 4
    64
    >>> opt = LoraFAOptimizer(net, lr=1e-3)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LayerOps
from ..registry import adapted_layers
from .base import Adapter, kaiming_uniform
from .lora import LoraAdapter

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer


def frozen_a(r: int, n_in: int, seed: int, init: str = "kaiming", kind: str = "linear") -> torch.Tensor:
    """LoRA-FA's frozen A ``[r, in]`` in fp32 on CPU, a pure function of ``seed`` (so it can be regenerated).

    Example:
        >>> torch.equal(frozen_a(2, 5, seed=7), frozen_a(2, 5, seed=7))
        True
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "embedding":  # one-hot inputs: A's columns are the random r-dim codes of the tokens
        return torch.randn(r, n_in, generator=gen)
    if init == "gaussian":
        return torch.randn(r, n_in, generator=gen) / r
    return kaiming_uniform((r, n_in), n_in, gen)


class _DropoutDown(torch.autograd.Function):
    """``z = (x ⊙ m / (1-p)) Aᵀ`` keeping no input-sized tensor: the mask m is redrawn from ``seed`` in backward."""

    @staticmethod
    def forward(ctx, x, a, p, seed):  # noqa: D102 - autograd signature
        mask = _mask(x, p, seed)
        ctx.p, ctx.seed, ctx.shape, ctx.dtype, ctx.device = p, seed, x.shape, x.dtype, x.device
        ctx.save_for_backward(a)
        return F.linear(x * mask, a)

    @staticmethod
    def backward(ctx, gz):  # noqa: D102
        (a,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            ref = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)
            gx = F.linear(gz, a.t()).to(ctx.dtype) * _mask(ref, ctx.p, ctx.seed)
        return gx, None, None, None


def _mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted-dropout mask (0 or 1/(1-p)) shaped like ``like``, a pure function of ``seed``."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    keep = torch.empty(like.shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p, generator=gen)
    return keep.mul_(1.0 / (1.0 - p))


class LoraFAAdapter(LoraAdapter):
    """LoRA with A frozen at a seeded random value and B (zero at start) trained."""

    method = "lora_fa"
    allowed_inits = ("kaiming", "gaussian")
    frozen_params = ("A",)
    peft_native = False  # written to PEFT from as_lora_factors (per-layer rank and standard alpha)

    def __init__(self, ops: LayerOps, config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        self.A.requires_grad_(False)
        self.register_buffer("A_seed", torch.zeros((), dtype=torch.int64, device=ops.device()))
        self.save_A = bool(config.save_projection)

    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        if config.init == "init_b":
            raise ValueError("AdapterConfig.init='init_b' is incompatible with method='lora_fa': it starts A at zero, "
                             "and LoRA-FA freezes A, so the adapter could never change. Use init='kaiming' "
                             "(default) or 'gaussian'")
        super().validate_config(config)
        if not isinstance(config.save_projection, bool):
            raise ValueError(f"AdapterConfig.save_projection={config.save_projection!r} is invalid; allowed: True "
                             "(save LoRA-FA's frozen A) or False (save its seed and regenerate A at load)")

    @classmethod
    def check_layer(cls, ops: LayerOps, config: "AdapterConfig", path: str) -> None:
        return None  # none of LoRA's init-specific layer limits apply to the allowed inits

    # -- init / save ----------------------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        self._set_seed(seed)
        with torch.no_grad():
            self.B.zero_()
        return None

    def _set_seed(self, seed: int) -> None:
        a = frozen_a(self.r, self.in_features, seed, self.init, self.layer_kind)
        with torch.no_grad():
            self.A_seed.fill_(seed)
            self.A.copy_(a.to(self.A.device, self.A.dtype))

    def export_state(self) -> dict[str, torch.Tensor]:
        state = super().export_state()
        if not self.save_A:
            state.pop("A")
        return state

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if "A" not in state:  # saved without A: regenerate it from its seed
            seed = int(state["A_seed"])
            state["A"] = frozen_a(self.r, self.in_features, seed, self.init, self.layer_kind)
        super().import_state(state)

    # -- forward ----------------------------------------------------------------------------------------------------
    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        if (p == 0.0 or not self.training or not torch.is_grad_enabled() or self.A.requires_grad
                or not x.is_floating_point() or not layer.ops.matmul_on_last_dim):
            return super().apply(layer, x, y)  # A frozen: autograd keeps z, not x (see module docstring)
        xa = x.to(self.A.dtype) if x.dtype != self.A.dtype else x
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG, so torch.manual_seed reproduces it
        z = _DropoutDown.apply(xa, self.A, p, seed)
        if self.hotswap_rank:  # prepared for hot-swap: the scaling is a tensor (see LoraAdapter.apply)
            return y + (layer.ops.up(z, self.B) * self.hotswap_scaling).to(y.dtype)
        if z.dtype == y.dtype:
            return layer.ops.up_add(y, z, self.B, self.scaling)
        return y + (layer.ops.up(z, self.B) * self.scaling).to(y.dtype)

    # -- hot-swap: LoRA's padding and tensor scaling, plus the frozen A's seed ---------------------------------------
    @classmethod
    def hotswap_refusal(cls, config: "AdapterConfig") -> str | None:
        """None: a LoRA-FA adapter is ``A`` (frozen, or its seed), ``B`` and ``s``; LoRA's padding applies."""
        return None

    def hotswap_from(self, new: Adapter) -> None:
        super().hotswap_from(new)
        with torch.no_grad():
            self.A_seed.copy_(new.A_seed)
        self.save_A = new.save_A

    def extra_repr(self) -> str:
        return f"method=lora_fa, r={self.r}, scaling={self.scaling:g}, A frozen (seed {int(self.A_seed)})"


# ---------------------------------------------------------------------------------------------------------------
# PEFT's projected-gradient optimiser
# ---------------------------------------------------------------------------------------------------------------
class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW whose LoRA-FA ``B`` steps use PEFT's projected gradient (methods.md §5).

    For every LoRA-FA adapter in ``model`` with a trainable B (scaling s, frozen A), B's gradient is replaced by::

        g̃_B = (1/s²) · g_B · (A Aᵀ + δ I)⁺

    (computed in fp32; PEFT uses bf16 autocast where available), then a bias-corrected Adam step is taken:
    ``m ← β₁m + (1-β₁)g̃``, ``v ← β₂v + (1-β₂)g̃²``, ``p ← p − lr·√(1-β₂ᵗ)/(1-β₁ᵗ) · m/(√v + eps)``, followed by
    decoupled weight decay ``p ← p − lr·wd·p``. Every other trainable parameter gets the same AdamW step on its raw
    gradient. A is paired with B through the adapter itself, not by parameter order or name.
    ``(A Aᵀ + δI)⁺`` is computed once per layer and reused while A is unchanged.

    Args:
        model: a model with at least one LoRA-FA adapter; all its trainable parameters are optimised.
        lr, betas, eps, weight_decay, correct_bias: as PEFT's ``LoraFAOptimizer`` (eps 1e-6 by default).
        delta: the ridge ``δ`` added before the pseudo-inverse.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="lora_fa", r=2, alpha=4))
        >>> opt = LoraFAOptimizer(net, lr=1e-2)
        >>> net(torch.randn(3, 8)).pow(2).sum().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, delta: float = 1e-8):

        checks: list[tuple[str, object, Callable[[object], bool], str]] = [
            ("lr", lr, lambda v: v >= 0, "a number >= 0"),
            ("eps", eps, lambda v: v >= 0, "a number >= 0"),
            ("weight_decay", weight_decay, lambda v: v >= 0, "a number >= 0"),
            ("delta", delta, lambda v: v >= 0, "a number >= 0"),
        ]
        for field, value, ok, allowed in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"LoraFAOptimizer {field}={value!r} is invalid; allowed: {allowed}")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"LoraFAOptimizer betas={betas!r} is invalid; allowed: two numbers in [0, 1)")
        params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        self._pairs: dict[int, tuple[torch.Tensor, float]] = {}
        for _, layer in adapted_layers(model):
            for adapter in layer.adapters.values():
                if isinstance(adapter, LoraFAAdapter) and adapter.B.requires_grad:
                    self._pairs[id(adapter.B)] = (adapter.A, float(adapter.scaling))
        if not self._pairs:
            raise ValueError("LoraFAOptimizer needs a model with a trainable LoRA-FA adapter "
                             "(AdapterConfig(method='lora_fa')); for other methods use torch.optim.AdamW")
        self._pinv: dict[int, tuple[int, torch.Tensor]] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        delta=delta)
        super().__init__(params, defaults)

    def projected_grad(self, b: torch.Tensor, grad: torch.Tensor, delta: float) -> torch.Tensor:
        """``(1/s²) · grad · (A Aᵀ + δI)⁺`` for LoRA-FA's ``b`` (its adapter's A and s)."""
        a, s = self._pairs[id(b)]
        cached = self._pinv.get(id(b))
        if cached is None or cached[0] != a._version:  # A is frozen: one pseudo-inverse per layer
            a32 = a.detach().to(torch.promote_types(a.dtype, torch.float32))
            eye = torch.eye(a32.shape[0], dtype=a32.dtype, device=a32.device)
            cached = (a._version, torch.linalg.pinv(a32 @ a32.t() + delta * eye))
            self._pinv[id(b)] = cached
        pinv = cached[1]
        return ((grad.to(pinv.dtype) @ pinv) / (s * s)).to(grad.dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """One update of every parameter with a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if id(p) in self._pairs:
                    grad = self.projected_grad(p, grad, group["delta"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = lr
                if group["correct_bias"]:
                    t = state["step"]
                    step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
                if wd > 0.0:
                    p.add_(p, alpha=-lr * wd)
        return loss


def lora_fa_optimizer(model: nn.Module, lr: float = 1e-3, **kwargs) -> LoraFAOptimizer:
    """Shorthand for :class:`LoraFAOptimizer` ``(model, lr, **kwargs)``.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="lora_fa", r=2))
        >>> type(lora_fa_optimizer(net, lr=1e-3)).__name__
        'LoraFAOptimizer'
    """
    return LoraFAOptimizer(model, lr=lr, **kwargs)


__all__: Iterable[str] = ["LoraFAAdapter", "LoraFAOptimizer", "frozen_a", "lora_fa_optimizer"]
