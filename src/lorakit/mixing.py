"""Task-vector mixing: task arithmetic, TIES, DARE and magnitude pruning on each adapter's exact weight change.

The task vector of adapter ``t`` on a layer is its exact dense change to the *original* base weight,
``ΔWₜ = delta_weight(layer) + base_shift()`` (the shift is PiSSA's residual or Delta-LoRA's moved base; None for the
others). Every family member provides both, so the rules below are right for all of them: DoRA's magnitudes, rsLoRA,
per-layer rank/alpha, VeRA, AdaLoRA's pruned ranks, LoRA-drop's shared pairs, and adapters of different ranks and
methods mixed together. Weights come first, ``τₜ = wₜ·ΔWₜ`` (a negative weight subtracts a task), then per
layer:

* ``task_arithmetic``: ``Σ τₜ``.
* ``magnitude_prune``: keep the ``density`` fraction of entries of each ``τₜ`` with the largest ``|value|`` (per
  layer matrix, ``round(density·numel)`` entries, as PEFT and the TIES paper trim per tensor), then sum.
* ``ties``: trim each ``τₜ`` as above; elect a sign per entry (``majority_sign="total"``: sign of ``Σ τ̂ₜ``,
  ``"frequency"``: sign of ``Σ sign(τ̂ₜ)``, ties going to +); average the non-zero ``τ̂ₜ`` that agree with it
  (entries where none agree: 0).
* ``dare_linear``: drop each entry of ``ΔWₜ`` with probability ``1 − density``, rescale the kept ones by
  ``1/density``, then ``Σ wₜ·``. The masks come from ``seed``, the adapter's name and the layer path, so the same
  seed gives the same mix on any device and in any order of the weights.
* ``dare_ties``: DARE's drop-and-rescale of each ``τₜ``, then TIES's sign election and disjoint mean.

The mixed change becomes a plain LoRA through :func:`lorakit.lowrank.factorize` (the one SVD rule): exactly by
default (its numerical rank, which pruning usually makes high), or the best rank-``rank`` / energy-``energy``
approximation, with each layer's rank and relative error in a :class:`MixReport` (``lorakit.mix_report``).

Where PEFT differs (``add_weighted_adapter``): its non-SVD ``ties``/``dare_*``/``magnitude_prune`` act on the A and B
factors separately, and pruning or sign-electing factors is not pruning or sign-electing the weight change ``B A``
(the product of trimmed factors is neither sparse nor sign-consistent, and rsLoRA/DoRA/per-layer alpha live outside
the factors). Its ``*_svd`` variants work on the dense change, as here, but elect TIES/DARE-TIES signs on the
*unweighted* trimmed tensors and apply the weights afterwards; here the weights are part of the task vectors (so a
negative weight really subtracts a task in the election too). With equal positive weights, or
``majority_sign="frequency"`` and positive weights, both give the same mix. PEFT draws DARE masks from the global RNG
(``torch.bernoulli``); here they come from ``seed``. Magnitude trimming here keeps ``round(density·numel)`` entries,
PEFT ``int(density·numel)``.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(6, 6))
    >>> for n in "ab": _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, init="gaussian"), name=n)
    >>> _ = lorakit.combine(net, {"a": 1.0, "b": 1.0}, name="mix", how="ties", density=0.5)
    >>> lorakit.mix_report(net, "mix").exact
    True
"""
from __future__ import annotations

import math
import numbers
import weakref
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .lowrank import LayerFit, check_rank_energy, factorize
from .methods import GENERIC_MIXING_METHOD, get_method
from .registry import adapted_layers

if TYPE_CHECKING:  # pragma: no cover
    from .layers import AdaptedLayer
    from .methods.base import Adapter

__all__ = ["TASK_VECTOR_RULES", "LayerFit", "MixReport", "task_vector", "magnitude_trim", "dare_drop", "elect_sign",
           "disjoint_mean", "mix_task_vectors", "dare_generator", "check_mix_options", "mix_layer", "mix_report",
           "record_report"]

#: the ``how`` values of :func:`lorakit.combine` that act on task vectors (this module)
TASK_VECTOR_RULES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_USES_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_USES_SEED = ("dare_linear", "dare_ties")
_USES_SIGN = ("ties", "dare_ties")
MAJORITY_SIGNS = ("total", "frequency")


