"""LoRA (Hu et al. 2021) with its init choices (Init[A]/Init[B], Gaussian, orthogonal, PiSSA) and rsLoRA scaling.

``ΔW = s·B A`` with ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``; forward ``y + s·(drop(x) Aᵀ) Bᵀ``.
PiSSA (init="pissa"/"pissa_fast") puts the top-r singular part of W into A, B (singular values divided by s so
that ``s·BA`` is exactly that part for any alpha) and replaces the base weight by the residual; the initial
factors are kept as buffers so the adapter can be saved, removed (restoring W) or converted to a rank-2r LoRA for
the original weights. LoftQ (init="loftq") swaps the base for the NF4 backbone Q of
:func:`~lorakit.quant.loftq.loftq_decompose` and puts the low-rank rest into A, B (``deq(Q) + s·BA ≈ W``); such an
adapter only loads onto that kind of base (:data:`LOFTQ_BASE`, checked by :func:`check_loftq_base`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import AdapterConfig
from ..quant.linear4bit import COMPUTE_DTYPES, Linear4bit
from ..quant.loftq import loftq_decompose
from .base import Adapter, kaiming_uniform
from .peft_lora import lora_from_peft, lora_peft_init, lora_to_peft

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import AdaptedLayer, LayerOps

PISSA_INITS = ("pissa", "pissa_fast")
#: the 4-bit base every LoftQ adapter is fitted to: lorakit's and PEFT's LoftQ both quantise with NF4, block 64 and
#: no double quantisation; the adapter only means what it was trained to mean on such a base
LOFTQ_BASE = {"bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": False}
# module-wide forward hooks (nn.modules.module.register_module_forward_hook): the fused path must not skip them
_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)


class _FusedLoraLinear(torch.autograd.Function):
    """``x Wᵀ + bias + s·(x Aᵀ) Bᵀ`` for a frozen ``nn.Linear`` as one autograd node.

    Why: the generic path costs an output-sized copy (addmm into the base output), an input-sized add of the two
    input gradients and several small graph nodes per layer. Here the branch is added into the base output in
    place, and the input gradient ``g W + s·(g B) A`` is one GEMM plus an in-place rank-r update. Saved for
    backward: x only if A trains, the r-wide ``x Aᵀ`` only if B trains (as the generic path).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)
        z = x2.mm(a.t())
        y.addmm_(z, b.t(), alpha=scale)
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        ctx.save_for_backward(x2 if need_a else None, weight if need_x else None, a if need_x else None,
                              b if (need_x or need_a) else None, z if need_b else None)
        ctx.scale, ctx.in_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x2, weight, a, b, z = ctx.saved_tensors
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = ga = gb = None
        if need_x or need_a:
            gz = g2.mm(b).mul_(ctx.scale)  # [N, r]: s·g B, shared by the input and A gradients
            if need_x:
                gx = g2.mm(weight).addmm_(gz, a).view(ctx.in_shape)
            if need_a:
                ga = gz.t().mm(x2)
        if need_b:  # (zᵀ g)ᵀ: MKL runs this layout faster than gᵀ z; the copy to B's layout is r·out floats
            gb = z.t().mm(g2).mul_(ctx.scale).t().contiguous()
        return gx, None, None, ga, gb, None


def can_fuse(adapter: Adapter, layer: "AdaptedLayer", x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``layer``'s output may be computed by :func:`fused_low_rank`: a plain frozen ``nn.Linear`` without
    hooks, input and ``params`` in the base weight's dtype, no autocast, and no active dropout on the branch.
    Methods whose branch is ``s·(x A'ᵀ) B'ᵀ`` for some A', B' built from their parameters (LoRA, AdaLoRA's
    ``A·diag(λ)``, SoRA's gated A, LoRA-drop's shared pair) use it."""
    base = layer.base
    if (type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or _GLOBAL_HOOKS[0]
            or _GLOBAL_HOOKS[1] or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
        return False
    dtype = base.weight.dtype
    if x.dtype != dtype or any(p.dtype != dtype for p in params) or torch.is_autocast_enabled(x.device.type):
        return False
    dropout = getattr(adapter, "dropout", None)
    return dropout is None or isinstance(dropout, nn.Identity) or not dropout.training


def fused_low_rank(layer: "AdaptedLayer", x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``base(x) + scale·(x aᵀ) bᵀ`` for a layer that passed :func:`can_fuse`: one autograd node when a gradient
    is wanted, else straight into the base output's buffer."""
    base = layer.base
    if not torch.is_grad_enabled() or not (x.requires_grad or a.requires_grad or b.requires_grad):
        y = F.linear(x, base.weight, base.bias)
        y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]).mm(a.t()), b.t(), alpha=scale)
        return y
    return _FusedLoraLinear.apply(x, base.weight, base.bias, a, b, scale)


