"""Adapters in the plain-LoRA shape that serving targets read (one rank and one alpha for the whole adapter).

h13a's version replaces this at merge: this minimal module only holds :func:`uniform_lora_factors` for adapters
that already have an exact low-rank form (``as_lora_factors``), which the GGUF writer needs on this branch.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import adapted_layers, registry


def uniform_lora_factors(model: nn.Module, name: str = "default"
                         ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """Adapter ``name`` as ``({layer path: (A [r, in], B [out, r])}, alpha, r)`` with one rank ``r`` for every layer.

    Each layer's scaling is folded into ``B`` and smaller ranks are zero-padded to ``r``, so ``B @ A`` is the
    layer's exact weight change and ``alpha = r`` makes a target's ``alpha / r`` scale 1. Factors are fp32 on CPU.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> factors, alpha, r = uniform_lora_factors(net, "default")
        >>> sorted(factors), alpha, r
        (['0'], 2.0, 2)
    """
    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"adapter {name!r} is not on this model; it has: {', '.join(reg.configs) or 'none'}")
    raw = {}
    for path, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        try:
            a, b, scale = adapter.as_lora_factors()
        except ValueError as exc:
            raise ValueError(f"adapter {name!r} ({adapter.method}) is not a plain LoRA ({exc}); convert it first "
                             f"with lorakit.to_lora(model, {name!r})") from None
        a = a.detach().float().cpu()
        b = b.detach().float().cpu() * float(scale)
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{path}: adapter {name!r} has no 2-D LoRA pair (shapes {tuple(a.shape)}, "
                             f"{tuple(b.shape)}); only linear layers can be exported as plain LoRA")
        raw[path] = (a, b)
    if not raw:
        raise ValueError(f"adapter {name!r} adapts no layer; nothing to export")
    rank = max(a.shape[0] for a, _ in raw.values())
    factors = {}
    for path, (a, b) in raw.items():
        pad = rank - a.shape[0]
        if pad:  # zero rows of A / columns of B add nothing to B @ A
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        factors[path] = (a.contiguous(), b.contiguous())
    return factors, float(rank), rank
