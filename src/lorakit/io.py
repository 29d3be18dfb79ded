"""Save and load adapters: a folder with one safetensors file and one JSON file. Nothing is ever unpickled.

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
A folder holding PEFT's ``adapter_config.json`` is read and written by :mod:`lorakit.peft_format`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig
from .layers import AdaptedLayer
from .model import _check_name, _registry, adapted_layers, build_plan, commit_plan, delete, registry, set_active

CONFIG_FILE = "lorakit_config.json"
WEIGHTS_FILE = "lorakit_weights.safetensors"
FORMAT_VERSION = 1
SEP = "|"


class AdapterLoadError(ValueError):
    """An adapter folder does not fit the model (missing/unexpected keys, wrong shapes, bad config)."""


def _key(adapter: str, kind: str, path: str, tensor: str) -> str:
    return SEP.join((adapter, kind, path, tensor))


# ---------------------------------------------------------------------------------------------------------------
# atomic writes that never delete what lorakit did not write
# ---------------------------------------------------------------------------------------------------------------
# Every temporary lorakit creates is named ".<prefix>lorakit-tmp-<host>-<pid>-<hex>", so a later save can tell its own
# leftovers (from a process that was killed) from anybody else's files and remove only those.
_TMP_TAG = "lorakit-tmp"
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TMP_RE = re.compile(r"\.(?P<prefix>.*)" + _TMP_TAG + r"-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _tmp_name(prefix: str = "") -> str:
    return f".{prefix}{_TMP_TAG}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _clean_stale(directory: Path, prefix: str | None) -> list[Path]:
    """Remove temporaries named by lorakit for ``prefix`` (None: any) in ``directory`` whose process (on this host)
    is gone; returns what was removed."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TMP_RE.fullmatch(entry.name)
        if (m and (prefix is None or m["prefix"] == prefix) and m["host"] == _HOST
                and not _pid_alive(int(m["pid"]))):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed lorakit writes (of processes on this host that no longer run) left in
    ``directory``; nothing else is touched. Returns the removed paths.

    Example:
        >>> import tempfile
        >>> remove_stale_temporaries(tempfile.mkdtemp())
        []
    """
    return _clean_stale(Path(directory), None)


def _remove_tree(path: Path) -> None:
    """Remove one of our temporaries; tried twice (a transient error must not leave it behind). A temporary that
    still cannot be removed is removed by a later save once this process has ended."""
    for _ in range(2):
        if not os.path.lexists(path):
            return
        shutil.rmtree(path, ignore_errors=True)


def _make_dir(path: Path) -> None:
    os.mkdir(path, 0o777)  # mode 0777 & ~umask, like any other writer (mkdtemp would give 0700)


def _write_bytes(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) holding ``data``, with the umask's permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable where the platform allows it (best effort: not every OS/filesystem can)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` (a fresh temporary folder), first giving each the permissions a new file
    gets here: some writers (safetensors' ``save_file``) create files 0600 whatever the umask."""
    probe = root / _tmp_name("probe.")
    _write_bytes(probe, b"")
    mode = stat.S_IMODE(os.stat(probe).st_mode)  # 0666 & ~umask (and default ACLs): what any writer would give
    os.unlink(probe)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath) / name
            if stat.S_IMODE(os.stat(file).st_mode) != mode:
                os.chmod(file, mode)
            _fsync_file(file)
        _fsync_dir(Path(dirpath))


def _plan_commit(src: Path, dst: Path) -> list[tuple[str, Path, Path]]:
    """Actions putting every file under ``src`` at the same place under ``dst``: ("file", s, d) replaces one file,
    ("dir", s, d) moves a whole folder that does not exist yet. Raises ValueError, before any change, if a path
    lorakit must write is taken by something of the other kind. Weights before configs (``*.json`` last), so a
    config never describes weights that are not there yet."""
    actions: list[tuple[str, Path, Path]] = []

    def walk(s: Path, d: Path) -> None:
        for child in sorted(s.iterdir()):
            target = d / child.name
            if child.is_dir():
                if not os.path.lexists(target):
                    actions.append(("dir", child, target))
                elif target.is_dir():
                    walk(child, target)
                else:
                    raise ValueError(f"cannot save: {str(target)!r} exists and is not a folder, but lorakit needs a "
                                     f"folder there; move or rename it (nothing was written)")
            else:
                if target.is_dir():
                    raise ValueError(f"cannot save: {str(target)!r} is a folder, but lorakit writes a file there; "
                                     f"move or rename it (nothing was written)")
                actions.append(("file", child, target))

    walk(src, dst)
    actions.sort(key=lambda a: (a[2].suffix == ".json", -len(a[2].parts), str(a[2])))
    return actions