@dataclass
class MixReport:
    """What :func:`lorakit.combine` did with a task-vector rule: the settings (``seed`` is the one used, drawn when
    none was given) and, per layer path, a :class:`LayerFit`."""

    name: str
    how: str
    weights: dict[str, float]
    density: float | None = None
    majority_sign: str | None = None
    seed: int | None = None
    rank: int | None = None
    energy: float | None = None
    layers: dict[str, LayerFit] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True if every layer holds the mixed change exactly."""
        return all(f.exact for f in self.layers.values())

    @property
    def max_rel_error(self) -> float:
        return max((f.rel_error for f in self.layers.values()), default=0.0)

    def to_dict(self) -> dict:
        """Plain JSON-able form (the CLI writes it as ``mix_report.json``)."""
        return {"name": self.name, "how": self.how, "weights": dict(self.weights), "density": self.density,
                "majority_sign": self.majority_sign, "seed": self.seed, "rank": self.rank, "energy": self.energy,
                "exact": self.exact, "max_rel_error": self.max_rel_error,
                "layers": {p: {"rank": f.rank, "exact_rank": f.exact_rank, "rel_error": f.rel_error}
                           for p, f in self.layers.items()}}

    def summary(self) -> str:
        """One line: rule, layers, ranks and the worst relative error."""
        ranks = [f.rank for f in self.layers.values()]
        fit = "exact" if self.exact else f"approximate (max relative error {self.max_rel_error:.3g})"
        span = f"{min(ranks)}..{max(ranks)}" if ranks and min(ranks) != max(ranks) else str(ranks[0] if ranks else 0)
        return f"{self.name}: how={self.how}, {len(self.layers)} layer(s), rank {span}, {fit}"


# ---------------------------------------------------------------------------------------------------------------
# the rules on dense tensors
# ---------------------------------------------------------------------------------------------------------------
def task_vector(adapter: "Adapter", layer: "AdaptedLayer") -> torch.Tensor:
    """The adapter's exact fp32 ``[out, in]`` change to the original base weight: its forward's change plus what it
    added to the stored base (PiSSA, Delta-LoRA)."""
    delta = adapter.delta_weight(layer).float()
    shift = adapter.base_shift()
    return delta if shift is None else delta + shift.to(device=delta.device, dtype=delta.dtype)


def magnitude_trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``round(density·numel)`` largest-|value| entries set to 0.

    Example:
        >>> magnitude_trim(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), 0.5)
        tensor([[ 0., -3.],
                [ 0.,  2.]])
    """
    n = tensor.numel()
    k = int(round(density * n))
    if k >= n:
        return tensor.clone()
    flat = tensor.reshape(-1)
    if k == 0:
        return torch.zeros_like(tensor)
    size = flat.abs()
    # the k-th largest |value| by selection (linear time; topk with k ~ n/2 sorts), then exactly k entries: all
    # above it and, among those equal to it, the first by position
    threshold = torch.kthvalue(size.cpu(), n - k + 1).values.to(size.device)
    keep = size > threshold
    ties = (size == threshold).nonzero().squeeze(1)
    keep[ties[:k - int(keep.sum())]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tensor.shape)


def dare_generator(seed: int, adapter_name: str, path: str) -> torch.Generator:
    """The CPU generator of DARE's mask for one adapter on one layer: from ``seed``, the name and the path only."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + zlib.crc32(f"{adapter_name}|{path}".encode())) % 2**62)
    return gen


def dare_keep_mask(shape: Sequence[int], density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(``density``) keep-mask (True = kept), drawn on the CPU so a seed means one mask on every device."""
    return torch.rand(tuple(shape), generator=generator) < density


def dare_drop(tensor: torch.Tensor, density: float, keep: torch.Tensor) -> torch.Tensor:
    """DARE: the entries where ``keep`` is False set to 0, the kept ones divided by ``density``."""
    keep = keep.to(tensor.device)
    return torch.where(keep, tensor / density, torch.zeros_like(tensor))


def elect_sign(stack: torch.Tensor, majority_sign: str = "total") -> torch.Tensor:
    """Per entry of ``stack`` ``[tasks, ...]``: +1/−1, the sign of the sum (``total``) or of the sum of signs
    (``frequency``); a tie elects +1."""
    score = stack.sum(0) if majority_sign == "total" else stack.sign().sum(0)
    return torch.where(score >= 0, torch.ones_like(score), -torch.ones_like(score))


