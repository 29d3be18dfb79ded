"""Quantised bases in pure PyTorch: NF4 storage bit-identical to bitsandbytes, the 4-bit linear layer, 8-bit
AdamW state, and the LoftQ/QPiSSA decomposition. Nothing here imports lorakit outside ``quant/``, so ``layers`` and
the methods can build on it.

The whole-model verbs (:func:`~lorakit.quantization.quantize`, ``save_quantized``, ``load_quantized``,
``requantize``, ``quantize_for_adapter``) live in :mod:`lorakit.quantization`, above ``layers``/``model``/``io``;
this package still answers for their names, resolving them on first use (see ``__getattr__`` below).

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

from .linear4bit import Linear4bit, model_weight_bytes
from .loftq import loftq_decompose
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
    from ..quantization import load_quantized, quantize, quantize_for_adapter, requantize, save_quantized

#: names this package answers for that live on higher floors
_WHOLE_MODEL_VERBS = ("quantize", "save_quantized", "load_quantized", "requantize", "quantize_for_adapter")


def __getattr__(name: str) -> Any:
    """``lorakit.quant.quantize`` & co. (from :mod:`lorakit.quantization`) and ``loftq_attach`` (the LoRA
    strategy's LoftQ init), imported on first use.

    The one documented exception to "quant/ imports nothing outside quant/": these imports run only when a caller
    asks for one of these names, never while ``lorakit.quant`` itself is imported (``layers`` and the methods import
    it), so they close no cycle at run time; the import contracts list them as ignored imports
    (``lorakit.quant -> lorakit.quantization``, ``lorakit.quant -> lorakit.methods.lora``).
    """
    if name in _WHOLE_MODEL_VERBS:
        from .. import quantization

        return getattr(quantization, name)
    if name == "loftq_attach":
        from ..methods.lora import loftq_attach

        return loftq_attach
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHOLE_MODEL_VERBS) | {"loftq_attach"})


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
