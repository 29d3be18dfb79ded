"""Save and load adapters: a folder with one safetensors file and one JSON file. Nothing is ever unpickled.

Layout of a lorakit adapter folder::

    lorakit_config.json          {"format": "lorakit", "version": 1, "adapters": {name: {config, layers, ...}}}
    lorakit_weights.safetensors  keys "<adapter>|layer|<layer path>|<tensor>", "<adapter>|shared||<tensor>",
                                 "<adapter>|module|<module path>|<tensor>" (the adapter's own copy of
                                 each modules_to_save module, under the original module's path)

Writes go to a temporary folder that replaces the target in one rename, so a crash never leaves half a save.
A folder holding PEFT's ``adapter_config.json`` is read and written by :mod:`lorakit.peft_format`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .layers import AdaptedLayer
from .model import _registry, adapted_layers, build_plan, commit_plan, delete, registry, set_active

CONFIG_FILE = "lorakit_config.json"
WEIGHTS_FILE = "lorakit_weights.safetensors"
FORMAT_VERSION = 1
SEP = "|"


class AdapterLoadError(ValueError):
    """An adapter folder does not fit the model (missing/unexpected keys, wrong shapes, bad config)."""


def _key(adapter: str, kind: str, path: str, tensor: str) -> str:
    return SEP.join((adapter, kind, path, tensor))


def _atomic_folder(path: Path, write) -> None:
    """Call ``write(tmp_folder)`` then move the folder into place in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank must call it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name`` under its save key (layers, shared state, modules_to_save)."""
    from .model import saved_copy

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


def save(model: nn.Module, path: str | os.PathLike, names: str | Sequence[str] | None = None,
         format: str = "lorakit", convert_pissa: bool = False, write_files: bool = True, **kwargs: Any) -> Path:
    """Save adapters (default: all) to folder ``path`` atomically; returns the folder.

    ``format="peft"`` writes PEFT's layout instead (see :mod:`lorakit.peft_format`).
    A PiSSA adapter is saved with its initial factors, so :func:`load` re-creates the residual base from the
    original weights. ``convert_pissa=True`` instead writes it as a plain rank-2r LoRA,
    ``s·[B | -B0]·[A ; A0]``, usable on the original weights by any LoRA loader (methods.md §12).

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
        from .peft_format import save_peft

        return save_peft(model, path, names, **kwargs)
    if format != "lorakit":
        raise ValueError(f"save(format={format!r}) is invalid; allowed: lorakit, peft")
    if kwargs:
        raise TypeError(f"save() got unexpected arguments {sorted(kwargs)}")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": "lorakit", "version": FORMAT_VERSION, "adapters": {}}
    for name in names:
        config = reg.configs[name]
        state = adapter_state(model, name)
        if convert_pissa and config.init in ("pissa", "pissa_fast"):
            config, state = _pissa_as_lora(model, name, state)
        for key, t in state.items():
            tensors[key] = full_tensor(t).detach().to("cpu").contiguous().clone()
        meta["adapters"][name] = {
            "config": config.to_dict(),
            "layers": reg.layers[name],
            "modules_to_save": reg.modules_to_save.get(name, []),
            "extra": reg.extra.get(name, {}),
        }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "lorakit"})
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default))

    if write_files:  # under FSDP every rank gathers (above) but only one writes
        _atomic_folder(Path(path), write)
    return Path(path)


