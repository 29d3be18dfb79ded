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
from .io.hotswap import hotswap, prepare_hotswap
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
from .mixing import MixReport, mix_report

__version__ = "0.1.0"

# Names whose modules are imported on first use (they pull optional pieces: training loop, quantisation).
_LAZY = {
    "training_hooks": "lorakit.train.hooks",
    "regularization_loss": "lorakit.train.hooks",
    "quantize": "lorakit.quantization",
    "make_optimizer": "lorakit.optim",
    "loraplus_param_groups": "lorakit.optim",
    "run_lora_drop": "lorakit.train.recipes.lora_drop",
    "to_lora": "lorakit.convert",
    "export": "lorakit.io.targets",
    "check_export": "lorakit.io.targets",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")

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
    "loraplus_param_groups",
    "make_optimizer",
    "quantize",
    "regularization_loss",
    "training_hooks",
    "merge",
    "hotswap",
    "prepare_hotswap",
    "parameter_report",
    "route",
    "run_lora_drop",
    "save",
    "set_active",
    "set_trainable",
    "trainable_parameters",
    "unload",
    "unmerge",
    "MixReport",
    "mix_report",
    "to_lora",
    "export",
    "check_export",
]
