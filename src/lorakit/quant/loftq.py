"""LoftQ (Li et al. 2023; methods.md §14) and the QPiSSA loop (§12), honouring the LoRA scaling, on CPU or GPU.

Alternating NF4 quantisation and rank-r SVD, starting from a zero adapter::

    res = W
    repeat T = loftq_iter times:
        Q   = NF4(res)                       block 64, no double quantisation (as LoftQ)
        R   = W − deq(Q)
        U S Vᵀ = SVD_r(R)
        A = √(S/s) Vᵀ,  B = U √(S/s)        so that s·B A = U S Vᵀ exactly
        res = W − s·B A

Scaling choice (methods.md §17): PEFT and the official code set ``A = √S Vᵀ, B = U √S`` and ignore ``s = α/r``, so
``deq(Q) + s·BA ≠ W`` unless α = r (PEFT issue 1982). lorakit divides the singular values by ``s``, so
``deq(Q) + s·BA`` is the LoftQ approximation of W for **any** α (and rsLoRA scaling alike).

The QPiSSA loop (``svd_first=True``) is the same alternation started from the SVD of W instead of its
quantisation: ``res = W``; repeat: ``(A, B) = SVD_r(res)`` (scaled as above), ``Q = NF4(W − s·BA)``,
``res = W − deq(Q)``.
"""
from __future__ import annotations

import torch

from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


def top_svd(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``r`` singular triplets ``(U_r, S_r, V_rᵀ)`` of ``m`` (fp32 results).

    Computed from the eigen-decomposition of the smaller Gram matrix in fp64: the top of the spectrum to ~1e-12
    relative accuracy and 5-10x faster on CPU than a full ``torch.linalg.svd`` (which LoftQ would call
    ``loftq_iter`` times per layer). Directions with a zero singular value come back as zero vectors.
    """
    m64 = m.double()
    wide = m64.shape[0] <= m64.shape[1]
    gram = m64 @ m64.t() if wide else m64.t() @ m64
    evals, evecs = _eigh(gram)
    evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
    sv = evals.clamp(min=0).sqrt()
    keep = sv > sv[:1].clamp(min=1e-300) * 1e-12
    inv = torch.where(keep, 1.0 / torch.where(keep, sv, torch.ones_like(sv)), torch.zeros_like(sv))
    if wide:
        u, vh = evecs, (evecs.t() @ m64) * inv[:, None]
    else:
        u, vh = (m64 @ evecs) * inv[None, :], evecs.t()
    sv = torch.where(keep, sv, torch.zeros_like(sv))
    return u.float(), sv.float(), vh.float()


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Small CPU eigen-problems run on one thread: LAPACK's OpenMP threads gain nothing at this size and spin-wait
    # badly on a busy machine (measured 0.03 s on 1 thread vs 3 s on 2 for a 384x384 matrix under load).
    if gram.device.type != "cpu" or gram.shape[0] > 1024:
        return torch.linalg.eigh(gram)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(gram)
    finally:
        torch.set_num_threads(threads)


def _scaled_svd(m: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    u, sv, vh = top_svd(m, r)
    root = (sv / s).sqrt()
    return root[:, None] * vh, u * root[None, :]


def loftq_decompose(weight: torch.Tensor, r: int, scaling: float = 1.0, iters: int = 1, blocksize: int = 64,
                    double_quant: bool = False, svd_first: bool = False
                    ) -> tuple[NF4Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (or, with ``svd_first=True``, QPiSSA) decomposition of a ``[out, in]`` weight.

    Returns ``(Q, A, B)`` with ``Q`` the NF4 backbone, ``A`` ``[r, in]`` and ``B`` ``[out, r]`` (fp32) such that
    ``deq(Q) + scaling·B A ≈ W``; computed in fp32 on the weight's device.

    Example:
        >>> w = torch.randn(32, 64)
        >>> q, a, b = loftq_decompose(w, r=4, scaling=0.5, iters=2)
        >>> err = (w - dequantize_nf4(q) - 0.5 * b @ a).norm()
        >>> bool(err < (w - dequantize_nf4(quantize_nf4(w))).norm())
        True
    """
    if not isinstance(r, int) or r < 1 or r > min(weight.shape):
        raise ValueError(f"loftq_decompose: r={r!r} must be an integer in [1, min(out, in)={min(weight.shape)}]")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq_decompose: iters={iters!r} must be an integer >= 1 (AdapterConfig.loftq_iter)")
    if not scaling > 0:
        raise ValueError(f"loftq_decompose: scaling={scaling!r} must be positive")
    w = weight.detach().float()
    res = w
    q = a = b = None
    for _ in range(iters):
        if svd_first:
            a, b = _scaled_svd(res, r, scaling)
            q = quantize_nf4(w - scaling * (b @ a), blocksize, double_quant)
            res = w - dequantize_nf4(q)
        else:
            q = quantize_nf4(res, blocksize, double_quant)
            a, b = _scaled_svd(w - dequantize_nf4(q), r, scaling)
            res = w - scaling * (b @ a)
    return q, a, b
