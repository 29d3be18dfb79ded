"""The family: one file per method, one registry line each."""
from __future__ import annotations

from .base import Adapter
from .lora import LoraAdapter

#: method name -> adapter class (the strategy). Adding a family member = one file + one line here.
METHODS: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,
}


def get_method(name: str) -> type[Adapter]:
    """The adapter class registered under ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["Adapter", "METHODS", "get_method"]
