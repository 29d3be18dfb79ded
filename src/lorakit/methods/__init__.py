"""The family: one file per method, one registry line each.

Methods are imported on first use, so a method file that fails to import never breaks the others. A family member
defined outside the package joins with :func:`register_method`. Importing this module plugs the registry into
:class:`~lorakit.config.AdapterConfig` validation (the config imports nothing of lorakit).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Collection

from ..config import use_method_registry
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
    if name in _REGISTERED:
        return _REGISTERED[name]
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


#: family members registered from outside the package (their classes may not be importable by name)
_REGISTERED: dict[str, type[Adapter]] = {}


def register_method(name: str, adapter_cls: type[Adapter]) -> None:
    """Make ``adapter_cls`` the strategy of method ``name``, a family member defined outside lorakit's package.

    ``adapter_cls.method`` must equal ``name``. Registering the same class again is a no-op; a name taken by another
    class (a built-in method included) is a ValueError.

    Example:
        >>> from lorakit.methods.lora import LoraAdapter
        >>> class TinyLora(LoraAdapter):
        ...     method = "tiny_lora"
        >>> register_method("tiny_lora", TinyLora)
        >>> get_method("tiny_lora") is TinyLora
        True
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_method: the method name must be a non-empty string, got {name!r}")
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, Adapter)):
        raise TypeError(f"register_method({name!r}, ...) needs a subclass of lorakit.methods.Adapter, got "
                        f"{adapter_cls!r}")
    if adapter_cls.method != name:
        raise ValueError(f"register_method({name!r}, {adapter_cls.__name__}): the class says method = "
                         f"{adapter_cls.method!r}; set {adapter_cls.__name__}.method = {name!r}")
    if name in METHODS:
        if _REGISTERED.get(name) is adapter_cls:
            return
        raise ValueError(f"method name {name!r} is taken (by {METHODS[name]}); pick another name")
    _REGISTERED[name] = adapter_cls
    METHODS[name] = f"{adapter_cls.__module__}:{adapter_cls.__qualname__}"


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


use_method_registry(lambda: METHODS, get_method)

__all__ = ["Adapter", "METHODS", "available_methods", "combine_adapters", "get_method", "register_method"]
