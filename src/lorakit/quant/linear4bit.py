"""A 4-bit NF4 linear layer that dequantises on the fly (and :func:`model_weight_bytes`, which measures a model).

:class:`Linear4bit` keeps its weight only in packed NF4 form (buffers: 4 bits per weight plus block constants).
Forward dequantises to the compute dtype, runs ``F.linear`` and casts the output back to the input dtype; its
autograd function saves nothing dense, so backward dequantises again instead of keeping a dense weight per layer
alive between forward and backward. Gradients reach the input, never the weight.

Saving: every tensor of a :class:`Linear4bit` is a plain buffer (uint8 codes, fp32/uint8 constants), so a quantised
model's ``state_dict()`` is safetensors-ready; :meth:`Linear4bit.settings` and :meth:`Linear4bit.from_settings`
describe and rebuild the empty layer. The whole-model verbs (quantise, save, load, requantise) are in
:mod:`lorakit.quantization`: this module imports nothing of lorakit outside ``quant/``.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import DQ_BLOCKSIZE, NF4Tensor, check_blocksize, dequantize_blockwise_8bit, dequantize_parts, quantize_nf4

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (an ``[in, out]`` weight; recognised by shape, so transformers need
    not be imported). The one Conv1D rule: here, the lowest floor that needs it (quantising a Conv1D transposes its
    weight); :mod:`lorakit.layers` uses and re-exports it.

    Example:
        >>> is_conv1d(nn.Linear(2, 2))
        False
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class _Dequant4bitLinear(torch.autograd.Function):
    """``y = x · deq(W)ᵀ + b``; backward dequantises again rather than saving the dense weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit", bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b


