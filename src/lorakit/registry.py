"""Which adapters a model holds: the model-level bookkeeping every other floor reads.

It sits below the methods (it imports only the config and the layers), so a method that needs a global view of its
adapter (VeRA's shared pair, AdaLoRA's budget, SoRA's gates) reads it here without importing :mod:`lorakit.model`.

Example:
    >>> import torch, lorakit
    >>> from lorakit.registry import adapted_layers, registry
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
    >>> registry(net).active, [path for path, _ in adapted_layers(net)]
    (['default'], ['0'])
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

from torch import nn

from .config import AdapterConfig
from .layers import AdaptedLayer, ModuleCopies

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import Adapter

#: the attribute of the model's ``__dict__`` that holds its registry
REGISTRY_ATTR = "_lorakit_registry"


class AdapterRegistry:
    """Model-level adapter bookkeeping. Kept in the model's ``__dict__`` (not as a submodule, so containers such
    as ``nn.Sequential`` keep working); removed by :func:`lorakit.unload`. Shared state modules are also registered
    inside every adapter that uses them, so ``.to()``/``parameters()`` see them."""

    def __init__(self) -> None:
        self.configs: dict[str, AdapterConfig] = {}
        self.layers: dict[str, list[str]] = {}  # adapter name -> adapted layer paths
        self.modules_to_save: dict[str, list[str]] = {}  # adapter name -> paths of the modules it trains whole
        self.active: list[str] = []
        self.shared: dict[str, nn.Module] = {}  # adapter name -> shared state (VeRA pair, LoRA-drop shared pairs)
        # adapter name -> what attach and the method recorded about it, saved with it as "extra" in
        # lorakit_config.json: "base" (the 4-bit base it was fitted to, from base_requirements) and the method's own
        # reports under keys its file defines (final ranks, gate schedules, selected layers)
        self.extra: dict[str, dict[str, Any]] = {}
        # (object, attribute, old value) changed when merge untied a tied weight (transformers' tie settings)
        self.tie_settings: list[tuple[Any, str, Any]] = []

    def __repr__(self) -> str:
        return f"AdapterRegistry(adapters={list(self.configs)}, active={self.active})"


def registry_or_none(model: nn.Module) -> AdapterRegistry | None:
    """The model's :class:`AdapterRegistry`, or None if no adapter was ever attached (or all were removed).

    Example:
        >>> registry_or_none(nn.Linear(2, 2)) is None
        True
    """
    reg = model.__dict__.get(REGISTRY_ATTR)
    return reg if isinstance(reg, AdapterRegistry) else None


def registry(model: nn.Module) -> AdapterRegistry:
    """The model's :class:`AdapterRegistry`; raises a clear error if nothing was attached.

    Example:
        >>> registry(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: this model has no lorakit adapters; call lorakit.attach(model, config) first
    """
    reg = registry_or_none(model)
    if reg is None:
        raise ValueError("this model has no lorakit adapters; call lorakit.attach(model, config) first")
    return reg


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(path, layer)`` for every adapted layer (path of the original module).

    Example:
        >>> list(adapted_layers(nn.Linear(2, 2)))
        []
    """
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield path, module


class AdapterEntry(NamedTuple):
    """One layer of one adapter: the path of the adapted module, its :class:`~lorakit.layers.AdaptedLayer` and the
    adapter (strategy) on it. What the per-adapter strategy classmethods receive as ``entries``."""

    path: str
    layer: AdaptedLayer
    adapter: "Adapter"


def adapter_entries(model: nn.Module, name: str) -> list[AdapterEntry]:
    """Every layer of adapter ``name``, in module order.

    Example:
        >>> adapter_entries(nn.Linear(2, 2), "default")
        []
    """
    return [AdapterEntry(path, layer, layer.adapters[name]) for path, layer in adapted_layers(model)
            if name in layer.adapters]


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModuleCopies]]:
    """``(path, wrapper)`` for every module that adapters train whole (``modules_to_save``), path of the original.

    Example:
        >>> list(saved_modules(nn.Linear(2, 2)))
        []
    """
    for path, module in model.named_modules():
        if isinstance(module, ModuleCopies):
            yield path, module


def saved_copy(model: nn.Module, path: str, name: str) -> nn.Module:
    """Adapter ``name``'s own copy of the module at ``path`` (one of its ``modules_to_save``).

    Example:
        >>> import lorakit
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0"], modules_to_save=["1"]))
        >>> type(saved_copy(net, "1", "default")).__name__
        'Linear'
    """
    wrapper = model.get_submodule(path)
    if not isinstance(wrapper, ModuleCopies) or name not in wrapper.copies:
        raise ValueError(f"adapter {name!r} has no copy of module {path!r}")
    return wrapper.copies[name]


__all__ = ["REGISTRY_ATTR", "AdapterRegistry", "adapted_layers", "registry", "registry_or_none", "saved_copy",
           "saved_modules"]
