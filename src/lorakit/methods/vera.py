"""VeRA — Vector-based Random Matrix Adaptation (Kopiczko et al., ICLR 2024), methods.md §7 and §17.

One pair of frozen random matrices is shared by every layer of an adapter, sized for the largest targeted layer:
``A_sh ∈ R^{r×in_max}``, ``B_sh ∈ R^{out_max×r}``. A layer uses the slices ``A = A_sh[:, :in]``,
``B = B_sh[:out, :]`` and trains two vectors, ``d ∈ R^r`` (``lambda_d``, starts at ``d_initial``) and
``b ∈ R^out`` (``lambda_b``, starts at 0)::

    ΔW = diag(b) · B · diag(d) · A            y = x Wᵀ + b ⊙ (((drop(x) Aᵀ) ⊙ d) Bᵀ)

There is no alpha: ``AdapterConfig.alpha``/``alpha_pattern``/``scaling="rslora"`` are refused, as is
``rank_pattern`` (one shared pair has one rank).

The shared pair is generated exactly as PEFT generates it: a CPU ``torch.Generator`` seeded with the projection key
(``AdapterConfig.seed``; ``None`` means PEFT's default key 0), A drawn first, then B, each Kaiming-uniform with
gain √2 (a=0) over its dim 1. So the same key gives bit-identical matrices in both libraries.
``save_projection=True`` (default) saves the pair once per adapter (key ``<adapter>|shared||vera_A``);
``False`` saves only the vectors and regenerates the pair from the key at load (same torch build/CPU RNG needed).

Each adapter owns its pair, sized for its own targets, so a later adapter with larger layers (or another rank) is
always correct; a pair that does not cover a layer (only reachable by hand-built or tampered state) is refused.

Parameter counts: ``trainable_parameters`` counts ``d`` and ``b`` only (``Σ out + r``); the shared pair is a
buffer, not a parameter. ``parameter_report`` lists it in its "frozen extra" column (``r·(in_max + out_max)``).

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="vera", r=32, targets=["0", "2"]))
    >>> lorakit.trainable_parameters(net)[0]   # (8 + 32) + (4 + 32)
    76
    >>> tuple(lorakit.model.registry(net).shared["default"].vera_A.shape)
    (32, 16)
"""
from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LayerOps
from .base import Adapter
from .peft_lora import peft_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer

#: PEFT's default ``projection_prng_key``, used when ``AdapterConfig.seed`` is None
DEFAULT_KEY = 0


def projection_key(config: "AdapterConfig") -> int:
    """The PRNG key of the shared pair: ``config.seed``, or PEFT's default 0 when it is None."""
    return DEFAULT_KEY if config.seed is None else int(config.seed)