def _pissa_as_lora(model: nn.Module, name: str, state: dict[str, torch.Tensor]):
    """Rewrite a PiSSA adapter's tensors and config as a plain LoRA of rank 2r on the original weights."""
    reg = registry(model)
    config = reg.configs[name]
    out = {k: v for k, v in state.items() if k.split(SEP)[1] != "layer"}
    ranks, alphas = {}, {}
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            a, b, s = layer.adapters[name].as_lora_factors()
            out[_key(name, "layer", path, "A")] = a
            out[_key(name, "layer", path, "B")] = b
            ranks[path], alphas[path] = a.shape[0], s * a.shape[0]
    new = config.replace(init="kaiming", scaling="standard", r=max(ranks.values()), alpha=None,
                         rank_pattern=ranks, alpha_pattern=alphas)
    return new, out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a lorakit folder's JSON and tensors (safetensors only), with clear errors for missing files."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    cfg_file, w_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_file.exists() or not w_file.exists():
        raise AdapterLoadError(
            f"{str(folder)!r} is not a lorakit adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(or PEFT's adapter_config.json + adapter_model.safetensors)"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{cfg_file}: invalid JSON ({err})") from None
    if meta.get("format") != "lorakit" or not isinstance(meta.get("adapters"), dict):
        raise AdapterLoadError(f"{cfg_file}: not a lorakit adapter config (missing format/adapters)")
    return meta, load_file(str(w_file))


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
    folder = Path(path)
    if not (folder / CONFIG_FILE).exists():
        from .peft_format import is_peft_folder, load_peft

        if is_peft_folder(folder):  # one PEFT adapter, or PEFT's multi-adapter layout (named subfolders)
            return load_peft(model, folder, name=name, trainable=trainable)
    meta, tensors = read_folder(folder)
    saved = meta["adapters"]
    if name is None:
        chosen = [(n, n) for n in saved]
    elif len(saved) == 1:
        chosen = [(next(iter(saved)), name)]
    elif name in saved:
        chosen = [(name, name)]
    else:
        raise AdapterLoadError(f"{folder} holds adapters {list(saved)}; name={name!r} is none of them")
    reg = _registry(model)
    taken = [new for _, new in chosen if reg is not None and new in reg.configs]
    if taken:
        raise AdapterLoadError(f"adapter name(s) {taken} already exist on the model; pass name=... or delete them")
    done: list[str] = []
    try:
        for saved_name, new_name in chosen:
            _load_one(model, saved[saved_name], tensors, saved_name, new_name, trainable, folder)
            done.append(new_name)
    except Exception:
        for n in reversed(done):  # roll back what this call loaded, so the model is as it was
            delete(model, n)
        raise
    set_active(model, [new for _, new in chosen])
    return model


def _load_one(model: nn.Module, entry: dict[str, Any], tensors: dict[str, torch.Tensor], saved_name: str,
              new_name: str, trainable: bool, folder: Path) -> None:
    try:
        config = AdapterConfig.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterLoadError(f"{folder}: adapter {saved_name!r} has an invalid config: {err}") from None
    layers = list(entry.get("layers", []))
    located = config.replace(targets=layers, exclude=None) if layers else config
    plan = build_plan(model, located, new_name, init=False)
    plan.config = config
    prefix = saved_name + SEP
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected: dict[str, tuple[Any, str, str]] = {}
    for path, layer, _, adapter, _ in plan.entries:
        for tname in adapter.export_state():
            expected[SEP.join(("layer", path, tname))] = (adapter, tname, path)
    if plan.shared is not None:
        for tname in plan.shared.state_dict():
            expected[SEP.join(("shared", "", tname))] = (plan.shared, tname, "")
    for mpath, _, _, own in plan.copies:  # the new adapter's copies, built on the side
        for tname in own.state_dict():
            expected[SEP.join(("module", mpath, tname))] = (own, tname, mpath)
    missing = sorted(set(expected) - set(mine))
    unexpected = sorted(set(mine) - set(expected))
    if missing or unexpected:
        raise AdapterLoadError(
            f"{folder}: adapter {saved_name!r} does not fit this model; "
            f"missing keys: {_few(missing)}; unexpected keys: {_few(unexpected)}"
        )
    for key, (owner, tname, _) in expected.items():
        have = owner.state_dict()[tname]
        if tuple(have.shape) != tuple(mine[key].shape):
            raise AdapterLoadError(f"{folder}: {key} has shape {tuple(mine[key].shape)}, the model needs "
                                   f"{tuple(have.shape)} (was it saved from a different model or config?)")
    # everything fits: fill the new adapters (not yet part of the model), then commit
    for path, layer, _, adapter, _ in plan.entries:
        adapter.import_state({t: mine[SEP.join(("layer", path, t))] for t in adapter.export_state()})
    if plan.shared is not None:
        plan.shared.load_state_dict({t: mine[SEP.join(("shared", "", t))] for t in plan.shared.state_dict()})
    for mpath, _, _, own in plan.copies:
        own.load_state_dict({t: mine[SEP.join(("module", mpath, t))] for t in own.state_dict()})
    plan.entries = [
        (path, layer, is_new, adapter, _shifted_base(layer, adapter)) for path, layer, is_new, adapter, _ in plan.entries
    ]
    commit_plan(model, plan, make_active=False, trainable=trainable)
    registry(model).extra[new_name] = dict(entry.get("extra", {}))


def _shifted_base(layer: AdaptedLayer, adapter: Any) -> torch.Tensor | None:
    shift = adapter.base_shift()
    if shift is None:
        return None
    return layer.ops.weight_matrix(torch.float32) + shift.to(layer.ops.device())


def _few(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def restore(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a saved folder's tensors into the model's *existing* adapters of the same names (used by resume).

    Keys and shapes are checked before anything changes; base-weight shifts (PiSSA, Delta-LoRA) are moved from
    the current value to the saved one.
    """
    from .model import saved_copy

    meta, tensors = read_folder(path)
    reg = registry(model)
    for name in meta["adapters"]:
        if name not in reg.configs:
            raise AdapterLoadError(f"{path}: adapter {name!r} is not attached to this model (have {list(reg.configs)})")
        current = adapter_state(model, name)
        saved = {k: v for k, v in tensors.items() if k.startswith(name + SEP)}
        missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        if missing or unexpected:
            raise AdapterLoadError(f"{path}: adapter {name!r} does not match; missing keys: {_few(missing)}; "
                                   f"unexpected keys: {_few(unexpected)}")
        bad = [k for k in current if tuple(current[k].shape) != tuple(saved[k].shape)]
        if bad:
            raise AdapterLoadError(f"{path}: shapes differ for {_few(bad)}")
    for name, entry in meta["adapters"].items():
        for path_, layer in adapted_layers(model):
            if name not in layer.adapters:
                continue
            adapter = layer.adapters[name]
            before = adapter.base_shift()
            prefix = SEP.join((name, "layer", path_, ""))
            adapter.import_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            after = adapter.base_shift()
            if before is not None or after is not None:
                b = 0 if before is None else before
                a = 0 if after is None else after.to(layer.ops.device())
                layer._apply_weight(lambda w, a=a, b=b: w - b + a)
        if name in reg.shared:
            prefix = SEP.join((name, "shared", "", ""))
            reg.shared[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for mpath in reg.modules_to_save.get(name, []):
            prefix = SEP.join((name, "module", mpath, ""))
            saved_copy(model, mpath, name).load_state_dict(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        reg.extra[name] = dict(entry.get("extra", {}))
