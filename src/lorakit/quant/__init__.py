"""Quantised bases in pure PyTorch: NF4 storage bit-identical to bitsandbytes, 4-bit linear layers, QLoRA-style
model quantisation, LoftQ/QPiSSA initialisation, save/load of the packed form, and requantising merges.

Example (QLoRA on CPU):
    >>> import torch, lorakit
    >>> from lorakit.quant import model_weight_bytes
    >>> net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    >>> dense = model_weight_bytes(net)
    >>> _ = lorakit.quantize(net, compute_dtype=torch.float32)
    >>> model_weight_bytes(net) < dense / 6
    True
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=4))
    >>> net(torch.randn(2, 128)).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .linear4bit import (
    Linear4bit,
    load_quantized,
    model_weight_bytes,
    quantize,
    requantize,
    save_quantized,
)
from .loftq import loftq_decompose, quantize_for_adapter
from .nf4 import (
    NF4_CODE_VALUES,
    NF4Tensor,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    dynamic_map,
    nf4_bits_per_parameter,
    nf4_code,
    normal_map,
    quantize_blockwise_8bit,
    quantize_nf4,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.lora import loftq_attach


def __getattr__(name: str) -> Any:
    """Names this package still answers for that live on higher floors: resolved on first use, so that importing
    ``lorakit.quant`` (as ``layers`` and ``methods`` do) imports nothing of lorakit outside it."""
    if name == "loftq_attach":  # the LoRA strategy's LoftQ init
        from ..methods.lora import loftq_attach

        return loftq_attach
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Linear4bit",
    "NF4Tensor",
    "NF4_CODE_VALUES",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "dynamic_map",
    "load_quantized",
    "loftq_attach",
    "loftq_decompose",
    "model_weight_bytes",
    "nf4_bits_per_parameter",
    "nf4_code",
    "normal_map",
    "quantize",
    "quantize_blockwise_8bit",
    "quantize_for_adapter",
    "quantize_nf4",
    "requantize",
    "save_quantized",
]