def _commit(src: Path, dst: Path, work: Path) -> None:
    """Move what ``src`` holds into the existing folder ``dst``, one atomic rename per file (other files untouched).

    Every file about to be replaced is first hard-linked (or copied) into ``work``, so if a rename fails part-way
    the files already replaced are put back and ``dst`` is exactly as before; at no instant is a replaced file
    missing from ``dst``."""
    actions = _plan_commit(src, dst)
    backups: dict[Path, Path] = {}
    keep = work / "previous"
    for i, (kind, _, target) in enumerate(actions):
        if kind == "file" and os.path.lexists(target):
            if not backups:
                _make_dir(keep)
            backup = keep / str(i)
            try:
                os.link(target, backup)
            except OSError:  # no hard links here (some filesystems): a copy does as well
                shutil.copy2(target, backup)
            backups[target] = backup
    done: list[tuple[str, Path, Path]] = []
    try:
        for kind, source, target in actions:
            if kind == "dir":
                os.rename(source, target)
            else:
                os.replace(source, target)
            done.append((kind, source, target))
    except BaseException as err:
        try:
            for kind, source, target in reversed(done):
                if kind == "dir":
                    os.rename(target, source)
                elif target in backups:
                    os.replace(backups[target], target)
                else:
                    os.unlink(target)
        except OSError as again:
            work_kept = work.with_name(work.name.replace(_TMP_TAG, "lorakit-failed-save"))
            with contextlib.suppress(OSError):
                os.rename(work, work_kept)
            raise OSError(f"saving into {str(dst)!r} failed ({err}) and putting the previous files back failed too "
                          f"({again}); the previous versions of the replaced files are kept in {str(work_kept)!r}"
                          ) from err
        raise
    for d in {t.parent for _, _, t in actions}:
        _fsync_dir(d)


def _atomic_folder(path: Path, write) -> None:
    """Write lorakit's files for folder ``path`` with ``write(tmp_folder)``, then put them in place atomically.

    * ``path`` does not exist: ``tmp_folder`` (a hidden sibling) becomes ``path`` in one rename.
    * ``path`` is a folder: each file written is moved into it by its own atomic rename (weights before ``*.json``
      configs; new subfolders move whole); every other file in ``path`` stays as it is, and a failure part-way puts
      back the files already replaced.
    * ``path`` is anything else (a file): ValueError naming it; nothing is written.

    Files are fsynced before they are moved; temporaries are removed on success and on any error, and those left
    by a killed earlier save (named by lorakit, of a process that no longer runs) are removed too. Permissions
    follow the umask.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"cannot save to {str(path)!r}: it exists and is not a folder (lorakit saves a folder); "
                         f"choose another path — the file was left as it is")
    if path.is_dir():
        _clean_stale(path, "")
        work = path / _tmp_name()
        _make_dir(work)
        try:
            new = work / "new"
            _make_dir(new)
            write(new)
            _fsync_tree(new)
            _commit(new, path, work)
        finally:
            _remove_tree(work)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path.parent, path.name + ".")
    tmp = path.parent / _tmp_name(path.name + ".")
    _make_dir(tmp)
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _remove_tree(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, fsync, rename), with the umask's permissions."""
    path = Path(path)
    _clean_stale(path.parent, path.name + ".")
    tmp = path.parent / _tmp_name(path.name + ".")
    try:
        _write_bytes(tmp, text.encode("utf-8"))
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        for _ in range(2):  # twice: a transient error must not leave the temporary behind
            with contextlib.suppress(OSError):
                if os.path.lexists(tmp):
                    os.unlink(tmp)


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

    A new folder appears complete in one rename. Into an existing folder (a run folder, say) only lorakit's own two
    files are replaced, each atomically, weights before config; every other file is left as it is, and a failure
    at any step leaves the previous adapter in place. A ``path`` that is a file, or a folder holding a PEFT adapter,
    is refused with a ValueError (nothing is written). Files and folders get the umask's permissions.

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

    # one id in both files: a folder whose weights and config come from different saves is refused on load
    meta["save_id"] = uuid.uuid4().hex
    config_text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE),
                  metadata={"format": "lorakit", "lorakit_save_id": meta["save_id"]})
        _write_bytes(folder / CONFIG_FILE, config_text.encode("utf-8"))

    if write_files:  # under FSDP every rank gathers (above) but only one writes
        _check_save_target(Path(path), "lorakit")
        _atomic_folder(Path(path), write)
    return Path(path)


