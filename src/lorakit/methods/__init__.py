"""The family: one file per method, one registry line each.

Methods are imported on first use, so a method file that fails to import never breaks the others.
"""
from __future__ import annotations

import importlib

from typing import TYPE_CHECKING, Collection

from .base import Adapter

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import AdaptedLayer

#: method name -> "module:Class" of its adapter (the strategy). Adding a family member = one file + one line here.
METHODS: dict[str, str] = {
    "lora": "lora:LoraAdapter",
    "dora": "dora:DoraAdapter",
    "vera": "vera:VeraAdapter",
    "lora_fa": "lora_fa:LoraFAAdapter",
    "adalora": "adalora:AdaLoraAdapter",
    "sora": "sora:SoraAdapter",
    "lora_drop": "lora_drop:LoraDropAdapter",
    "delta_lora": "delta_lora:DeltaLoraAdapter",
}


def get_method(name: str) -> type[Adapter]:
    """The adapter class registered under ``name``.

    Example:
        >>> get_method("lora").__name__
        'LoraAdapter'
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


#: the method whose strategy holds the generic mixing rule (exact low-rank factors, or an SVD of the summed deltas)
GENERIC_MIXING_METHOD = "lora"


def combine_adapters(method_names: Collection[str], layer: "AdaptedLayer", sources: list[tuple[Adapter, float]],
                     how: str, rank: int | None = None) -> Adapter:
    """A new adapter for ``layer`` mixing ``sources`` (adapter, weight): the own rule of the sources' method when all
    mixed adapters share one method that has one (DoRA), else the generic low-rank rule (LoRA's).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> for n in "ab": _ = lorakit.attach(net, lorakit.AdapterConfig(r=2), name=n)
        >>> sources = [(net[0].adapters["a"], 0.5), (net[0].adapters["b"], 0.5)]
        >>> combine_adapters({"lora"}, net[0], sources, "svd", rank=1).r
        1
    """
    names = set(method_names)
    if len(names) == 1:
        mixed = get_method(names.pop()).combine(layer, sources, how, rank)
        if mixed is not None:
            return mixed
    generic = get_method(GENERIC_MIXING_METHOD).combine(layer, sources, how, rank)
    assert generic is not None  # the generic rule always builds an adapter
    return generic


def available_methods() -> list[str]:
    """Names of the methods whose implementation imports on this installation."""
    out = []
    for name in METHODS:
        try:
            get_method(name)
        except (ImportError, AttributeError):
            continue
        out.append(name)
    return out


__all__ = ["Adapter", "METHODS", "available_methods", "combine_adapters", "get_method"]