class Linear4bit(nn.Module):
    """A linear layer whose weight is stored in NF4 (optionally double-quantised), bitsandbytes' layout.

    Buffers: ``weight_packed`` (uint8 ``[ceil(out·in/2), 1]``), ``absmax`` (fp32 ``[blocks]``, or uint8 codes with
    double quantisation, then also ``absmax2`` fp32 and ``absmax_offset`` fp32 scalar). ``bias`` stays a (frozen by
    attach) parameter in its original dtype. ``weight_dtype`` remembers the dtype of the dense weight it replaced:
    :meth:`to_linear` (used by merge/unload) returns a layer in that dtype when it is wider than the compute dtype
    (an fp32 model quantised with bf16 compute), so the dense layer still runs inside the rest of the model.

    Example:
        >>> import torch
        >>> layer = Linear4bit.from_linear(torch.nn.Linear(64, 8), compute_dtype=torch.float32)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 8])
        >>> layer.dequantize().shape
        torch.Size([8, 64])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, double_quant: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 weight_dtype: torch.dtype | None = None):
        super().__init__()
        check_blocksize(blocksize)
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype} is invalid; allowed: torch.float32, torch.bfloat16, "
                             "torch.float16")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype if weight_dtype is not None else compute_dtype
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        n = self.in_features * self.out_features
        blocks = -(-n // blocksize)
        self.register_buffer("weight_packed", torch.zeros(-(-n // 2), 1, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(-(-blocks // DQ_BLOCKSIZE), dtype=torch.float32,
                                                        device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, module: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                    double_quant: bool = True) -> "Linear4bit":
        """Quantise an ``nn.Linear`` (or transformers ``Conv1D``, whose ``[in, out]`` weight is transposed)."""
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
        elif is_conv1d(module):
            weight = module.weight.detach().t()
        else:
            raise ValueError(f"Linear4bit.from_linear needs nn.Linear or transformers Conv1D, got "
                             f"{type(module).__name__}")
        q = quantize_nf4(weight, blocksize, double_quant)
        return cls.from_nf4(q, getattr(module, "bias", None), compute_dtype, weight.dtype, weight.device,
                            module.training)

    @classmethod
    def from_nf4(cls, q: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 weight_dtype: torch.dtype, device: torch.device, training: bool = False) -> "Linear4bit":
        """A layer holding the ``[out, in]`` NF4 tensor ``q`` (its block size and double quantisation) and a copy
        of ``bias``; ``weight_dtype`` is the dtype the weight had before quantisation.

        Example:
            >>> q = quantize_nf4(torch.randn(8, 64), 64, False)
            >>> Linear4bit.from_nf4(q, None, torch.float32, torch.float32, torch.device("cpu")).out_features
            8
        """
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bias is not None, compute_dtype, q.blocksize, q.double_quant,
                    bias.dtype if bias is not None else torch.float32, device=device, weight_dtype=weight_dtype)
        layer.load_nf4(q)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.detach())
        layer.train(training)
        return layer

    def requantize_(self, matrix: torch.Tensor) -> None:
        """Quantise a dense ``[out, in]`` matrix into this layer's buffers (same block size and double quant)."""
        if tuple(matrix.shape) != (self.out_features, self.in_features):
            raise ValueError(f"requantize_ needs a [{self.out_features}, {self.in_features}] matrix, got "
                             f"{list(matrix.shape)}")
        q = quantize_nf4(matrix.detach().to(self.weight_packed.device), self.blocksize, self.double_quant)
        self.load_nf4(q)

    def load_nf4(self, q: NF4Tensor) -> None:
        """Copy an :class:`NF4Tensor` of this layer's geometry and settings into the buffers."""
        if q.shape != (self.out_features, self.in_features) or q.blocksize != self.blocksize \
                or q.double_quant != self.double_quant:
            raise ValueError(f"NF4 tensor {q.shape} (block {q.blocksize}, double_quant={q.double_quant}) does not "
                             f"fit this layer ({self.out_features}x{self.in_features}, block {self.blocksize}, "
                             f"double_quant={self.double_quant})")
        with torch.no_grad():
            self.weight_packed.copy_(q.packed)
            self.absmax.copy_(q.absmax)
            if self.double_quant:
                self.absmax2.copy_(q.absmax2)
                self.absmax_offset.copy_(q.offset)

    def nf4(self) -> NF4Tensor:
        """The stored weight as an :class:`NF4Tensor` (shares the buffers)."""
        dq = self.double_quant
        return NF4Tensor(self.weight_packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                         self.absmax2 if dq else None, self.absmax_offset if dq else None)

    # -- dense views -------------------------------------------------------------------------------------------
    def _block_constants(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax2, DQ_BLOCKSIZE) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype`` (default: the compute dtype); computed, never cached."""
        return dequantize_parts(self.weight_packed, self._block_constants(), (self.out_features, self.in_features),
                                self.blocksize, dtype or self.compute_dtype)

    def dense_dtype(self) -> torch.dtype:
        """dtype of :meth:`to_linear`: the compute dtype, or the replaced weight's dtype if that is wider."""
        wide = torch.promote_types(self.compute_dtype, self.weight_dtype)
        return wide if wide in COMPUTE_DTYPES else self.compute_dtype

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding exactly the weight forward uses (``deq(Q)`` in the compute dtype), stored in
        :meth:`dense_dtype` (compute dtype; an fp32 model quantised with bf16 compute gets fp32 layers holding
        the bf16 values, which fp32 represents exactly)."""
        device = self.weight_packed.device
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device,
                           dtype=self.dense_dtype())
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(self.compute_dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear.train(self.training)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        bias = self.bias.to(cd) if self.bias is not None else None
        return _Dequant4bitLinear.apply(x.to(cd), self, bias).to(x.dtype)

    # -- identity ----------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short, deterministic name of the exact 4-bit weight this layer holds: the first 16 hex digits of a
        sha256 over its shape and NF4 settings, its packed codes and its block constants (double quantisation
        included), hashed as CPU little-endian bytes in fixed dtypes (uint8 codes, fp32 constants). It does not
        depend on the device, the compute dtype or the bias: two layers with equal fingerprints dequantise to the
        same weight. LoftQ adapters record it per layer to recognise the base they were fitted to.

        Example:
            >>> linear = torch.nn.Linear(64, 8)
            >>> a = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
            >>> b = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
            >>> a.fingerprint() == b.fingerprint(), len(a.fingerprint())
            (True, 16)
        """
        digest = hashlib.sha256(f"nf4:{self.out_features}x{self.in_features}:block={self.blocksize}:"
                                f"double_quant={self.double_quant}".encode())
        parts = [self.weight_packed, self.absmax] + ([self.absmax2, self.absmax_offset.reshape(1)]
                                                     if self.double_quant else [])
        for part in parts:
            codes = part.dtype == torch.uint8
            fixed = part.detach().to("cpu", torch.uint8 if codes else torch.float32).contiguous().numpy()
            digest.update(fixed.astype("u1" if codes else "<f4", copy=False).tobytes())
        return digest.hexdigest()[:16]

    # -- accounting --------------------------------------------------------------------------------------------
    def logical_numel(self) -> int:
        """Parameters this layer stands for: the full weight plus bias (used by parameter counts)."""
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    def weight_bytes(self) -> int:
        """Resident bytes of the packed weight, its constants and the bias."""
        tensors = list(self.buffers(recurse=False)) + list(self.parameters(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def settings(self) -> dict[str, Any]:
        """JSON-ready constructor settings (saved by :func:`lorakit.quantization.save_quantized`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "compute_dtype": dtype_name(self.compute_dtype), "blocksize": self.blocksize,
                "double_quant": self.double_quant, "weight_dtype": dtype_name(self.weight_dtype),
                "bias_dtype": dtype_name(self.bias.dtype) if self.bias is not None else "float32"}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "Linear4bit":
        """An empty (zero) layer built from :meth:`settings`; load its buffers afterwards.

        Example:
            >>> layer = Linear4bit.from_linear(torch.nn.Linear(64, 8), compute_dtype=torch.float32)
            >>> Linear4bit.from_settings(layer.settings()).settings() == layer.settings()
            True
        """
        s = settings
        return cls(s["in_features"], s["out_features"], s["bias"], _dtype_from_name(s["compute_dtype"]),
                   s["blocksize"], s["double_quant"], _dtype_from_name(s["bias_dtype"]),
                   weight_dtype=_dtype_from_name(s.get("weight_dtype", s["compute_dtype"])))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as saved in JSON, e.g. ``"bfloat16"``.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def model_weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every parameter and buffer of ``model`` (shared tensors counted once; a 4-bit layer
    counts its packed codes and constants).

    Example:
        >>> import torch
        >>> model_weight_bytes(torch.nn.Linear(4, 4))
        80
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


__all__ = ["Linear4bit", "model_weight_bytes", "dtype_name", "COMPUTE_DTYPES", "is_conv1d"]