def _check_save_target(path: Path, fmt: str) -> None:
    """Refuse to put one format's adapter next to the other's: load would silently pick one of them."""
    other = {"lorakit": "adapter_config.json", "peft": CONFIG_FILE}[fmt]
    if path.is_dir() and (path / other).exists():
        raise ValueError(f"cannot save a {fmt} adapter into {str(path)!r}: it already holds "
                         f"{'a PEFT' if fmt == 'lorakit' else 'a lorakit'} adapter ({other}), and a folder with both "
                         f"would load only one of them. Save to another folder, or remove that adapter's files first")


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
    """Read and check a lorakit folder's JSON and tensors (safetensors only; nothing is unpickled).

    Raises :class:`AdapterLoadError` naming the file and the key for: a config that is not lorakit's (or not a
    JSON object), an unknown format ``version`` (a newer lorakit's), an invalid adapter entry or config value, a
    weights file that is corrupt or incomplete, non-finite values, and weights and config from different saves.
    """
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
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{cfg_file}: invalid JSON ({err})") from None
    _check_meta(meta, cfg_file)
    tensors, file_meta = _read_weights(w_file)
    saved_id, file_id = meta.get("save_id"), file_meta.get("lorakit_save_id")
    if saved_id is not None and file_id is not None and saved_id != file_id:
        raise AdapterLoadError(
            f"{folder}: {WEIGHTS_FILE} and {CONFIG_FILE} come from different saves (save_id {file_id} vs "
            f"{saved_id}): a save into this folder was interrupted between writing the two files (or one file was "
            f"copied in from another save). Save the adapter again (e.g. resume from an intact checkpoint)")
    return meta, tensors


