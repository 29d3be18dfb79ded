"""lorakit's own adapter layout: writing it, reading and checking it, and restoring saved tensors for resume.

Layout of a lorakit adapter folder::

    lorakit_config.json          {"format": "lorakit", "version": 1, "adapters": {name: {config, layers, ...}}}
    lorakit_weights.safetensors  keys "<adapter>|layer|<layer path>|<tensor>", "<adapter>|shared||<tensor>",
                                 "<adapter>|module|<module path>|<tensor>" (the adapter's own copy of
                                 each modules_to_save module, under the original module's path)

Saving never deletes what lorakit did not write: a new folder appears in one rename; into an existing folder each of
lorakit's files is replaced by its own atomic rename (weights first, config last) and every other file stays. Both
files of one save carry the same random ``save_id`` (config key ``save_id``, safetensors metadata
``lorakit_save_id``), so a folder whose two files come from different saves (a process killed between the two
renames) is refused on load as "interrupted" instead of loading a mixed adapter. Loading validates the config,
the file's integrity, dtypes and finiteness before the model changes, and rolls back completely on any error.

:func:`load_lorakit` hands the adapters it read to :func:`lorakit.io.loader.install_adapters`, the loader PEFT
folders (translated into this layout by :mod:`lorakit.io.peft`) go through too. :mod:`lorakit.io.api` picks the
format of a folder.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import AdapterConfig
from ..methods import get_method
from ..model import check_adapter_name
from ..registry import adapted_layers, adapter_entries, registry, saved_copy
from .files import (SEP, AdapterLoadError, atomic_folder, check_save_target, full_tensor, interrupted_save,
                    read_safetensors, refuse_non_finite, write_new_file)
from .loader import AdapterToLoad, check_dtype, choose_adapters, few_keys, install_adapters

CONFIG_FILE = "lorakit_config.json"
WEIGHTS_FILE = "lorakit_weights.safetensors"
FORMAT_VERSION = 1
#: the config file of the other format: a lorakit adapter is never saved next to one
PEFT_CONFIG_FILE = "adapter_config.json"


def _key(adapter: str, kind: str, path: str, tensor: str) -> str:
    return SEP.join((adapter, kind, path, tensor))


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name`` under its save key (layers, shared state, modules_to_save)."""
    reg = registry(model)
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            for tname, t in layer.adapters[name].export_state().items():
                out[_key(name, "layer", path, tname)] = t
    if name in reg.shared:
        for tname, t in reg.shared[name].state_dict().items():
            out[_key(name, "shared", "", tname)] = t
    for mpath in reg.modules_to_save.get(name, []):  # the adapter's own copy, under the original's path
        for tname, t in saved_copy(model, mpath, name).state_dict().items():
            out[_key(name, "module", mpath, tname)] = t
    return out


def save_lorakit(model: nn.Module, path: str | os.PathLike, names: Sequence[str], convert_pissa: bool = False,
                 write_files: bool = True) -> Path:
    """Save adapters ``names`` in lorakit's layout to folder ``path`` atomically (see :func:`lorakit.io.save`).

    ``write_files=False`` gathers every tensor (under FSDP a collective on every rank) without writing.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = save_lorakit(net, tempfile.mkdtemp() + "/adapter", ["default"])
        >>> sorted(p.name for p in folder.iterdir())
        ['lorakit_config.json', 'lorakit_weights.safetensors']
    """
    reg = registry(model)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": "lorakit", "version": FORMAT_VERSION, "adapters": {}}
    # everything is gathered into memory first (cpu copies, FSDP shards made whole), so the write below cannot see
    # a tensor change halfway and a failure before it leaves no file behind
    for name in names:
        config = reg.configs[name]
        state = adapter_state(model, name)
        if convert_pissa:  # the strategy's plain-LoRA form for the original base (PiSSA), if it has one
            config, state = _as_plain_lora(model, name, config, state)
        for key, t in state.items():
            tensors[key] = full_tensor(t).detach().to("cpu").contiguous().clone()
        meta["adapters"][name] = {
            "config": config.to_dict(),
            "layers": reg.layers[name],
            "modules_to_save": reg.modules_to_save.get(name, []),
            "extra": reg.extra.get(name, {}),  # what the method recorded (the base it needs, reports)
        }
    refuse_non_finite(tensors, f"save({str(path)!r})")  # before anything is written

    # one id in both files: a folder whose weights and config come from different saves is refused on load
    meta["save_id"] = uuid.uuid4().hex
    config_text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE),
                  metadata={"format": "lorakit", "lorakit_save_id": meta["save_id"]})
        write_new_file(folder / CONFIG_FILE, config_text.encode("utf-8"))

    if write_files:  # under FSDP every rank gathers (above) but only one writes
        check_save_target(Path(path), "lorakit", PEFT_CONFIG_FILE, "PEFT")
        atomic_folder(Path(path), write)
    return Path(path)


