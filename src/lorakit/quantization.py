"""Whole models in 4-bit: quantise, save, load and requantise them, and quantise the layers a saved LoftQ
adapter needs (the QLoRA workflow on top of :class:`~lorakit.quant.Linear4bit`).

:func:`quantize` swaps every ``nn.Linear``/``Conv1D`` for a :class:`~lorakit.quant.Linear4bit` (under its adapters,
if any). :func:`save_quantized` writes a quantised model's own tensors (every tensor of a ``Linear4bit`` is a plain
buffer, so the state dict is safetensors-ready; adapters, if any, in a subfolder) with a JSON description of which
layers are 4-bit; :func:`load_quantized` rebuilds the 4-bit layers in a freshly built full-precision model (a
"skeleton"), without quantising anything again, and loads the packed tensors. :func:`requantize` merges adapters
into a 4-bit base and rounds to NF4 again, measuring the change.

These verbs sit above ``layers``, ``model`` and ``io`` (they swap layers, read the adapters' bookkeeping and save
adapters), so they are not in ``lorakit.quant``, which imports nothing of lorakit outside itself; ``lorakit.quant``
still answers for their names (``from lorakit.quant import quantize`` works) and ``lorakit.quantize`` is
:func:`quantize`.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> _ = quantize(net, compute_dtype=torch.float32, skip=("2",))
    >>> [type(m).__name__ for m in net]
    ['Linear4bit', 'ReLU', 'Linear']
"""
from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig, name_matches
from .io import CONFIG_FILE
from .io import atomic_folder
from .io import load as load_adapters
from .io import save as save_adapters
from .layers import AdaptedLayer, is_conv1d, is_norm, ops_for
from .methods import get_method
from .model import unload
from .registry import adapted_layers, registry_or_none, saved_modules
from .io.peft import PEFT_CONFIG, PEFT_WEIGHTS, PREFIX
from .methods.peft_lora import lora_peft_init
from .quant.linear4bit import COMPUTE_DTYPES, Linear4bit, dtype_name
from .quant.nf4 import check_blocksize

QUANT_CONFIG_FILE = "lorakit_quant.json"
QUANT_WEIGHTS_FILE = "lorakit_quant.safetensors"
ADAPTER_SUBFOLDER = "adapters"


# ---------------------------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------------------------
#: what quantize() leaves in full precision when ``skip`` is not given (QLoRA's choice), where the model has it
DEFAULT_SKIP = ("lm_head",)


def _skipped(path: str, skip: Sequence[str]) -> bool:
    """``path`` or one of the modules containing it is named by a ``skip`` entry (a container skips its layers)."""
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(name_matches(name, prefix) for name in skip for prefix in prefixes)


def _check_skip(model: nn.Module, skip: Sequence[str]) -> None:
    """Every ``skip`` entry must be a valid regex and name at least one module: a typo must not silently quantise
    the layer it meant to keep."""
    paths = [p for p, _ in model.named_modules() if p]
    for name in skip:
        try:
            re.compile(name)
        except re.error as err:
            raise ValueError(f"quantize(skip=...): {name!r} is not a valid regular expression ({err}); give a "
                             "module name, a dotted path suffix, or a regex matching a whole module path") from None
        if not any(name_matches(name, p) for p in paths):
            choices = sorted(set(paths) | {p.rsplit(".", 1)[-1] for p in paths})
            close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"quantize(skip=...): {name!r} matches no module of this model, so nothing would be "
                             f"skipped.{hint} Entries are module names, dotted path suffixes, or regexes matching a "
                             "whole module path.")


def _quant_targets(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Module, str]]:
    """``(path, module, kind)`` of every layer to quantise; kind "plain" or "adapted" (an AdaptedLayer's base)."""
    found = []
    skip_prefixes: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, AdaptedLayer):
            skip_prefixes.append(path + ".")
            base = module.base
            if (isinstance(base, nn.Linear) or is_conv1d(base)) and not _skipped(path, skip):
                if module.merged:
                    raise ValueError(f"{path} has merged adapters {module.merged}; unmerge them before quantize() "
                                     "(or use lorakit.quant.requantize on a merged, unloaded model)")
                found.append((path, module, "adapted"))
            continue
        if path and (isinstance(module, nn.Linear) or is_conv1d(module)) and not _skipped(path, skip):
            found.append((path, module, "plain"))
    return found


