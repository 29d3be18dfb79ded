"""Save and load adapters: lorakit's own folder layout and HF PEFT's, one transactional loader for both.

Nothing is ever unpickled. The package, from the ground up:

* :mod:`~lorakit.io.files` – folder primitives: atomic writes that never touch other files, lorakit's
  temporaries, safetensors reading with the corrupt/NaN checks;
* :mod:`~lorakit.io.loader` – :func:`~lorakit.io.loader.install_adapters`, the one transactional loader both formats
  use (check everything against the unchanged model, commit, roll back everything on failure);
* :mod:`~lorakit.io.lorakit_format` – lorakit's layout (``lorakit_config.json`` + ``lorakit_weights.safetensors``),
  and ``restore`` for resume;
* :mod:`~lorakit.io.peft` – PEFT's key scheme and config, translated to and from lorakit's layout;
* :mod:`~lorakit.io.api` – :func:`save` and :func:`load`, which pick the format;
* :mod:`~lorakit.io.hotswap` – :func:`prepare_hotswap` and :func:`hotswap`: another adapter's values copied into an
  attached one in place (no recompilation of a compiled model).

Example:
    >>> import torch, lorakit, tempfile
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
    >>> folder = save(net, tempfile.mkdtemp() + "/adapter")
    >>> _ = load(torch.nn.Sequential(torch.nn.Linear(4, 4)), folder)
"""
from .api import load, save
from .files import (SEP, AdapterLoadError, atomic_folder, atomic_write_text, check_save_target, full_tensor,
                    read_safetensors, remove_stale_temporaries, write_new_file)
from .hotswap import hotswap, prepare_hotswap
from .loader import AdapterToLoad, build_loaded, choose_adapters, install_adapters
from .lorakit_format import (CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, adapter_state, load_lorakit, read_folder,
                             restore, save_lorakit)

__all__ = ["AdapterLoadError", "AdapterToLoad", "CONFIG_FILE", "FORMAT_VERSION", "SEP", "WEIGHTS_FILE",
           "adapter_state", "atomic_folder", "atomic_write_text", "check_save_target", "choose_adapters",
           "full_tensor", "install_adapters", "load", "load_lorakit", "read_folder", "read_safetensors",
           "remove_stale_temporaries", "restore", "save", "save_lorakit", "write_new_file",
           "build_loaded", "hotswap", "prepare_hotswap"]