def _as_plain_lora(model: nn.Module, name: str, config: AdapterConfig, state: dict[str, torch.Tensor]
                   ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Adapter ``name``'s config and tensors as the plain LoRA its strategy converts it to (PiSSA's rank-2r form);
    unchanged when the strategy has no other form."""
    entries = adapter_entries(model, name)
    plain = get_method(config.method).as_plain_lora(config, entries)
    if plain is None:
        return config, state
    new_config, layers = plain
    out = {k: v for k, v in state.items() if k.split(SEP)[1] != "layer"}
    for path, named in layers.items():
        for tname, t in named.items():
            out[_key(name, "layer", path, tname)] = t
    return new_config, out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a lorakit folder's JSON and tensors (safetensors only; nothing is unpickled).

    Raises :class:`AdapterLoadError` naming the file and the key for: a config that is not lorakit's (or not a
    JSON object), an unknown format ``version`` (a newer lorakit's), an invalid adapter entry or config value, a
    weights file that is corrupt or incomplete, non-finite values, and weights and config from different saves.
    """
    folder = Path(path)
    if folder.is_file():
        raise NotADirectoryError(f"{str(folder)!r} is a file; pass the adapter folder (the one holding its "
                                 f"config and weights files)")
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    cfg_file, w_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    interrupted = interrupted_save(folder)
    if interrupted:
        raise AdapterLoadError(interrupted)
    if not cfg_file.exists() or not w_file.exists():
        raise AdapterLoadError(
            f"{str(folder)!r} is not a lorakit adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(or PEFT's adapter_config.json + adapter_model.safetensors)"
        )
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{cfg_file}: invalid JSON ({err})") from None
    _check_meta(meta, cfg_file)
    tensors, file_meta = read_safetensors(w_file)
    saved_id, file_id = meta.get("save_id"), file_meta.get("lorakit_save_id")
    if saved_id is not None and file_id is not None and saved_id != file_id:
        raise AdapterLoadError(
            f"{folder}: {WEIGHTS_FILE} and {CONFIG_FILE} come from different saves (save_id {file_id} vs "
            f"{saved_id}): a save into this folder was interrupted between writing the two files (or one file was "
            f"copied in from another save). Save the adapter again (e.g. resume from an intact checkpoint)")
    return meta, tensors