def projection_pair(r: int, in_max: int, out_max: int, key: int = DEFAULT_KEY) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen pair ``(A [r, in_max], B [out_max, r])`` in fp32 on CPU, bit-identical to PEFT for the same key.

    Kaiming-uniform with gain √2 over dim 1 (``bound = √3·√2/√fan``), A drawn before B from one CPU generator.

    Example:
        >>> a, b = projection_pair(4, 10, 6, key=0)
        >>> tuple(a.shape), tuple(b.shape), bool(a.abs().max() <= (6 / 10) ** 0.5)
        ((4, 10), (6, 4), True)
    """
    gen = torch.Generator(device="cpu").manual_seed(int(key))

    def draw(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))  # same float steps as nn.init's kaiming
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    a = draw((r, in_max))
    b = draw((out_max, r))
    return a, b


class VeraProjection(nn.Module):
    """The shared frozen pair of one VeRA adapter (buffers ``vera_A`` and ``vera_B``, PEFT's names).

    The buffers are persistent (saved) when ``save_projection`` is True, else left out of the state dict and
    regenerated from ``key``.
    """

    def __init__(self, r: int, in_max: int, out_max: int, key: int, save_projection: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.r, self.in_max, self.out_max, self.key = r, in_max, out_max, key
        self._last: tuple | None = None  # (input ref, its version, width, grad mode, z) of the last projection
        a, b = projection_pair(r, in_max, out_max, key)
        self.register_buffer("vera_A", a.to(device=device, dtype=dtype), persistent=save_projection)
        self.register_buffer("vera_B", b.to(device=device, dtype=dtype), persistent=save_projection)

    def __getstate__(self):  # copies and pickles never carry the projection cache (weak references)
        state = super().__getstate__()
        state["_last"] = None
        return state

    def project(self, key: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``z = x Aᵀ``, computed once per input: layers fed the same tensor (q/k/v, gate/up) share one z.

        A is the same slice for all of them, so z is too; sharing it saves the GEMM and, in backward, autograd sums
        the r-wide gradients of the siblings before one GEMM back to x. ``key`` is the layer input as received
        (``x`` may be its dtype cast). The hit test is strict: same tensor object, unchanged version, same grad
        mode, width, dtype and device. In grad mode z is held weakly (alive only while the autograd graph keeps it),
        without grad the last z is held until the next projection. z's producer saves nothing for backward, so a
        hit or a miss never changes what autograd saves (activation checkpointing requires the recomputation to
        save exactly what the forward saved).
        """
        if torch.compiler.is_compiling():
            # weak references and version counters cannot be traced; in a compiled graph the identical products of
            # sibling layers are one expression, which the compiler's common-subexpression pass shares instead
            return _VeraDown.apply(x, a)
        if key.is_inference():  # no version counter to prove it unchanged since the last call: no sharing
            return _VeraDown.apply(x, a)
        grad = torch.is_grad_enabled()
        last = self._last
        if last is not None:
            kref, version, n_in, was_grad, zref = last
            z = zref() if was_grad else zref
            if (z is not None and kref() is key and version == key._version and n_in == a.shape[1]
                    and was_grad == grad and z.dtype == x.dtype and z.device == x.device):
                return z
        z = _VeraDown.apply(x, a)
        self._last = (weakref.ref(key), key._version, a.shape[1], grad, weakref.ref(z) if grad else z)
        return z

    def covers(self, r: int, n_in: int, n_out: int) -> str | None:
        """None if a layer of this shape can use the pair, else what is too small."""
        ra, ia = self.vera_A.shape
        ob, rb = self.vera_B.shape
        if ia < n_in or ob < n_out:
            return f"the shared pair covers layers up to {ob}x{ia} (out x in), the layer is {n_out}x{n_in}"
        if ra != r or rb != r:
            return f"the shared pair has rank {ra}, the layer needs r={r}"
        return None

    def extra_repr(self) -> str:
        return f"r={self.r}, in_max={self.in_max}, out_max={self.out_max}, key={self.key}"


class _VeraDown(torch.autograd.Function):
    """``z = x Aᵀ`` for the frozen shared A, saving no tensor for backward.

    A is a buffer, kept on ``ctx`` as a plain reference. With nothing saved, whether a sibling layer reuses this z or
    computes its own never changes the number of saved tensors, which activation checkpointing requires to be
    identical between the forward and its recomputation.
    """

    @staticmethod
    def forward(ctx, x, a):  # noqa: D102 - autograd signature
        ctx.a = a
        return F.linear(x, a)

    @staticmethod
    def backward(ctx, gz):  # noqa: D102
        return (F.linear(gz, ctx.a.t()) if ctx.needs_input_grad[0] else None), None


class _VeraUp(torch.autograd.Function):
    """``y + b ⊙ (z (B diag d)ᵀ)`` for linear-like layers, given ``z = x Aᵀ``, with a lean backward.

    Saves only the activations the gradients need, ``z`` (for d) and ``u = z (B diag d)ᵀ`` (for b), and folds the
    vectors into the small matrices (``B diag d``, ``diag b B``) instead of scaling N-row activations.
    """

    @staticmethod
    def forward(ctx, z, y, bm, d, b):  # noqa: D102 - autograd signature
        u = F.linear(z, bm * d)
        ctx.save_for_backward(z, u, bm, d, b)
        return torch.addcmul(y, u, b)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        z, u, bm, d, b = ctx.saved_tensors
        need_z, need_y, _, need_d, need_b = ctx.needs_input_grad
        gz = gd = gb = None
        if need_b:
            gb = (g * u).reshape(-1, u.shape[-1]).sum(0)
        if need_z or need_d:
            h = F.linear(g, (bm * b[:, None]).t())  # g · diag(b) · B  -> r-wide
            if need_d:
                gd = (h * z).reshape(-1, z.shape[-1]).sum(0)
            if need_z:
                gz = h * d
        return gz, (g if need_y else None), None, gd, gb


class VeraAdapter(Adapter):
    """Per-layer VeRA vectors ``lambda_d`` (r) and ``lambda_b`` (out) over the adapter's shared frozen pair."""

    method = "vera"
    default_r = 256
    allowed_inits = ("kaiming",)

    def __init__(self, ops: LayerOps, config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__(ops, config, path, shared)
        if not isinstance(shared, VeraProjection):
            raise ValueError(f"{path}: a VeRA adapter needs its adapter's shared VeraProjection (got "
                             f"{type(shared).__name__}); attach VeRA with lorakit.attach")
        problem = shared.covers(self.r, self.in_features, self.out_features)
        if problem:
            raise ValueError(f"{path}: VeRA cannot use this shared pair: {problem}. Each VeRA adapter needs a pair "
                             "sized for its largest layer; attach it with lorakit.attach, which builds one")
        self.shared = shared  # registered here too, so .to()/buffers() reach it; export_state skips it
        self.scaling = 1.0  # VeRA has no alpha
        self.d_initial = float(config.d_initial)
        dtype, device = ops.adapter_dtype(), ops.device()
        # d and b have fixed initial values, so the adapter is complete here (load overwrites them)
        self.lambda_d = nn.Parameter(torch.full((self.r,), self.d_initial, dtype=dtype, device=device))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))

    # -- configuration ------------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        super().validate_config(config)
        d0 = config.d_initial
        if isinstance(d0, bool) or not isinstance(d0, (int, float)) or not math.isfinite(d0) or d0 == 0:
            raise ValueError(f"AdapterConfig.d_initial={d0!r} is invalid for method='vera'; allowed: a finite "
                             "non-zero number (0.1 by default; with d = b = 0 neither vector gets a gradient)")
        if not isinstance(config.save_projection, bool):
            raise ValueError(f"AdapterConfig.save_projection={config.save_projection!r} is invalid; allowed: True "
                             "(save the shared random pair) or False (regenerate it from the seed at load)")
        if config.rank_pattern:
            raise ValueError(f"AdapterConfig.rank_pattern={config.rank_pattern!r} is not available for "
                             "method='vera': all layers share one random pair of rank r; use r")
        if config.alpha is not None or config.alpha_pattern or config.scaling != "standard":
            raise ValueError(f"method='vera' has no alpha scaling (ΔW = diag(b) B diag(d) A); got alpha="
                             f"{config.alpha!r}, alpha_pattern={config.alpha_pattern!r}, scaling="
                             f"{config.scaling!r}. Leave them at None/None/'standard' (tune d_initial or the lr)")

    @classmethod
    def make_shared(cls, config: "AdapterConfig", targets: list[tuple[str, LayerOps]], name: str,
                    existing: nn.Module | None = None) -> nn.Module | None:
        in_max = max(ops.in_features for _, ops in targets)
        out_max = max(ops.out_features for _, ops in targets)
        r = config.rank_for(targets[0][0])
        if existing is not None:  # reuse a given pair only if it covers every layer; never slice a wrong one
            problems = [f"{p}: {msg}" for p, ops in targets
                        if isinstance(existing, VeraProjection)
                        and (msg := existing.covers(r, ops.in_features, ops.out_features))]
            if not isinstance(existing, VeraProjection) or problems:
                raise ValueError(f"adapter {name!r}: the existing VeRA pair cannot serve these layers "
                                 f"({'; '.join(problems[:3]) or 'not a VeraProjection'}); give the adapter its own "
                                 "pair")
            return existing
        ops0 = targets[0][1]
        return VeraProjection(r, in_max, out_max, projection_key(config), config.save_projection,
                              dtype=ops0.adapter_dtype(), device=ops0.device())

    # -- forward / weights ----------------------------------------------------------------------------------------
    def _slices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.shared.vera_A[:, : self.in_features]  # views: nothing is copied
        b = self.shared.vera_B[: self.out_features]
        if a.device != device:  # model-parallel layers on another device than the pair
            a, b = a.to(device), b.to(device)
        return a, b

    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d, b = self.lambda_d, self.lambda_b
        xa = self.dropout(x)
        if xa.is_floating_point() and xa.dtype != d.dtype:
            xa = xa.to(d.dtype)
        a, bm = self._slices(xa.device)
        if y.dtype == d.dtype and xa.is_floating_point() and layer.ops.matmul_on_last_dim:
            if self.training and isinstance(self.dropout, nn.Dropout):
                z = _VeraDown.apply(xa, a)  # every layer draws its own dropout mask: nothing to share
            else:
                z = self.shared.project(x, xa, a)
            return _VeraUp.apply(z, y, bm, d, b)
        ops = layer.ops  # embeddings, Conv2d, or a low-precision base output: the plain graph
        u = ops.up(ops.down(xa, a) * ops.per_mid(d), bm) * ops.per_out(b)
        return y + u.to(y.dtype)

    def _scaled_factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, bm = self._slices(self.lambda_d.device)
        d, b = self.lambda_d.detach(), self.lambda_b.detach()
        if dtype is not None:
            a, bm, d, b = a.to(dtype), bm.to(dtype), d.to(dtype), b.to(dtype)
        return d[:, None] * a, b[:, None] * bm

    def delta_weight(self, layer: "AdaptedLayer | None" = None) -> torch.Tensor:
        """``diag(b) B diag(d) A`` as an ``[out, in]`` matrix in fp32 (fp64 for fp64 adapters)."""
        acc = torch.promote_types(self.lambda_d.dtype, torch.float32)
        a, bm = self._scaled_factors(acc)
        return bm @ a

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(diag(d) A, diag(b) B, 1.0)``: an exact rank-r LoRA form for combine/PEFT export."""
        a, bm = self._scaled_factors()
        return a, bm, 1.0

    # -- PEFT's format: VERA, per-layer vectors and (optionally) the shared pair --------------------------------
    peft_type = "VERA"
    peft_keys = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}
    peft_shared_keys = ("vera_A", "vera_B")

    @classmethod
    def reads_peft(cls, peft_type: str, cfg: dict[str, Any]) -> bool:
        return peft_type == "VERA"

    @classmethod
    def to_peft(cls, name: str, config: "AdapterConfig", entries: list, shared: nn.Module | None
                ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        bad = [p for p, layer, _ in entries if layer.ops.kind not in ("linear", "conv1d")]
        if bad:
            raise ValueError(f"VeRA adapter {name!r} adapts {bad[:3]}, which are not Linear/Conv1D layers; PEFT's "
                             f"VeRA adapts only those, so it cannot be written in PEFT's format")
        if shared is None:
            raise ValueError(f"VeRA adapter {name!r} has no shared projections")
        state = shared.state_dict()
        shared_out = {}
        if config.save_projection:
            shared_out = {"vera_A": state["vera_A"].detach().float(), "vera_B": state["vera_B"].detach().float()}
        layers = {path: {"vera_lambda_b": adapter.lambda_b.detach().float(),
                         "vera_lambda_d": adapter.lambda_d.detach().float()} for path, _, adapter in entries}
        cfg = dict(r=config.r, projection_prng_key=int(config.seed or 0), save_projection=bool(config.save_projection),
                   vera_dropout=float(config.dropout), d_initial=float(config.d_initial), init_weights=True)
        return cfg, layers, shared_out

    @classmethod
    def from_peft(cls, cfg: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]],
                  shared: dict[str, torch.Tensor], ops: dict[str, LayerOps], folder: Path
                  ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        out = {path: {"lambda_b": named["lambda_b"], "lambda_d": named["lambda_d"]} for path, named in layers.items()}
        for path, named in layers.items():
            if "lambda_b" not in named or "lambda_d" not in named:
                raise ValueError(f"{folder}: VeRA layer {path} lacks vera_lambda_b or vera_lambda_d")
        kwargs = {"r": peft_number(cfg, "r", 256, folder), "d_initial": peft_number(cfg, "d_initial", 0.1, folder,
                                                                                   float, 0),
                  "seed": peft_number(cfg, "projection_prng_key", 0, folder, int, 0), "save_projection": bool(shared)}
        shared_out = {"vera_A": shared["vera_A"], "vera_B": shared["vera_B"]} if shared else {}
        return kwargs, out, shared_out

    def extra_repr(self) -> str:
        return f"method=vera, r={self.r}, in={self.in_features}, out={self.out_features}, d_initial={self.d_initial:g}"
