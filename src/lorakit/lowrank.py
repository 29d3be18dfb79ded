"""A dense weight change as low-rank factors: exact when its rank allows, else the best rank-k approximation.

The one SVD rule shared by everything that turns a weight change into a plain LoRA pair: ``to_lora`` (any family
member as LoRA), the export targets, and mixing (``combine`` with ``rank``/``energy``). By Eckart–Young, truncating
the SVD is the best approximation of its rank in the Frobenius and spectral norms, so the reported error is the least
any rank-k LoRA can have.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["LowRank", "factorize", "factorize_product", "check_rank_energy"]


@dataclass(frozen=True)
class LayerFit:
    """How one layer's change became LoRA factors: the rank kept, the change's numerical rank, and the relative error
    ``‖ΔW − B A‖_F / ‖ΔW‖_F`` (0 when exact). What ``to_lora``'s and ``combine``'s reports list per layer."""

    rank: int
    exact_rank: int
    rel_error: float

    @property
    def exact(self) -> bool:
        return self.rank >= self.exact_rank


@dataclass(frozen=True)
class LowRank:
    """``B @ A`` approximates (or equals) a weight change ``delta`` of shape ``[out, in]``.

    ``A``: ``[rank, in]``, ``B``: ``[out, rank]``, both fp32 on ``delta``'s device, the singular values split evenly
    (``√σ`` in each) so neither factor dwarfs the other. ``exact_rank``: the numerical rank of ``delta`` (singular values
    above ``max(out, in)·eps·σ_max``). ``rel_error``: ``‖delta − B A‖_F / ‖delta‖_F`` (0 for a zero change).
    ``energy``: the fraction of ``Σσ²`` kept.
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    exact_rank: int
    rel_error: float
    energy: float

    @property
    def exact(self) -> bool:
        return self.rank >= self.exact_rank


def check_rank_energy(rank: int | None, energy: float | None, what: str = "to_lora") -> None:
    """Raise ValueError naming the fix for a bad ``rank``/``energy`` pair (at most one; rank ≥ 1; 0 < energy ≤ 1).

    Example:
        >>> check_rank_energy(8, None)
        >>> check_rank_energy(None, 0.99)
    """
    if rank is not None and energy is not None:
        raise ValueError(f"{what}: give rank or energy, not both (rank fixes the size; energy picks the smallest "
                         "rank keeping that fraction of the squared singular values)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"{what}: rank={rank!r} is invalid; use an integer >= 1")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real)
                               or not math.isfinite(energy) or not 0 < energy <= 1):
        raise ValueError(f"{what}: energy={energy!r} is invalid; use a number with 0 < energy <= 1 (e.g. 0.99)")


def factorize(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """Factor ``delta`` ``[out, in]`` as ``B @ A``.

    ``rank=None, energy=None``: exactly (rank = the numerical rank, at least 1). ``rank=k``: the best rank-``k``
    approximation, or exactly when ``delta``'s rank is at most ``k`` (then ``rank`` is the smaller exact rank; pad
    with zeros where a fixed rank is needed). ``energy=e``: the smallest rank keeping ``e`` of ``Σσ²``.

    Example:
        >>> import torch
        >>> d = torch.randn(6, 2) @ torch.randn(2, 5)
        >>> f = factorize(d)
        >>> f.rank, f.exact, f.rel_error < 1e-5
        (2, True, True)
        >>> factorize(torch.randn(6, 5), rank=1).rank
        1
    """
    check_rank_energy(rank, energy, "factorize")
    if delta.dim() != 2:
        raise ValueError(f"factorize needs a 2-D [out, in] weight change, got shape {tuple(delta.shape)}")
    d = delta.detach().float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return _truncate(u, s, vh, max(d.shape), rank, energy)


def factorize_product(b: torch.Tensor, a: torch.Tensor, rank: int | None = None, energy: float | None = None
                      ) -> LowRank:
    """:func:`factorize` of ``delta = b @ a`` (``b`` ``[out, k]``, ``a`` ``[k, in]``) without forming or decomposing
    the dense ``[out, in]`` matrix: the same singular triplets, from QR of the thin factors and the SVD of a k×k core
    (``b = Q_b R_b``, ``aᵀ = Q_a R_a``, ``delta = Q_b (R_b R_aᵀ) Q_aᵀ``), so a rank-16 change of a 1536×576 layer costs
    microseconds instead of a full SVD. Same rank, energy and relative-error rules as :func:`factorize`.

    Example:
        >>> import torch
        >>> b, a = torch.randn(7, 3), torch.randn(3, 5)
        >>> f, g = factorize_product(b, a, rank=2), factorize(b @ a, rank=2)
        >>> bool(torch.allclose(f.B @ f.A, g.B @ g.A, atol=1e-5)), f.exact_rank
        (True, 3)
    """
    check_rank_energy(rank, energy, "factorize")
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factorize_product needs b [out, k] and a [k, in], got {tuple(b.shape)} and "
                         f"{tuple(a.shape)}")
    qb, rb = torch.linalg.qr(b.detach().float())
    qa, ra = torch.linalg.qr(a.detach().float().t())
    uc, s, vhc = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    return _truncate(qb @ uc, s, vhc @ qa.t(), max(b.shape[0], a.shape[1]), rank, energy)


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, size: int, rank: int | None,
              energy: float | None) -> LowRank:
    """The truncation rule shared by :func:`factorize` and :func:`factorize_product`, from an SVD ``u diag(s) vh``
    of a change whose larger side is ``size``."""
    total = float((s * s).sum())
    cutoff = (size * torch.finfo(torch.float32).eps * float(s[0])) if s.numel() else 0.0
    exact_rank = int((s > cutoff).sum()) if total > 0 else 0
    if rank is not None:
        k = min(int(rank), max(exact_rank, 1))
    elif energy is not None and total > 0:
        kept = torch.cumsum(s * s, 0) / total
        k = int(torch.searchsorted(kept, torch.tensor(float(energy) - 1e-12, dtype=kept.dtype)).item()) + 1
        k = min(k, max(exact_rank, 1))
    else:
        k = max(exact_rank, 1)
    root = s[:k].sqrt()
    B = u[:, :k] * root
    A = root[:, None] * vh[:k]
    kept_sq = float((s[:k] * s[:k]).sum())
    rel = math.sqrt(max(total - kept_sq, 0.0) / total) if total > 0 else 0.0
    return LowRank(A=A.contiguous(), B=B.contiguous(), rank=k, exact_rank=exact_rank, rel_error=rel,
                   energy=kept_sq / total if total > 0 else 1.0)