def _check_meta(meta: Any, cfg_file: Path) -> None:
    """Validate the structure of a lorakit_config.json (every key it needs, of the right type), naming the key."""
    if not isinstance(meta, dict):
        raise AdapterLoadError(f"{cfg_file}: must hold a JSON object {{\"format\": \"lorakit\", \"version\": ..., "
                               f"\"adapters\": {{...}}}}, got a JSON {type(meta).__name__}")
    if meta.get("format") != "lorakit":
        raise AdapterLoadError(f"{cfg_file}: not a lorakit adapter config (\"format\" is {meta.get('format')!r}, "
                               f"expected \"lorakit\")")
    version = meta.get("version")
    if "version" not in meta:
        raise AdapterLoadError(f"{cfg_file}: the key \"version\" is missing (lorakit writes \"version\": "
                               f"{FORMAT_VERSION}); the file is damaged or not written by lorakit")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AdapterLoadError(f"{cfg_file}: \"version\" must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterLoadError(f"{cfg_file}: written by a newer lorakit (format version {version}; this lorakit reads "
                               f"up to {FORMAT_VERSION}); upgrade lorakit to load it")
    adapters = meta.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise AdapterLoadError(f"{cfg_file}: \"adapters\" must be a non-empty JSON object {{name: {{...}}}}, got "
                               f"{adapters!r:.80}")
    if "save_id" in meta and not isinstance(meta["save_id"], str):
        raise AdapterLoadError(f"{cfg_file}: \"save_id\" must be a string, got {meta['save_id']!r:.80}")
    for name, entry in adapters.items():
        where = f"{cfg_file}: adapters[{name!r}]"
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise AdapterLoadError(f"{where}: {err}") from None
        if not isinstance(entry, dict):
            raise AdapterLoadError(f"{where} must be a JSON object with \"config\", \"layers\", \"modules_to_save\", "
                                   f"\"extra\"; got {entry!r:.80}")
        if not isinstance(entry.get("config"), dict):
            raise AdapterLoadError(f"{where}: \"config\" must be a JSON object of AdapterConfig fields, got "
                                   f"{entry.get('config')!r:.80}")
        try:
            AdapterConfig.from_dict(entry["config"])
        except (TypeError, ValueError) as err:
            raise AdapterLoadError(f"{where}: invalid \"config\": {err}") from None
        for key in ("layers", "modules_to_save"):
            value = entry.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise AdapterLoadError(f"{where}: \"{key}\" must be a list of module paths, got {value!r:.80}")
        if not isinstance(entry.get("extra", {}), dict):
            raise AdapterLoadError(f"{where}: \"extra\" must be a JSON object, got {entry.get('extra')!r:.80}")


def load_lorakit(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 trainable: bool = False) -> nn.Module:
    """Load the adapters of a lorakit folder into ``model`` (see :func:`lorakit.io.load`); they become active.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/adapter")
        >>> _ = load_lorakit(torch.nn.Sequential(torch.nn.Linear(4, 4)), folder)
    """
    return install_adapters(model, lorakit_adapters(model, path, name), trainable)


def lorakit_adapters(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                     new_names: bool = True) -> list[AdapterToLoad]:
    """The adapters of a lorakit folder that :func:`load_lorakit` would install (chosen by ``name`` as there), read
    and checked against the model's modules; nothing changes. ``new_names=False`` lets them have names the model
    already uses (:func:`lorakit.hotswap` replaces one).

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/adapter")
        >>> [item.new_name for item in lorakit_adapters(net, folder, new_names=False)]
        ['default']
    """
    folder = Path(path)
    meta, tensors = read_folder(folder)
    cfg_file = folder / CONFIG_FILE
    saved = meta["adapters"]
    chosen = choose_adapters(model, list(saved), name, folder, new_names=new_names)
    for saved_name, _ in chosen:
        for key in ("layers", "modules_to_save"):
            for mpath in saved[saved_name].get(key, []):
                try:
                    model.get_submodule(mpath)
                except AttributeError:
                    raise AdapterLoadError(f"{cfg_file}: adapters[{saved_name!r}][{key!r}] names module {mpath!r}, "
                                           f"which this model does not have (was it saved from another model?)"
                                           ) from None
    return [AdapterToLoad(saved[s], tensors, s, new, folder, folder / WEIGHTS_FILE) for s, new in chosen]


def restore(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a saved folder's tensors into the model's *existing* adapters of the same names (used by resume).

    Keys, shapes and dtypes are checked before anything changes; base-weight shifts (PiSSA, Delta-LoRA) are moved
    from the current value to the saved one. Adapters merged into the base weights are refused (ValueError): new
    values under a merged delta would make ``unmerge`` subtract the wrong delta and corrupt the base.
    """
    # every check runs before the first value is copied: a folder that does not fit leaves the adapters as they were
    meta, tensors = read_folder(path)
    reg = registry(model)
    merged = sorted({n for _, layer in adapted_layers(model) for n in layer.merged if n in meta["adapters"]})
    if merged:
        raise ValueError(f"restore(): adapter(s) {merged} are merged into the base weights; restoring into them would "
                         f"corrupt the base on unmerge. Call lorakit.unmerge(model) first, restore, then merge again")
    for name in meta["adapters"]:
        if name not in reg.configs:
            raise AdapterLoadError(f"{path}: adapter {name!r} is not attached to this model (have {list(reg.configs)})")
        current = adapter_state(model, name)
        saved = {k: v for k, v in tensors.items() if k.startswith(name + SEP)}
        missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        if missing or unexpected:
            raise AdapterLoadError(f"{path}: adapter {name!r} does not match; missing keys: {few_keys(missing)}; "
                                   f"unexpected keys: {few_keys(unexpected)}")
        bad = [k for k in current if tuple(current[k].shape) != tuple(saved[k].shape)]
        if bad:
            raise AdapterLoadError(f"{path}: shapes differ for {few_keys(bad)}")
        for k in current:
            check_dtype(current[k], saved[k], f"{Path(path) / WEIGHTS_FILE}: tensor {k!r}")
    # then the copy: layer tensors, shared state, the adapter's own module copies, its method records
    for name, entry in meta["adapters"].items():
        for path_, layer in adapted_layers(model):
            if name not in layer.adapters:
                continue
            adapter = layer.adapters[name]
            before = adapter.base_shift()
            prefix = SEP.join((name, "layer", path_, ""))
            adapter.import_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            after = adapter.base_shift()
            # a shift lives in the base weight itself: take the current one out and put the saved one in, so the
            # base ends as W0 + saved shift
            if before is not None or after is not None:
                b = 0 if before is None else before
                a = 0 if after is None else after.to(layer.ops.device())
                layer.change_base_weight(lambda w, a=a, b=b: w - b + a)
        if name in reg.shared:
            prefix = SEP.join((name, "shared", "", ""))
            reg.shared[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for mpath in reg.modules_to_save.get(name, []):
            prefix = SEP.join((name, "module", mpath, ""))
            saved_copy(model, mpath, name).load_state_dict(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        reg.extra[name] = dict(entry.get("extra", {}))
