"""lorakit: the LoRA family behind one API.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="lora", r=4, targets=["0"]))
    >>> lorakit.trainable_parameters(net)[0]
    128
"""
from __future__ import annotations

from .config import AdapterConfig
from .io import AdapterLoadError, load, save
from .layers import AdaptedLayer, UnsupportedLayer
from .model import (
    active_adapters,
    adapter_names,
    attach,
    combine,
    delete,
    disabled,
    merge,
    parameter_report,
    route,
    set_active,
    set_trainable,
    trainable_parameters,
    unload,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdaptedLayer",
    "AdapterLoadError",
    "UnsupportedLayer",
    "active_adapters",
    "adapter_names",
    "attach",
    "combine",
    "delete",
    "disabled",
    "load",
    "merge",
    "parameter_report",
    "route",
    "save",
    "set_active",
    "set_trainable",
    "trainable_parameters",
    "unload",
    "unmerge",
]