def quantize(model: nn.Module, bits: int = 4, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
             skip: Sequence[str] | None = None, blocksize: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) of ``model`` in place by an NF4 :class:`Linear4bit`.

    * ``skip``: modules left in full precision, each given as a module name, a dotted path suffix or a regex
      matching a whole path; a container (e.g. a classification head module) skips every layer inside it. Each
      entry must be a valid regex and match at least one module (else ValueError, with close names). Default
      (None): ``lm_head``, where the model has one, as QLoRA does;
    * norms (:func:`lorakit.layers.is_norm`: torch's norm layers and any module whose class name ends in "Norm") are
      cast to fp32, as QLoRA does;
      every other module keeps its dtype (load the model in bf16 first to reproduce QLoRA's setup exactly);
    * layers already wrapped by lorakit adapters are quantised underneath their adapters (QPiSSA: attach
      ``init="pissa"`` first, then quantise, so the residual is what gets quantised);
    * a Conv1D comes back as a Linear4bit (and, after merging/unloading, as an ``nn.Linear``).

    All layers are quantised first and swapped in at the end, so an error leaves the model unchanged.
    Returns the model.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4))
        >>> _ = lorakit.quantize(net, compute_dtype=torch.float32)
        >>> type(net[0]).__name__
        'Linear4bit'
    """
    if bits != 4:
        raise ValueError(f"quantize(bits={bits!r}) is not supported; only bits=4 (NF4) is implemented")
    check_blocksize(blocksize)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"quantize(compute_dtype={compute_dtype}) is invalid; allowed: torch.float32, "
                         "torch.bfloat16, torch.float16")
    if not isinstance(double_quant, bool):
        raise ValueError(f"quantize(double_quant={double_quant!r}) is invalid; allowed: True or False")
    if skip is None:
        skip = DEFAULT_SKIP
    else:
        if isinstance(skip, str):
            skip = (skip,)
        if not isinstance(skip, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"quantize(skip={skip!r}) must be a sequence of module names or regexes")
        _check_skip(model, skip)
    targets = _quant_targets(model, skip)
    if not targets:
        raise ValueError("quantize() found no nn.Linear/Conv1D layer to quantise (everything skipped?)")
    new = []
    for path, module, kind in targets:
        base = module.base if kind == "adapted" else module
        if not base.weight.dtype.is_floating_point:
            raise ValueError(f"{path}: weight dtype {base.weight.dtype} cannot be quantised")
        new.append((path, module, kind, Linear4bit.from_linear(base, compute_dtype, blocksize, double_quant)))
    # commit
    for path, module, kind, q in new:
        if kind == "adapted":
            module.base = q
            module.ops = ops_for(q)
            for adapter in module.adapters.values():
                adapter.on_base_changed()
        else:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, q)
    for module in model.modules():
        if is_norm(module):
            for p in module.parameters(recurse=False):
                p.data = p.data.float()
    return model


# ---------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------
def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors under their original names: adapters left out, ``x.base.w`` stored as ``x.w`` (and a
    ``modules_to_save`` module's ``x.original.w`` as ``x.w``; the adapters' copies are saved by lorakit.save)."""
    layers = [(p, "base.") for p, _ in adapted_layers(model)] + [(p, "original.") for p, _ in saved_modules(model)]
    out = {}
    for key, t in model.state_dict().items():
        owner = next(((p, inner) for p, inner in layers if key.startswith(p + ".")), None)
        if owner is not None:
            rest = key[len(owner[0]) + 1:]
            if not rest.startswith(owner[1]):
                continue  # adapter tensors are saved by lorakit.save
            key = owner[0] + "." + rest[len(owner[1]):]
        out[key] = t
    return out