def _read_weights(w_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; AdapterLoadError naming the file if it is corrupt or incomplete,
    or naming the tensor if it holds NaN/inf."""
    try:
        with safe_open(str(w_file), framework="pt") as f:
            file_meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, RuntimeError, TypeError) as err:
        raise AdapterLoadError(f"{w_file}: the file is corrupt or incomplete and cannot be read as safetensors "
                               f"({err}); save the adapter again or restore the file from a copy") from None
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise AdapterLoadError(f"{w_file}: tensor {key!r} holds non-finite values (NaN or inf); lorakit does not "
                                   f"load them (the run that saved it diverged: lower the learning rate, or use an "
                                   f"earlier checkpoint)")
    return tensors, file_meta


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
            _check_name(name)
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


def _snapshot(model: nn.Module, module_paths: list[str]) -> dict[str, Any]:
    """What a load changes besides adding adapters: modules_to_save weights, trainable flags, active adapters."""
    reg = _registry(model)
    modules = {}
    for p in module_paths:
        with contextlib.suppress(AttributeError):
            modules[p] = {k: v.detach().clone() for k, v in model.get_submodule(p).state_dict().items()}
    return {"modules": modules, "grad": [(p, p.requires_grad) for p in model.parameters()],
            "active": list(reg.active) if reg is not None else None, "weights": []}


def _roll_back(model: nn.Module, snap: dict[str, Any], loaded: list[str]) -> None:
    for n in reversed(loaded):
        delete(model, n)
    for layer, weight in reversed(snap["weights"]):  # exact base weights (delete's undo of a shift may round)
        layer.ops.set_weight_matrix(weight)
        for adapter in layer.adapters.values():
            adapter.on_base_changed()
    for mpath, state in snap["modules"].items():
        model.get_submodule(mpath).load_state_dict(state)
    for p, flag in snap["grad"]:
        p.requires_grad_(flag)
    reg = _registry(model)
    if reg is not None and snap["active"] is not None:
        set_active(model, [n for n in snap["active"] if n in reg.configs])


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
    cfg_file = folder / CONFIG_FILE
    saved = meta["adapters"]
    if name is None:
        chosen = [(n, n) for n in saved]
    elif len(saved) == 1:
        chosen = [(next(iter(saved)), name)]
    elif name in saved:
        chosen = [(name, name)]
    else:
        raise AdapterLoadError(f"{folder} holds adapters {list(saved)}; name={name!r} is none of them")
    for _, new_name in chosen:
        _check_name(new_name)
    reg = _registry(model)
    taken = [new for _, new in chosen if reg is not None and new in reg.configs]
    if taken:
        raise AdapterLoadError(f"adapter name(s) {taken} already exist on the model; pass name=... or delete them")
    for saved_name, _ in chosen:
        for key in ("layers", "modules_to_save"):
            for mpath in saved[saved_name].get(key, []):
                try:
                    model.get_submodule(mpath)
                except AttributeError:
                    raise AdapterLoadError(f"{cfg_file}: adapters[{saved_name!r}][{key!r}] names module {mpath!r}, "
                                           f"which this model does not have (was it saved from another model?)"
                                           ) from None
    if len(chosen) > 1:  # check every adapter against the unchanged model before committing any
        for saved_name, new_name in chosen:
            _prepare_one(model, saved[saved_name], tensors, saved_name, new_name, folder)
    snapshot = _snapshot(model, [m for s_, _ in chosen for m in saved[s_].get("modules_to_save", [])])
    done: list[str] = []
    try:
        for saved_name, new_name in chosen:
            _load_one(model, saved[saved_name], tensors, saved_name, new_name, trainable, folder, snapshot)
            done.append(new_name)
    except BaseException:  # roll back what this call changed (also on Ctrl-C), so the model is as it was
        _roll_back(model, snapshot, done)
        raise
    set_active(model, [new for _, new in chosen])
    return model


def _prepare_one(model: nn.Module, entry: dict[str, Any], tensors: dict[str, torch.Tensor], saved_name: str,
                 new_name: str, folder: Path):
    """Build adapter ``saved_name`` on the side and check every key, shape and dtype; the model is not changed."""
    try:
        config = AdapterConfig.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterLoadError(f"{folder}: adapter {saved_name!r} has an invalid config: {err}") from None
    layers = list(entry.get("layers", []))
    located = config.replace(targets=layers, exclude=None) if layers else config
    try:
        plan = build_plan(model, located, new_name, init=False)
    except (TypeError, ValueError) as err:
        if isinstance(err, AdapterLoadError):
            raise
        raise AdapterLoadError(f"{folder}: adapter {saved_name!r} does not fit this model: {err}") from None
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
        _check_dtype(have, mine[key], f"{folder / WEIGHTS_FILE}: tensor {saved_name + SEP + key!r}")
    return plan, mine


def _check_dtype(have: torch.Tensor, got: torch.Tensor, what: str) -> None:
    """Floating tensors must be saved as floating ones (and integer ones as integers): a cast would change values."""
    if have.is_floating_point() != got.is_floating_point() or have.is_complex() != got.is_complex():
        raise AdapterLoadError(f"{what} is {str(got.dtype).replace('torch.', '')}, but the model needs a "
                               f"{str(have.dtype).replace('torch.', '')} tensor there; the file was damaged or "
                               f"written by another tool")


def _load_one(model: nn.Module, entry: dict[str, Any], tensors: dict[str, torch.Tensor], saved_name: str,
              new_name: str, trainable: bool, folder: Path, snapshot: dict[str, Any] | None = None) -> None:
    plan, mine = _prepare_one(model, entry, tensors, saved_name, new_name, folder)
    # everything fits: fill the new adapters (not yet part of the model), then commit
    for path, layer, _, adapter, _ in plan.entries:
        adapter.import_state({t: mine[SEP.join(("layer", path, t))] for t in adapter.export_state()})
    if plan.shared is not None:
        plan.shared.load_state_dict({t: mine[SEP.join(("shared", "", t))] for t in plan.shared.state_dict()})
    for mpath, _, _, own in plan.copies:
        own.load_state_dict({t: mine[SEP.join(("module", mpath, t))] for t in own.state_dict()})
    plan.entries = [entry._replace(init_result=_shifted_base(entry.layer, entry.adapter)) for entry in plan.entries]
    if snapshot is not None:  # base weights a shift will change, kept exactly for a rollback
        snapshot["weights"].extend((layer, layer.ops.weight_matrix().clone())
                                   for _, layer, _, _, shifted in plan.entries if shifted is not None)
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

    Keys, shapes and dtypes are checked before anything changes; base-weight shifts (PiSSA, Delta-LoRA) are moved
    from the current value to the saved one. Adapters merged into the base weights are refused (ValueError): new
    values under a merged delta would make ``unmerge`` subtract the wrong delta and corrupt the base.
    """
    from .model import saved_copy

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
            raise AdapterLoadError(f"{path}: adapter {name!r} does not match; missing keys: {_few(missing)}; "
                                   f"unexpected keys: {_few(unexpected)}")
        bad = [k for k in current if tuple(current[k].shape) != tuple(saved[k].shape)]
        if bad:
            raise AdapterLoadError(f"{path}: shapes differ for {_few(bad)}")
        for k in current:
            _check_dtype(current[k], saved[k], f"{Path(path) / WEIGHTS_FILE}: tensor {k!r}")
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