class LoraAdapter(Adapter):
    """Plain LoRA. Subclasses reuse its A/B parameters, low-rank path and PiSSA handling."""

    method = "lora"
    allowed_inits = ("kaiming", "gaussian", "init_b", "orthogonal", "pissa", "pissa_fast", "loftq")

    def __init__(self, ops: "LayerOps", config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        dtype, device = ops.adapter_dtype(), ops.device()
        self.A = nn.Parameter(torch.zeros(self.r, self.in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=dtype, device=device))
        self.init = config.init
        if config.init in PISSA_INITS:
            self.shifts_base = True
            self.register_buffer("A0", torch.zeros_like(self.A))
            self.register_buffer("B0", torch.zeros_like(self.B))

    @classmethod
    def check_layer(cls, ops: "LayerOps", config: "AdapterConfig", path: str) -> None:
        r = config.rank_for(path)
        if config.init == "orthogonal" and r % 2:
            raise ValueError(f"init='orthogonal' needs an even rank; {path} has r={r} (use an even r/rank_pattern)")
        if config.init in PISSA_INITS and r > min(ops.in_features, ops.out_features):
            raise ValueError(
                f"init={config.init!r} needs r <= min(in, out); {path} is {ops.out_features}x{ops.in_features} "
                f"with r={r}"
            )
        if config.init == "loftq" and not ops.quantized and ops.kind != "linear":
            raise ValueError(f"init='loftq' quantises the base to NF4 and needs nn.Linear layers; {path} is "
                             f"{ops.kind} (exclude it or use another init)")

    @classmethod
    def check_loaded_layer(cls, ops: "LayerOps", config: "AdapterConfig", path: str) -> None:
        """A LoftQ adapter is fitted to one NF4 base (its ``deq(Q) + s·BA ≈ W``): on a full-precision base or one
        quantised with other settings it computes a different function, so loading refuses with the fix."""
        if config.init == "loftq":
            check_loftq_base(ops, path)

    @classmethod
    def base_requirements(cls, config: "AdapterConfig") -> dict | None:
        if config.init == "loftq":
            return dict(LOFTQ_BASE)
        return None

    # -- init -------------------------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator):
        r, n_in, n_out = self.r, self.in_features, self.out_features
        init = config.init
        a = b = None
        if init in PISSA_INITS:
            return self._init_pissa(layer, config, generator)
        if init == "loftq":
            return self._init_loftq(layer, config)
        if self.layer_kind == "embedding" and init in ("kaiming", "gaussian"):
            a = torch.zeros(r, n_in)  # loralib/PEFT embedding convention: A = 0, B ~ N(0, 1)
            b = torch.randn(n_out, r, generator=generator)
        elif init == "kaiming":
            a = kaiming_uniform((r, n_in), n_in, generator)
            b = torch.zeros(n_out, r)
        elif init == "gaussian":
            a = torch.randn(r, n_in, generator=generator) / r
            b = torch.zeros(n_out, r)
        elif init == "init_b":
            a = torch.zeros(r, n_in)
            b = kaiming_uniform((n_out, r), r, generator)
        elif init == "orthogonal":
            # Two orthogonal halves of an r×r rotation: A uses one, B the other, so BA = 0 with both non-zero.
            q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
            a = (torch.randn(n_in, r // 2, generator=generator) @ q[0::2]).t() / 10.0
            b = torch.randn(n_out, r // 2, generator=generator) @ q[1::2] / 10.0
        self._set(a, b)
        return None

    def _set(self, a: torch.Tensor, b: torch.Tensor) -> None:
        with torch.no_grad():
            self.A.copy_(a.to(self.A.device, self.A.dtype))
            self.B.copy_(b.to(self.B.device, self.B.dtype))

    def _init_pissa(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator):
        w = layer.ops.weight_matrix(torch.float32)
        r, s = self.r, self.scaling
        if config.init == "pissa":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:  # randomised SVD; fork the RNG so a seeded config is reproducible without touching global state
            with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
                u, sv, v = torch.svd_lowrank(w, q=r, niter=config.pissa_niter)
            vh = v.t()
        root = (sv / s).sqrt()
        a, b = root[:, None] * vh, u * root[None, :]
        self._set(a, b)
        with torch.no_grad():
            self.A0.copy_(self.A)
            self.B0.copy_(self.B)
        return w - s * (self.B0.float() @ self.A0.float())

    def _init_loftq(self, layer: "AdaptedLayer", config: "AdapterConfig") -> Linear4bit:
        """``init="loftq"``: sets A, B from :func:`~lorakit.quant.loftq.loftq_decompose` and returns the new 4-bit
        base holding its Q (the plan swaps it in when it commits; the model is untouched until then).

        The base must be a full-precision ``nn.Linear``: LoftQ needs W itself, which a 4-bit base no longer has.
        The new base is an NF4 :class:`~lorakit.quant.Linear4bit` with :data:`LOFTQ_BASE`'s settings, computing in
        the original weight dtype (fp32 stays fp32; bf16/fp16 stay so); ``config.loftq_iter`` alternations.
        """
        ops = layer.ops
        if ops.quantized:
            raise ValueError(f"init='loftq' needs the full-precision weight, but {self.path} is already 4-bit; "
                             "attach LoftQ to the unquantised model (it quantises the layer itself), or use "
                             "init='pissa' (QPiSSA) on a 4-bit base")
        if ops.kind != "linear":
            raise ValueError(f"init='loftq' needs an nn.Linear; {self.path} is {ops.kind}")
        weight = ops.weight_matrix()
        q, a, b = loftq_decompose(weight, self.r, self.scaling, config.loftq_iter, LOFTQ_BASE["blocksize"],
                                  LOFTQ_BASE["double_quant"])
        compute = weight.dtype if weight.dtype in COMPUTE_DTYPES else torch.float32
        base = Linear4bit.from_nf4(q, ops.bias(), compute, weight.dtype, weight.device, layer.base.training)
        self._set(a, b)
        return base

    # -- forward / weights --------------------------------------------------------------------------------------
    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xa = self.dropout(x)
        if xa.is_floating_point() and xa.dtype != self.A.dtype:
            xa = xa.to(self.A.dtype)
        z = layer.ops.down(xa, self.A)
        if self.hotswap_rank:  # prepared for hot-swap: a tensor scaling, so another alpha needs no new graph
            return y + (layer.ops.up(z, self.B) * self.hotswap_scaling).to(y.dtype)
        if z.dtype == y.dtype:
            return layer.ops.up_add(y, z, self.B, self.scaling)
        return y + (layer.ops.up(z, self.B) * self.scaling).to(y.dtype)

    def fused_forward(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor | None:
        """The base layer's output plus this adapter's, in one fused op, or None where that does not apply.

        Applies to a plain frozen ``nn.Linear`` without hooks, same-dtype input and factors, no autocast, no
        active dropout, and a class that keeps LoRA's :meth:`apply` (subclasses changing the math opt out).
        """
        if (self.hotswap_rank or type(self).apply is not LoraAdapter.apply
                or not can_fuse(self, layer, x, (self.A, self.B))):
            return None  # (a hot-swap-ready adapter's scaling is a tensor: the generic path reads it)
        return fused_low_rank(layer, x, self.A, self.B, self.scaling)

    def delta_weight(self, layer: "AdaptedLayer | None" = None) -> torch.Tensor:
        acc = torch.promote_types(self.A.dtype, torch.float32)
        return self.scaling * (self.B.to(acc) @ self.A.to(acc))

    def base_shift(self) -> torch.Tensor | None:
        if not self.shifts_base:
            return None
        return -self.scaling * (self.B0.float() @ self.A0.float())

    def shift_output(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.A0.dtype)
        return -self.scaling * layer.ops.up(layer.ops.down(x, self.A0), self.B0)

    # -- mixing -----------------------------------------------------------------------------------------------
    @classmethod
    def combine(cls, layer: "AdaptedLayer", sources: list[tuple[Adapter, float]], how: str,
                rank: int | None = None) -> "LoraAdapter":
        """The generic mixing rule, used for every method without its own: a plain LoRA adapter for ``layer`` mixing
        ``sources`` (adapter, weight) from their exact low-rank factors (``cat``, ``linear``) or an SVD of the summed
        deltas (``svd``); see :func:`lorakit.combine`.

        Example:
            >>> import torch, lorakit
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> for n in "ab": _ = lorakit.attach(net, lorakit.AdapterConfig(r=2), name=n)
            >>> layer = net[0]
            >>> LoraAdapter.combine(layer, [(layer.adapters["a"], 0.5), (layer.adapters["b"], 0.5)], "cat").r
            4
        """
        path = sources[0][0].path
        if how == "svd":
            delta = sum(w * a.delta_weight(layer) for a, w in sources)
            k = min(rank or max(a.r for a, _ in sources), *delta.shape)
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            return LoraAdapter.from_factors(layer.ops, path, vh[:k], u[:, :k] * sv[:k], 1.0)
        factors = [(a.as_lora_factors(), w) for a, w in sources]
        if how == "cat":
            a = torch.cat([f[0].float() * (w * f[2]) for f, w in factors], dim=0)
            b = torch.cat([f[1].float() for f, _ in factors], dim=1)
            return LoraAdapter.from_factors(layer.ops, path, a, b, 1.0)
        ranks = {f[0].shape[0] for f, _ in factors}
        if len(ranks) != 1:
            raise ValueError(f"combine(how='linear') needs equal ranks; got {sorted(ranks)} (use 'cat' or 'svd')")
        a = sum(math.copysign(math.sqrt(abs(w * f[2])), w * f[2]) * f[0].float() for f, w in factors)
        b = sum(math.sqrt(abs(w * f[2])) * f[1].float() for f, w in factors)
        return LoraAdapter.from_factors(layer.ops, path, a, b, 1.0)

    @classmethod
    def from_factors(cls, ops: "LayerOps", path: str, a: torch.Tensor, b: torch.Tensor,
                     scaling: float) -> "LoraAdapter":
        """A plain LoRA adapter holding given factors (``ΔW = scaling·B A``)."""
        r = a.shape[0]
        adapter = cls(ops, AdapterConfig(method="lora", r=r, alpha=float(scaling * r)), path)
        adapter._set(a, b)
        return adapter

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` of a plain LoRA with the same effect on the *original* base weight.

        For PiSSA this is the rank-2r conversion ``s·[B | -B0]·[A ; A0]`` (methods.md §12).
        """
        if not self.shifts_base:  # (the first r rows/columns: a hot-swap-ready adapter is padded with zeros)
            return self.A.detach()[: self.r], self.B.detach()[:, : self.r], self.scaling
        a = torch.cat([self.A.detach(), self.A0], dim=0)
        b = torch.cat([self.B.detach(), -self.B0], dim=1)
        return a, b, self.scaling

    def export_state(self) -> dict[str, torch.Tensor]:
        state = super().export_state()
        if self.hotswap_rank:  # saved at its own rank, not the hot-swap padding
            state["A"], state["B"] = state["A"][: self.r], state["B"][:, : self.r]
        return state

    # -- hot-swap ---------------------------------------------------------------------------------------------
    @classmethod
    def hotswap_refusal(cls, config: "AdapterConfig") -> str | None:
        """None for plain LoRA (every init whose adapter is just ``A``, ``B`` and ``s``: kaiming, gaussian, init_b,
        orthogonal, loftq; standard or rsLoRA scaling). Refused: PiSSA (it moved the base weights) and subclasses
        with their own forward, training hooks or base shifts (DoRA, Delta-LoRA) unless they say otherwise
        (LoRA-FA does)."""
        if cls.apply is not LoraAdapter.apply or cls.needs_hooks or cls.shifts_base:
            return super().hotswap_refusal(config)
        if config.init in PISSA_INITS:
            return (f"init={config.init!r} moved the base weights to its residual, which another adapter would not "
                    f"share; save PiSSA adapters with lorakit.save(..., convert_pissa=True) (plain LoRA of rank 2r) "
                    f"and attach or load that form instead")
        return None

    def prepare_hotswap(self, max_rank: int) -> None:
        pad = max_rank - self.A.shape[0]
        if pad > 0:  # zero rows of A and columns of B add nothing to s·B A
            with torch.no_grad():
                a = torch.cat([self.A, self.A.new_zeros((pad, *self.A.shape[1:]))], dim=0)
                b = torch.cat([self.B, self.B.new_zeros((self.B.shape[0], pad))], dim=1)
            self.A = nn.Parameter(a, requires_grad=self.A.requires_grad)
            self.B = nn.Parameter(b, requires_grad=self.B.requires_grad)
        if not self.hotswap_rank:
            dtype = torch.promote_types(self.A.dtype, torch.float32)
            self.register_buffer("hotswap_scaling", torch.tensor(self.scaling, dtype=dtype, device=self.A.device),
                                 persistent=False)
        self.hotswap_rank = self.A.shape[0]

    def hotswap_check(self, new: Adapter) -> None:
        if new.A.shape[0] > self.hotswap_rank:
            raise ValueError(f"{self.path}: the new adapter has rank {new.A.shape[0]}, above the max_rank "
                             f"{self.hotswap_rank} this model was prepared for; call lorakit.prepare_hotswap(model, "
                             f"max_rank={new.A.shape[0]}) (before torch.compile) and hot-swap again")

    def hotswap_from(self, new: Adapter) -> None:
        r = new.A.shape[0]
        with torch.no_grad():
            self.A[:r].copy_(new.A)
            self.A[r:].zero_()
            self.B[:, :r].copy_(new.B)
            self.B[:, r:].zero_()
            self.hotswap_scaling.fill_(new.scaling)
        self.r, self.scaling, self.init = r, new.scaling, new.init

    # -- PEFT's format ------------------------------------------------------------------------------------------
    #: written with the config's own rank and scaling rule (rsLoRA stays rsLoRA); a subclass whose factors come
    #: from :meth:`as_lora_factors` instead sets False
    peft_native: ClassVar[bool] = True

    @classmethod
    def to_peft(cls, name: str, config: "AdapterConfig", entries: list, shared: nn.Module | None
                ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        # PiSSA's base shift is part of its factors (the rank-2r conversion of as_lora_factors)
        native = cls.peft_native and not any(a.shifts_base for _, _, a in entries)
        cfg, layers = lora_to_peft(name, cls.method, config, entries, native)
        return cfg, layers, {}

    @classmethod
    def as_plain_lora(cls, config: "AdapterConfig", entries: list
                      ) -> tuple["AdapterConfig", dict[str, dict[str, torch.Tensor]]] | None:
        """A PiSSA adapter as the plain LoRA of rank 2r ``s·[B | -B0]·[A ; A0]`` on the original weights, usable by
        any LoRA loader (methods.md §12); None for every other init (already plain LoRA)."""
        if config.init not in PISSA_INITS:
            return None
        layers, ranks, alphas = {}, {}, {}
        for path, _, adapter in entries:
            a, b, s = adapter.as_lora_factors()
            layers[path] = {"A": a, "B": b}
            ranks[path], alphas[path] = a.shape[0], s * a.shape[0]
        plain = config.replace(init="kaiming", scaling="standard", r=max(ranks.values()), alpha=None,
                               rank_pattern=ranks, alpha_pattern=alphas)
        return plain, layers

    @classmethod
    def reads_peft(cls, peft_type: str, cfg: dict[str, Any]) -> bool:
        # PEFT's plain LORA comes back as plain LoRA (not as a subclass written as LORA, like LoRA-FA)
        return cls is LoraAdapter and peft_type == "LORA" and not cfg.get("use_dora")

    @classmethod
    def peft_init(cls, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
        return lora_peft_init(cfg, folder)  # PiSSA & co. refused; LoftQ read as init="loftq"

    @classmethod
    def check_peft_layer(cls, ops: "LayerOps", init: dict[str, Any], path: str) -> None:
        if init.get("init") == "loftq":
            check_loftq_base(ops, path, source="peft")

    @classmethod
    def from_peft(cls, cfg: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]],
                  shared: dict[str, torch.Tensor], ops: dict[str, "LayerOps"], folder: Path
                  ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        kwargs, out = lora_from_peft(cfg, layers, ops, folder)
        return kwargs, out, {}


def check_loftq_base(ops: "LayerOps", path: str, source: str = "lorakit") -> None:
    """Raise ``ValueError`` unless ``ops`` (a layer's base) is the 4-bit NF4 base a LoftQ adapter needs
    (:data:`LOFTQ_BASE`); the message names the layer, what it is, and the fix. The loaders report it as
    :class:`~lorakit.io.AdapterLoadError`.

    ``source="peft"`` words the fix for PEFT LoftQ folders, whose flow loads the LoftQ-modified base in 4-bit.

    Example:
        >>> from lorakit.layers import ops_for
        >>> try:
        ...     check_loftq_base(ops_for(nn.Linear(8, 8)), "q_proj")
        ... except ValueError as err:
        ...     print(str(err)[:40])
        q_proj is full precision (not quantised)
    """
    if ops.quantized:
        have = {"bits": 4, "quant_type": "nf4", "blocksize": ops.base.blocksize, "double_quant": ops.base.double_quant}
        wrong = {k: have[k] for k in LOFTQ_BASE if have[k] != LOFTQ_BASE[k]}
        if not wrong:
            return
        what = "is 4-bit with " + ", ".join(f"{k}={v!r}" for k, v in wrong.items())
    else:
        what = "is full precision (not quantised)"
    fix = ("quantise the adapted layers first: lorakit.quant.quantize_for_adapter(model, folder) does exactly that "
           "(or lorakit.quantize(model, double_quant=False, blocksize=64, compute_dtype=<the base's dtype>) for every "
           "linear layer), then load; with loftq_iter > 1 the exact LoftQ backbone differs from a fresh "
           "quantisation: keep and load it with lorakit.quant.save_quantized/load_quantized")
    if source == "peft":
        fix = ("PEFT's LoftQ flow loads the (LoftQ-modified) base in 4-bit NF4 (bitsandbytes nf4, no double "
               "quantisation); in lorakit " + fix)
    raise ValueError(
        f"{path} {what}, but this LoftQ adapter was fitted to a 4-bit NF4 base (block 64, no double "
        f"quantisation) and would compute a different function on it. Fix: {fix}")


def loftq_attach(adapter: LoraAdapter, layer: "AdaptedLayer", config: "AdapterConfig") -> Linear4bit:
    """``init="loftq"`` for a LoRA-shaped adapter: sets its ``A``, ``B`` and returns the new 4-bit base holding Q.

    The LoRA strategy's LoftQ init (:meth:`LoraAdapter.init_weights` runs it while :func:`lorakit.attach` builds its
    plan); kept under this name for ``lorakit.quant.loftq_attach``.

    Example:
        >>> import lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=4, alpha=8, init="loftq", loftq_iter=2))
        >>> type(net[0].base).__name__
        'Linear4bit'
    """
    return adapter._init_loftq(layer, config)