def _quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """:meth:`~lorakit.quant.Linear4bit.settings` of every 4-bit layer, under the path of the module it replaced."""
    wrappers = [p for p, _ in saved_modules(model)]  # modules_to_save: the original is the base, copies are not
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, Linear4bit):
            if path.endswith(".base") and isinstance(model.get_submodule(path[:-5]), AdaptedLayer):
                path = path[:-5]
            outer = next((w for w in wrappers if path.startswith(w + ".")), None)
            if outer is not None:
                rest = path[len(outer) + 1:]
                if not rest.startswith("original"):
                    continue
                path = outer + rest[len("original"):]
            found[path] = module.settings()
    return found


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a quantised model to folder ``path`` keeping the packed 4-bit form (safetensors + JSON); any attached
    lorakit adapters go to ``path/adapters`` (as :func:`lorakit.save`). Returns the folder.

    What is written is what the model holds now: for LoftQ/QPiSSA this is the modified quantised base, which is
    what the adapters were initialised against. Merged adapters must be unmerged (or unloaded) first.

    Example:
        >>> import torch, tempfile, lorakit
        >>> net = lorakit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), compute_dtype=torch.float32)
        >>> folder = save_quantized(net, tempfile.mkdtemp() + "/q")
        >>> fresh = load_quantized(torch.nn.Sequential(torch.nn.Linear(64, 8)), folder)
    """
    merged = [p for p, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"save_quantized: layers {merged[:5]} hold merged adapters; call lorakit.unmerge(model) "
                         "(or lorakit.unload) first")
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no 4-bit layer; call lorakit.quantize(model) first")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in _base_state(model).items()}
    dtypes = {k: dtype_name(v.dtype) for k, v in state.items()}
    meta = {"format": "lorakit-quant", "version": 1, "layers": layers, "dtypes": dtypes}
    has_adapters = registry_or_none(model) is not None

    def write(folder: Path) -> None:
        save_file(state, str(folder / QUANT_WEIGHTS_FILE), metadata={"format": "lorakit-quant"})
        (folder / QUANT_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if has_adapters:
            save_adapters(model, folder / ADAPTER_SUBFOLDER)

    atomic_folder(Path(path), write)
    return Path(path)


def load_quantized(model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Load :func:`save_quantized`'s folder into ``model``, a freshly built (full-precision) model of the same
    architecture: the saved 4-bit layers replace its linear layers (nothing is quantised again), every tensor is
    loaded, norms and other tensors take their saved dtypes, and saved adapters are attached (frozen unless
    ``trainable``). Checks names and shapes before changing the model. Returns the model.
    """
    folder = Path(path)
    cfg_file, w_file = folder / QUANT_CONFIG_FILE, folder / QUANT_WEIGHTS_FILE
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(f"{str(folder)!r} is not a save_quantized folder (needs {QUANT_CONFIG_FILE} and "
                                f"{QUANT_WEIGHTS_FILE})")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != "lorakit-quant":
        raise ValueError(f"{cfg_file}: not a lorakit quantised-model description")
    if registry_or_none(model) is not None:
        raise ValueError("load_quantized needs a freshly built model without lorakit adapters")
    tensors = load_file(str(w_file))
    # build the 4-bit layers on the side
    new: dict[str, Linear4bit] = {}
    for lpath, s in meta["layers"].items():
        try:
            old = model.get_submodule(lpath)
        except AttributeError:
            raise ValueError(f"load_quantized: the model has no module {lpath!r} (different architecture?)") from None
        if isinstance(old, Linear4bit):
            shape = (old.out_features, old.in_features)
        elif is_conv1d(old):
            shape = (old.weight.shape[1], old.weight.shape[0])
        elif isinstance(old, nn.Linear):
            shape = tuple(old.weight.shape)
        else:
            raise ValueError(f"load_quantized: {lpath} is {type(old).__name__}; the saved 4-bit layer needs an "
                             "nn.Linear/Conv1D there (pass a freshly built model without adapters)")
        if shape != (s["out_features"], s["in_features"]):
            raise ValueError(f"load_quantized: {lpath} is {type(old).__name__} of shape {shape}, the saved layer "
                             f"is {s['out_features']}x{s['in_features']}")
        new[lpath] = Linear4bit.from_settings(s)
    # check every key and shape of the would-be model
    expected: dict[str, tuple[nn.Module, str, bool]] = {}
    for mpath, module in model.named_modules():
        if any(mpath == p or mpath.startswith(p + ".") for p in new):
            continue
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            expected[f"{mpath}.{name}" if mpath else name] = (module, name, False)
    for lpath, layer in new.items():
        for key in layer.state_dict():
            expected[f"{lpath}.{key}"] = (layer, key, True)
    persistent = set(_persistent_keys(model, new))
    missing = sorted(k for k in persistent if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise ValueError(f"load_quantized: {folder} does not fit this model; missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for key, t in tensors.items():
        owner, name, _ = expected[key]
        have = getattr(owner, name)
        if tuple(have.shape) != tuple(t.shape):
            raise ValueError(f"load_quantized: {key} has shape {tuple(t.shape)}, the model needs {tuple(have.shape)}")
    # commit
    for lpath, layer in new.items():
        parent_path, _, child = lpath.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    with torch.no_grad():
        for key, t in tensors.items():
            owner, name, _ = expected[key]
            have = getattr(owner, name)
            # copies: ``tensors`` must stay pristine for _restore_quantized_bases below
            value = t.to(have.device, copy=True)
            if isinstance(have, nn.Parameter):
                have.data = value
            else:
                setattr(owner, name, value)
    adapters = folder / ADAPTER_SUBFOLDER
    if adapters.is_dir():
        load_adapters(model, adapters, trainable=trainable)
        # lorakit.load re-applies base shifts (PiSSA's residual) to what it takes for the original weights; the
        # saved 4-bit base already is the shifted one, so put the exact saved codes back
        _restore_quantized_bases(model, tensors, list(new))
    return model


def _persistent_keys(model: nn.Module, new: dict[str, nn.Module]) -> list[str]:
    keys = []
    for key in model.state_dict():
        if any(key.startswith(p + ".") for p in new):
            continue
        keys.append(key)
    for lpath, layer in new.items():
        keys += [f"{lpath}.{k}" for k in layer.state_dict()]
    return keys


def _restore_quantized_bases(model: nn.Module, tensors: dict[str, torch.Tensor], paths: Iterable[str]) -> None:
    for lpath in paths:
        module = model.get_submodule(lpath)
        layer = module.base if isinstance(module, AdaptedLayer) else module
        if not isinstance(layer, Linear4bit):
            continue
        with torch.no_grad():
            for key, buf in layer.named_buffers(recurse=False):
                buf.copy_(tensors[f"{lpath}.{key}"])
        if isinstance(module, AdaptedLayer):
            for adapter in module.adapters.values():
                adapter.on_base_changed()


# ---------------------------------------------------------------------------------------------------------------
# merge back to 4-bit (explicit, warned)
# ---------------------------------------------------------------------------------------------------------------
def requantize(model: nn.Module, sample: Any = None, warn: bool = True) -> dict[str, Any]:
    """Merge the active adapters of a model with a 4-bit base and store the merged weights in 4-bit again.

    The default :func:`lorakit.merge`/:func:`lorakit.unload` dequantise instead (exact). Requantising rounds
    ``deq(Q) + ΔW`` to NF4 once more, so the model **changes**: this function measures by how much and warns.
    Returns a report: per layer the relative weight change ``‖deq(Q') − (deq(Q)+ΔW)‖ / ‖deq(Q)+ΔW‖``, and, if a
    ``sample`` input (a tensor, or a dict of keyword arguments) is given, the model output before and after
    (``max_abs_output_change``, ``rel_output_change``). The model comes back unloaded (no lorakit objects) with
    :class:`Linear4bit` layers using each layer's original block size, double quantisation and compute dtype.

    Example:
        >>> import torch, lorakit, warnings
        >>> net = lorakit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), compute_dtype=torch.float32)
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, init="init_b"))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     report = requantize(net, sample=torch.randn(3, 64))
        >>> type(net[0]).__name__, report["layers_requantized"]
        ('Linear4bit', 1)
    """
    settings = {}
    for path, layer in adapted_layers(model):
        if layer.ops.quantized:
            base = layer.base
            settings[path] = (base.compute_dtype, base.blocksize, base.double_quant)
    if registry_or_none(model) is None or not settings:
        raise ValueError("requantize() needs a model with lorakit adapters on 4-bit (Linear4bit) layers")

    def run() -> torch.Tensor | None:
        if sample is None:
            return None
        with torch.no_grad():
            out = model(**sample) if isinstance(sample, dict) else model(sample)
        out = getattr(out, "logits", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        return out.detach().float().clone()

    before = run()
    unload(model, merge=True)
    per_layer: dict[str, float] = {}
    swaps = []
    for path, (cd, bs, dq) in settings.items():
        dense = model.get_submodule(path)
        q = Linear4bit.from_linear(dense, cd, bs, dq)
        w = dense.weight.detach().float()
        per_layer[path] = float((q.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30))
        swaps.append((path, q))
    for path, q in swaps:
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, q)
    after = run()
    report: dict[str, Any] = {"layers_requantized": len(swaps), "rel_weight_change": per_layer,
                              "max_rel_weight_change": max(per_layer.values())}
    text = (f"requantize(): the merged weights were rounded to NF4 again; {len(swaps)} layers changed by up to "
            f"{report['max_rel_weight_change']:.2%} (relative Frobenius norm)")
    if before is not None:
        diff = (after - before).abs()
        report["max_abs_output_change"] = float(diff.max())
        report["rel_output_change"] = float((after - before).norm() / before.norm().clamp(min=1e-30))
        text += (f"; model outputs changed by max |Δ| = {report['max_abs_output_change']:.4g} "
                 f"(relative {report['rel_output_change']:.2%})")
    else:
        text += "; pass sample=... to measure the output change"
    if warn:
        warnings.warn(text + ". lorakit.merge/unload without requantize keep the adapted function exactly.",
                      stacklevel=2)
    report["message"] = text
    return report


# ---------------------------------------------------------------------------------------------------------------
# LoftQ adapters' bases
# ---------------------------------------------------------------------------------------------------------------
def quantize_for_adapter(model: torch.nn.Module, folder: str | os.PathLike,
                         compute_dtype: torch.dtype | None = None) -> list[str]:
    """Quantise, as a saved lorakit LoftQ adapter needs, the layers of ``model`` it adapts; returns their paths.

    Reads ``folder``'s ``lorakit_config.json``: every adapter recording a 4-bit base (``extra["base"]``, written
    by ``attach(init="loftq")``) or saved with ``init="loftq"`` gets its layers quantised with those settings
    (NF4, block 64, no double quantisation), computing in ``compute_dtype`` (default: the layers' own dtype).
    A PEFT LoftQ folder (``init_lora_weights: "loftq"`` or a ``loftq_config``) gets its LoRA layers quantised the
    same way. Layers already 4-bit and other folders are left alone, so :func:`lorakit.load` then explains any
    mismatch. With ``loftq_iter > 1`` the LoftQ backbone is not a fresh quantisation of the base, so a layer that
    would have to be quantised here raises ValueError (before any change) pointing at :func:`save_quantized` /
    :func:`load_quantized`. Used by ``lorakit predict``/``export``.

    Example:
        >>> import tempfile, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, init="loftq", targets=["0"]))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/a")
        >>> quantize_for_adapter(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)), folder)
        ['0']
    """
    cfg_file = Path(folder) / CONFIG_FILE
    try:
        if cfg_file.is_file():
            meta = json.loads(cfg_file.read_text(encoding="utf-8"))
            entries = list(meta["adapters"].values())
        else:
            entries = _peft_loftq_entries(Path(folder))
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return []  # lorakit.load reports the broken folder
    wanted: dict[str, dict] = {}
    iterations: dict[str, int] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        base = _required_base(entry)
        if isinstance(base, dict) and base.get("quant_type") == "nf4":
            loftq_iter = (entry.get("config") or {}).get("loftq_iter", 1)
            for path in entry.get("layers") or []:
                wanted[path] = base
                iterations[path] = loftq_iter if isinstance(loftq_iter, int) else 1
    todo = []
    for path, base in wanted.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # lorakit.load names the missing module
        if isinstance(module, torch.nn.Linear):
            if iterations[path] > 1:  # its backbone is NF4(W - s·BA) after the alternations, not NF4(W)
                raise ValueError(
                    f"{folder}: this LoftQ adapter was fitted with loftq_iter={iterations[path]}, so the 4-bit base "
                    f"it needs is the one LoftQ computed, not a fresh quantisation of {path} (that would silently "
                    f"give different outputs). Fix: keep that base with lorakit.quant.save_quantized(model, folder) "
                    f"right after attaching LoftQ and load it with lorakit.quant.load_quantized, or refit with "
                    f"loftq_iter=1, whose base is a fresh quantisation")
            todo.append((path, module, base))
    done = []
    settings = {(b.get("blocksize", 64), bool(b.get("double_quant", False))) for _, _, b in todo}
    for blocksize, double_quant in sorted(settings):
        paths = [p for p, m, b in todo if (b.get("blocksize", 64), bool(b.get("double_quant", False))) ==
                 (blocksize, double_quant)]
        dtype = compute_dtype or next(m for p, m, _ in todo if p == paths[0]).weight.dtype
        # skip every module but these paths and the containers holding them (a container named by skip would
        # skip everything inside it)
        keep = {".".join(p.split(".")[:i]) for p in paths for i in range(1, p.count(".") + 2)}
        skip = (rf"(?!(?:{'|'.join(re.escape(k) for k in sorted(keep))})$).*",)
        quantize(model, double_quant=double_quant, compute_dtype=dtype, skip=skip, blocksize=int(blocksize))
        done += paths
    return done


def _required_base(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The base a saved adapter entry was fitted to: recorded by attach (``extra["base"]``), else what its
    strategy requires of the base for its config (``base_requirements``); None when any base fits."""
    base = (entry.get("extra") or {}).get("base")
    if base is not None:
        return base
    try:
        config = AdapterConfig.from_dict(entry.get("config") or {})
    except (TypeError, ValueError):
        return None  # lorakit.load reports the invalid config
    return get_method(config.method).base_requirements(config)


def _peft_loftq_entries(folder: Path) -> list[dict[str, Any]]:
    """A PEFT LoftQ folder as :func:`quantize_for_adapter` entries (layers read from the tensor names)."""
    cfg = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    # LoRA's reading of PEFT's init settings: a LoftQ folder sets init="loftq" (and loftq_iter), so its entry
    # requires the NF4 base (base_requirements); any other folder needs no quantised base
    fields = lora_peft_init(cfg, folder) if isinstance(cfg, dict) else {}
    if not fields:
        return []
    with safe_open(str(folder / PEFT_WEIGHTS), "pt") as fh:
        keys = list(fh.keys())
    layers = sorted({k[len(PREFIX):].rsplit(".lora_A", 1)[0] for k in keys if ".lora_A" in k and k.startswith(PREFIX)})
    return [{"config": fields, "layers": layers}]


__all__ = ["quantize", "save_quantized", "load_quantized", "requantize", "quantize_for_adapter", "DEFAULT_SKIP",
           "QUANT_CONFIG_FILE", "QUANT_WEIGHTS_FILE", "ADAPTER_SUBFOLDER"]
