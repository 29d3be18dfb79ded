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

import os

import torch

from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


def quantize_for_adapter(model: torch.nn.Module, folder: str | os.PathLike,
                         compute_dtype: torch.dtype | None = None) -> list[str]:
    """Quantise, as a saved lorakit LoftQ adapter needs, the layers of ``model`` it adapts; returns their paths.

    Reads ``folder``'s ``lorakit_config.json``: every adapter recording a 4-bit base (``extra["base"]``, written
    by ``attach(init="loftq")``) or saved with ``init="loftq"`` gets its layers quantised with those settings
    (NF4, block 64, no double quantisation), computing in ``compute_dtype`` (default: the layers' own dtype).
    A PEFT LoftQ folder (``init_lora_weights: "loftq"`` or a ``loftq_config``) gets its LoRA layers quantised the
    same way. Layers already 4-bit and other folders are left alone, so :func:`lorakit.load` then explains any
    mismatch. With ``loftq_iter > 1`` the LoftQ backbone is not a fresh quantisation of the base: keep that one
    with :func:`~lorakit.quant.save_quantized` instead. Used by ``lorakit predict``/``export``.

    Example:
        >>> import tempfile, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, init="loftq"))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/a")
        >>> quantize_for_adapter(torch.nn.Sequential(torch.nn.Linear(64, 64)), folder)
        ['0']
    """
    import json
    import re
    from pathlib import Path

    from ..methods.lora import LOFTQ_BASE
    from .linear4bit import quantize

    cfg_file = Path(folder) / "lorakit_config.json"
    try:
        if cfg_file.is_file():
            meta = json.loads(cfg_file.read_text(encoding="utf-8"))
            entries = list(meta["adapters"].values())
        else:
            entries = _peft_loftq_entries(Path(folder))
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return []  # lorakit.load reports the broken folder
    wanted: dict[str, dict] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        base = (entry.get("extra") or {}).get("base")
        if base is None and (entry.get("config") or {}).get("init") == "loftq":
            base = LOFTQ_BASE
        if isinstance(base, dict) and base.get("quant_type") == "nf4":
            for path in entry.get("layers") or []:
                wanted[path] = base
    todo = []
    for path, base in wanted.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # lorakit.load names the missing module
        if isinstance(module, torch.nn.Linear):
            todo.append((path, module, base))
    done = []
    settings = {(b.get("blocksize", 64), bool(b.get("double_quant", False))) for _, _, b in todo}
    for blocksize, double_quant in sorted(settings):
        paths = [p for p, m, b in todo if (b.get("blocksize", 64), bool(b.get("double_quant", False))) ==
                 (blocksize, double_quant)]
        dtype = compute_dtype or next(m for p, m, _ in todo if p == paths[0]).weight.dtype
        # skip every module but these paths and the containers holding them (a container named by skip would
        # skip everything inside it)
        keep = {".".join(p.split(".")[:i]) for p in paths for i in range(1, p.count(".") + 2)}
        skip = (rf"(?!(?:{'|'.join(re.escape(k) for k in sorted(keep))})$).*",)
        quantize(model, double_quant=double_quant, compute_dtype=dtype, skip=skip, blocksize=int(blocksize))
        done += paths
    return done


def _peft_loftq_entries(folder) -> list[dict]:
    """A PEFT LoftQ folder as :func:`quantize_for_adapter` entries (layers read from the tensor names)."""
    import json

    from safetensors import safe_open

    from ..peft_format import PEFT_CONFIG, PEFT_WEIGHTS, PREFIX, _peft_loftq

    cfg = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or _peft_loftq(cfg, folder) is None:
        return []
    with safe_open(str(folder / PEFT_WEIGHTS), "pt") as fh:
        keys = list(fh.keys())
    layers = sorted({k[len(PREFIX):].rsplit(".lora_A", 1)[0] for k in keys if ".lora_A" in k and k.startswith(PREFIX)})
    return [{"config": {"init": "loftq"}, "layers": layers}]


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
