"""The two public verbs, :func:`save` and :func:`load`: they pick the format and hand over to its module."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..model import registry
from .files import AdapterLoadError
from .loader import AdapterToLoad, install_adapters
from .lorakit_format import CONFIG_FILE, lorakit_adapters, save_lorakit
from .peft import PeftFormatError, is_peft_folder, peft_adapters, save_peft


def save(model: nn.Module, path: str | os.PathLike, names: str | Sequence[str] | None = None,
         format: str = "lorakit", convert_pissa: bool = False, write_files: bool = True, **kwargs: Any) -> Path:
    """Save adapters (default: all) to folder ``path`` atomically; returns the folder.

    A new folder appears complete in one rename. Into an existing folder (a run folder, say) only lorakit's own two
    files are replaced, each atomically, weights before config; every other file is left as it is, and a failure
    at any step leaves the previous adapter in place. A ``path`` that is a file, or a folder holding a PEFT adapter,
    is refused with a ValueError (nothing is written). Files and folders get the umask's permissions.

    ``format="peft"`` writes PEFT's layout instead (see :mod:`lorakit.io.peft`; ``kwargs`` go to
    :func:`~lorakit.io.peft.save_peft`). A PiSSA adapter is saved with its initial factors, so :func:`load`
    re-creates the residual base from the original weights. ``convert_pissa=True`` instead writes it as a plain
    rank-2r LoRA, ``s·[B | -B0]·[A ; A0]``, usable on the original weights by any LoRA loader (methods.md §12).

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/adapter")
    """
    reg = registry(model)
    names = list(reg.configs) if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in names if n not in reg.configs]
    if unknown:
        raise ValueError(f"cannot save unknown adapter(s) {unknown}; this model has {list(reg.configs)}")
    if format == "peft":
        return save_peft(model, path, names, **kwargs)
    if format != "lorakit":
        raise ValueError(f"save(format={format!r}) is invalid; allowed: lorakit, peft")
    if kwargs:
        raise TypeError(f"save() got unexpected arguments {sorted(kwargs)}")
    return save_lorakit(model, path, names, convert_pissa=convert_pissa, write_files=write_files)


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, trainable: bool = False) -> nn.Module:
    """Load adapters saved by :func:`save` (or a PEFT adapter folder) into ``model``; they become active.

    ``name=None`` loads every adapter in the folder under its saved name; with one saved adapter ``name`` renames
    it; with several it selects one. Every key and shape is checked first: on any error the model is unchanged.
    ``trainable=False`` loads frozen adapters (inference); ``True`` to continue training.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/adapter")
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.load(fresh, folder)
    """
    adapters, foreign = read_adapters(model, path, name)
    return install_adapters(model, adapters, trainable, foreign=foreign)


def read_adapters(model: nn.Module, path: str | os.PathLike, name: str | None = None, new_names: bool = True
                  ) -> tuple[list[AdapterToLoad], type[AdapterLoadError] | None]:
    """The adapters :func:`load` would install from ``path`` (either format), read and checked, and the error class
    for a translated folder (PEFT's), for :func:`~lorakit.io.loader.install_adapters`; nothing changes.
    ``new_names=False`` lets them have names the model already uses (:func:`lorakit.hotswap`).

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/adapter")
        >>> adapters, foreign = read_adapters(net, folder, new_names=False)
        >>> [a.saved_name for a in adapters], foreign
        (['default'], None)
    """
    folder = Path(path)
    # one PEFT adapter, or PEFT's multi-adapter layout (named subfolders); a lorakit config wins
    if not (folder / CONFIG_FILE).exists() and is_peft_folder(folder):
        return peft_adapters(model, folder, name, new_names), PeftFormatError
    return lorakit_adapters(model, folder, name, new_names), None