def disjoint_mean(stack: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the entries whose sign equals ``sign`` (zeros never agree); 0 where none does."""
    agree = stack.sign() == sign
    count = agree.sum(0).clamp(min=1).to(stack.dtype)
    return torch.where(agree, stack, torch.zeros_like(stack)).sum(0) / count


def mix_task_vectors(deltas: Sequence[torch.Tensor], weights: Sequence[float], how: str,
                     density: float | None = None, majority_sign: str = "total",
                     keep_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """One layer's mix of the task vectors ``deltas`` (each ``ΔWₜ``) with ``weights``; see the module docstring.
    ``keep_masks``: DARE's masks, one per task (see :func:`dare_keep_mask`).

    Example:
        >>> d = [torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])]
        >>> mix_task_vectors(d, [1.0, 1.0], "ties", density=1.0)
        tensor([[ 2., -2.]])
    """
    taus = [float(w) * d.float() for d, w in zip(deltas, weights)]
    if how == "task_arithmetic":
        return torch.stack(taus).sum(0)
    if how in ("magnitude_prune", "ties"):
        taus = [magnitude_trim(t, density) for t in taus]
    elif how in ("dare_linear", "dare_ties"):
        taus = [dare_drop(t, density, m) for t, m in zip(taus, keep_masks)]
    else:
        raise ValueError(f"unknown task-vector rule {how!r}; allowed: {', '.join(TASK_VECTOR_RULES)}")
    stack = torch.stack(taus)
    if how in _USES_SIGN:
        return disjoint_mean(stack, elect_sign(stack, majority_sign))
    return stack.sum(0)


# ---------------------------------------------------------------------------------------------------------------
# checks and one layer
# ---------------------------------------------------------------------------------------------------------------
def check_mix_options(how: str, density: float | None, majority_sign: str, seed: int | None, rank: int | None,
                      energy: float | None) -> None:
    """Raise ValueError (one line, naming the fix) for options that do not fit rule ``how``."""
    if how in _USES_DENSITY:
        if density is None:
            raise ValueError(f"combine(how={how!r}) needs density: the fraction of each task vector kept, "
                             "0 < density <= 1 (e.g. density=0.5)")
        if (isinstance(density, bool) or not isinstance(density, numbers.Real) or not math.isfinite(density)
                or not 0 < density <= 1):
            raise ValueError(f"combine(density={density!r}) is invalid; use a number with 0 < density <= 1 "
                             "(the fraction of each task vector kept)")
    elif density is not None:
        raise ValueError(f"combine(density=...) only applies to how in {_USES_DENSITY}; how={how!r} keeps every "
                         "entry (drop density)")
    if majority_sign not in MAJORITY_SIGNS:
        raise ValueError(f"combine(majority_sign={majority_sign!r}) is invalid; allowed: 'total' (sign of the sum) "
                         "or 'frequency' (sign of the sum of signs)")
    if seed is not None:
        if how not in _USES_SEED:
            raise ValueError(f"combine(seed=...) only applies to how in {_USES_SEED} (DARE's random drop); "
                             f"how={how!r} is deterministic (drop seed)")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"combine(seed={seed!r}) is invalid; use an integer >= 0")
    check_rank_energy(rank, energy, "combine")


def mix_layer(layer: "AdaptedLayer", path: str, sources: Sequence[tuple[str, "Adapter", float]], how: str,
              density: float | None, majority_sign: str, seed: int | None, rank: int | None,
              energy: float | None) -> tuple["Adapter", LayerFit]:
    """A plain LoRA adapter for ``layer`` holding the mix of ``sources`` (name, adapter, weight), and its fit."""
    deltas = [task_vector(a, layer) for _, a, _ in sources]
    masks = None
    if how in _USES_SEED:
        masks = [dare_keep_mask(d.shape, density, dare_generator(seed, n, path)) for d, (n, _, _) in
                 zip(deltas, sources)]
    mixed = mix_task_vectors(deltas, [w for _, _, w in sources], how, density, majority_sign, masks)
    low = factorize(mixed, rank=rank, energy=energy)
    adapter = get_method(GENERIC_MIXING_METHOD).from_factors(layer.ops, path, low.A, low.B, 1.0)
    return adapter, LayerFit(low.rank, low.exact_rank, low.rel_error)


# ---------------------------------------------------------------------------------------------------------------
# reports: kept per model, for the adapters combine made
# ---------------------------------------------------------------------------------------------------------------
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[MixReport, list[weakref.ref]]]]" = \
    weakref.WeakKeyDictionary()


def record_report(model: nn.Module, report: MixReport, adapters: Sequence["Adapter"]) -> None:
    """Remember ``report`` for the mixed adapter ``report.name`` (its per-layer ``adapters``) of ``model``."""
    _REPORTS.setdefault(model, {})[report.name] = (report, [weakref.ref(a) for a in adapters])


def mix_report(model: nn.Module, name: str) -> MixReport:
    """The :class:`MixReport` of adapter ``name``, made by :func:`lorakit.combine` with a task-vector rule in this
    session (reports are not saved with adapters; the CLI writes ``mix_report.json``).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(6, 6))
        >>> for n in "ab": _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, init="gaussian"), name=n)
        >>> _ = lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="m", how="task_arithmetic", rank=1)  # doctest: +SKIP
        >>> lorakit.mix_report(net, "m").layers["0"].rank  # doctest: +SKIP
        1
    """
    entry = _REPORTS.get(model, {}).get(name)
    current = {id(layer.adapters[name]) for _, layer in adapted_layers(model) if name in layer.adapters}
    if entry is None or not current or {id(r()) for r in entry[1]} != current:
        raise ValueError(f"adapter {name!r} has no mix report: reports exist for adapters made by lorakit.combine "
                         f"with how in {TASK_VECTOR_RULES} on this model in this session")
    return entry[0]
