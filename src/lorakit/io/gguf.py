"""GGUF for llama.cpp and Ollama (placeholder on branch h13a; replaced by branch h13b).

The export dispatcher (:mod:`lorakit.io.targets`) calls these two functions for ``target="llama.cpp"`` and
``target="ollama"``; branch h13b implements them with the ``gguf`` package.
"""
from __future__ import annotations

import os
from typing import Any

from torch import nn


def write_lora_adapter(model: nn.Module, name: str, folder: str | os.PathLike) -> dict[str, Any]:
    """Write adapter ``name`` as a llama.cpp GGUF LoRA adapter into ``folder``; returns what was written.

    Example:
        >>> callable(write_lora_adapter)
        True
    """
    raise NotImplementedError("GGUF writing is replaced by branch h13b")


def write_merged_model(model: nn.Module, folder: str | os.PathLike, dtype: str = "f16") -> dict[str, Any]:
    """Write the model with its active adapters merged as a GGUF model plus an Ollama ``Modelfile``.

    Example:
        >>> callable(write_merged_model)
        True
    """
    raise NotImplementedError("GGUF writing is replaced by branch h13b")
