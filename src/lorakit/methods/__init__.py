"""The family: one file per method, one registry line each.

Methods are imported on first use, so a method file that fails to import never breaks the others.
"""
from __future__ import annotations

import importlib

from .base import Adapter

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


__all__ = ["Adapter", "METHODS", "available_methods", "get_method"]
