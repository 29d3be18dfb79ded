"""Read and write adapters in HF PEFT's folder format (``adapter_config.json`` + ``adapter_model.safetensors``).

Reading (``lorakit.load`` on a PEFT folder): LoRA, rsLoRA, DoRA, embedding LoRA, Conv2d LoRA, VeRA (saved or
regenerated projections), AdaLoRA (pruned ranks and rank-0 layers included) and ``modules_to_save``. Keys are
accepted with or without the ``base_model.model.`` prefix. The layers to adapt are taken from the saved tensors,
so ``target_modules`` in any form ("all-linear", a regex, a list) is honoured exactly as PEFT applied it.

Writing (``lorakit.save(model, path, format="peft")``): LoRA/rsLoRA/DoRA/VeRA/AdaLoRA in their native PEFT types;
every other method whose change is exactly low-rank (LoRA-FA, PiSSA, SoRA, LoRA-drop's shared adapters) as plain
LoRA with per-layer ranks and alphas; methods whose trained function cannot be expressed that way (Delta-LoRA moves
the base weights) raise a clear error.

Each method owns its translation (``peft_type``, ``to_peft``, ``reads_peft``/``from_peft`` on its strategy; plain
dicts in and out, PEFT's LoRA as the default in :mod:`lorakit.methods.peft_lora`): this module reads and writes the
files, splits and joins PEFT's keys (``base_model.model.<path>.<suffix>``), checks what every PEFT type shares
(options lorakit lacks, the layers and heads named, LoftQ's base) and names the folder in every error.

Several adapters use PEFT's own ``save_pretrained`` layout: ``"default"`` in the folder, every other adapter in a
subfolder named after it (a single adapter always goes into the folder itself). :func:`lorakit.load` reads both
layouts, all adapters or one chosen by name, and rolls back on any error.

Example:
    >>> import torch, lorakit, tempfile
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0"]))
    >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/peft", format="peft")
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import AdapterConfig
from ..layers import AdaptedLayer, UnsupportedLayer, ops_for
from ..methods import Adapter, available_methods, get_method
from ..methods.peft_lora import PEFT_MODEL_PREFIX
# LoRA's PEFT init rules, kept importable here under their 0.1.0 names (lorakit.peft_format re-exports them)
from ..methods.peft_lora import PEFT_UNSUPPORTED_INITS, peft_loftq_settings  # noqa: F401
from ..registry import AdapterEntry, adapter_entries, registry, saved_copy
from .files import (SEP, AdapterLoadError, atomic_folder, check_save_target, interrupted_save, read_safetensors,
                    refuse_non_finite)
from .loader import AdapterToLoad, choose_adapters, install_adapters
from .lorakit_format import CONFIG_FILE

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: lorakit's side file next to a PEFT adapter recording the exact 4-bit base it was fitted to (LoftQ's
#: ``base_fingerprints``; PEFT's adapter_config.json has no key for it); bound to the weights file it was written with
#: by that file's sha256, so a side file left behind by an older save is ignored
BASE_FINGERPRINTS_FILE = "lorakit_base.json"
PREFIX = PEFT_MODEL_PREFIX

#: PEFT's boolean switches that lorakit reads (a string or number there is refused, not read as true)
PEFT_SWITCHES = ("use_dora", "use_rslora", "fan_in_fan_out")
#: PEFT LoRA options (adapter_config.json keys) that change what the adapter computes and that lorakit does not
#: implement, with the PEFT feature each one turns on; a folder setting any of them (to a truthy value) is refused
PEFT_LORA_FEATURES = {
    "use_qalora": "QA-LoRA (quantisation-aware LoRA)",
    "lora_bias": "LoRA bias (a trained bias on lora_B)",
    "layer_replication": "layer replication (duplicated decoder layers)",
    "use_bdlora": "BD-LoRA (block-diagonal LoRA)",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing between LoRA experts",
    "trainable_token_indices": "trainable tokens (per-token embedding updates)",
    "target_parameters": "LoRA on nn.Parameters (target_parameters, e.g. MoE expert weights)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
UNSUPPORTED_LORA_OPTIONS = tuple(PEFT_LORA_FEATURES)
#: PEFT's task types (TaskType) and the transformers class-name endings that imply them
PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_TASK_BY_CLASS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                  ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                  ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


class PeftFormatError(AdapterLoadError):
    """A PEFT folder uses something lorakit cannot represent (named in the message)."""


class PeftFileMissing(PeftFormatError, FileNotFoundError):
    """A PEFT folder lacks ``adapter_config.json`` or ``adapter_model.safetensors`` (a FileNotFoundError too)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def read_peft_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config and tensors, with the ``base_model.model.`` prefix removed from layer keys."""
    folder = Path(path)
    cfg_file, w_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    interrupted = interrupted_save(folder)
    if interrupted:
        raise PeftFormatError(interrupted)
    if not cfg_file.exists():
        raise PeftFileMissing(f"{folder} has no {PEFT_CONFIG}")
    if not w_file.exists():
        if (folder / "adapter_model.bin").exists():
            raise PeftFormatError(f"{folder} holds adapter_model.bin (a pickle); lorakit never unpickles. Re-save "
                                  f"it with PEFT's save_pretrained(safe_serialization=True)")
        raise PeftFileMissing(f"{folder} has no {PEFT_WEIGHTS}")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PeftFormatError(f"{cfg_file}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise PeftFormatError(f"{cfg_file}: expected a JSON object (PEFT's adapter config), got "
                              f"{type(cfg).__name__}")
    try:  # corrupt/incomplete files and NaN/inf tensors: a clear error naming the file
        raw = read_safetensors(w_file)[0]
    except AdapterLoadError as err:
        raise PeftFormatError(str(err)) from None
    tensors = {}
    for key, t in raw.items():
        if key.startswith(PREFIX):
            key = key[len(PREFIX):]
        elif key.startswith("base_model."):  # VeRA's shared pair lives on the tuner, not in the model
            key = key[len("base_model."):]
        tensors[key] = t
    return cfg, tensors


def _split_layer_key(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    for suffix, name in suffixes.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], name
    return None


def peft_to_lorakit(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
                    folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Translate a PEFT adapter into one lorakit folder entry (``meta`` for one adapter) and its tensors."""
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise PeftFormatError(f"{folder}/{PEFT_CONFIG}: peft_type={peft_type!r} is missing or not a string; "
                              f"lorakit reads PEFT's LORA (incl. DoRA/rsLoRA), VERA and ADALORA adapters")
    peft_type = peft_type.upper()
    for switch in PEFT_SWITCHES:  # "yes" or 1 would be read as true: say what is wrong instead of a symptom
        value = cfg.get(switch)
        if value is not None and not isinstance(value, bool):
            raise PeftFormatError(f"{folder}/{PEFT_CONFIG}: {switch}={value!r} is invalid; PEFT writes true or false "
                                  f"there (fix or re-save the adapter with PEFT)")
    strategy = _peft_reader(peft_type, cfg)
    if strategy is None:
        raise PeftFormatError(f"{folder}: PEFT method {peft_type} (peft_type={cfg['peft_type']!r}) is not supported "
                              f"by lorakit; lorakit reads PEFT's LORA (incl. DoRA/rsLoRA), VERA and ADALORA adapters")
    # every type lorakit reads is LoRA-shaped (AdaLoRA's config extends LoRA's; VeRA has bias too)
    for option, feature in PEFT_LORA_FEATURES.items():
        if cfg.get(option):
            raise PeftFormatError(f"{folder}: the adapter uses PEFT's {feature} ({option}={cfg[option]!r}), "
                                  f"which lorakit does not support")
    if cfg.get("bias", "none") != "none":
        raise PeftFormatError(f"{folder}: bias={cfg['bias']!r} (trained biases) is not supported; only "
                              f"bias='none' adapters load")
    try:  # the method's own reading of PEFT's init settings (LoRA: PiSSA & co. refused, LoftQ read)
        init_fields = strategy.peft_init(cfg, folder)
    except ValueError as err:
        raise PeftFormatError(str(err)) from None

    layers: dict[str, dict[str, torch.Tensor]] = {}
    leftovers: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key in strategy.peft_shared_keys:
            shared[key] = t
            continue
        hit = _split_layer_key(key, strategy.peft_keys)
        if hit is None:
            leftovers[key] = t
        else:
            layers.setdefault(hit[0], {})[hit[1]] = t
    if not layers:
        raise PeftFormatError(f"{folder}: no adapter tensors found (keys like '<module>.lora_A.weight')")
    for path in layers:  # PEFT's MHA LoRA keeps tensors on "<mha>" and "<mha>.base_layer.out_proj"
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if _has_module(model, prefix) and isinstance(model.get_submodule(prefix), nn.MultiheadAttention):
                raise PeftFormatError(f"{folder}: the adapter uses PEFT's LoRA for nn.MultiheadAttention "
                                      f"({prefix}), which lorakit does not support")
    missing = [p for p in layers if not _has_module(model, p)]
    if missing:
        raise PeftFormatError(f"{folder}: the model has no module(s) {missing[:4]}; was the adapter saved for a "
                              f"different model? (pass the same architecture PEFT wrapped)")
    for path in layers:
        _check_peft_layer(model, path, folder, strategy, init_fields)
    # PEFT's default save of an adapted embedding/lm_head also writes the base weight ("<module>.base_layer.weight")
    leftovers = {k: t for k, t in leftovers.items() if not _same_base_tensor(model, k, t, layers, folder)}

    # modules_to_save: every remaining key must belong to one of them
    mts_names = cfg.get("modules_to_save") or []
    if not isinstance(mts_names, list) or not all(isinstance(m, str) for m in mts_names):
        raise PeftFormatError(f"{folder}/{PEFT_CONFIG}: modules_to_save={mts_names!r} must be a list of module "
                              f"names or null")
    module_paths: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in leftovers.items():
        # the outermost module on the key's path that modules_to_save names (a head may have children)
        parts = key.split(".")
        cut = next((i for i in range(1, len(parts))
                    if any(".".join(parts[:i]) == m or ".".join(parts[:i]).endswith("." + m) for m in mts_names)), None)
        if cut is None:
            raise PeftFormatError(f"{folder}: unexpected tensor {key!r} (neither an adapter tensor nor part of "
                                  f"modules_to_save {mts_names})")
        module_paths.setdefault(".".join(parts[:cut]), {})[".".join(parts[cut:])] = t

    try:
        config_kwargs, layer_tensors, shared_tensors = strategy.from_peft(
            cfg, layers, shared, {path: _ops(model, path) for path in layers}, folder)
    except (RuntimeError, IndexError) as err:  # tensors whose shapes cannot be the saved method's
        raise PeftFormatError(f"{folder}: the {peft_type} tensors do not have the shapes PEFT writes for this "
                              f"model ({err})") from None
    except ValueError as err:  # the strategy names the folder and the key
        raise PeftFormatError(str(err)) from None
    dropout = cfg.get("lora_dropout", cfg.get("vera_dropout", 0.0)) or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise PeftFormatError(f"{folder}/{PEFT_CONFIG}: dropout={dropout!r} is not a number")
    config_kwargs.update(method=strategy.method, targets=sorted(layers), modules_to_save=sorted(module_paths),
                         dropout=float(dropout))
    config_kwargs.update(init_fields)
    try:
        config = AdapterConfig(**config_kwargs)
    except (ValueError, TypeError) as exc:
        raise PeftFormatError(f"{folder}: the PEFT config does not translate to a valid lorakit config: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    for path, named in layer_tensors.items():
        for tname, t in named.items():
            out[SEP.join(("peft", "layer", path, tname))] = t
    for tname, t in shared_tensors.items():
        out[SEP.join(("peft", "shared", "", tname))] = t
    for mod, named in module_paths.items():
        for tname, t in named.items():
            out[SEP.join(("peft", "module", mod, tname))] = t
    entry = {"config": config.to_dict(), "layers": sorted(layers), "modules_to_save": sorted(module_paths),
             "extra": {"source": "peft", "peft_type": peft_type}}
    return entry, out


def _check_peft_layer(model: nn.Module, path: str, folder: Path, strategy: type[Adapter],
                      init_fields: dict[str, Any]) -> None:
    """Refuse, naming the cause, a PEFT layer lorakit cannot adapt or whose base the adapter's init does not fit
    (a LoftQ adapter needs the 4-bit NF4 base it was fitted to; nn.MultiheadAttention is refused by the caller)."""
    try:
        ops = _ops(model, path)
    except UnsupportedLayer as err:
        raise PeftFormatError(f"{folder}: PEFT adapted {path}, which lorakit cannot adapt: {err}") from None
    try:
        strategy.check_peft_layer(ops, init_fields, path)
    except ValueError as err:
        raise PeftFormatError(f"{folder}: {err}") from None


def _same_base_tensor(model: nn.Module, key: str, saved: torch.Tensor, layers: dict[str, Any], folder: Path) -> bool:
    """True if ``key`` is ``<adapted layer>.base_layer.<tensor>`` (PEFT's ``save_embedding_layers`` copy of the
    base weight) and equals the model's own tensor, so it can be ignored. A different copy is refused: it means
    the adapter was trained on another (resized or fine-tuned) base, and lorakit never swaps base weights while
    loading an adapter (PEFT silently would)."""
    mod, _, tname = key.rpartition(".")
    if not mod.endswith(".base_layer") and mod != "base_layer":
        return False
    path = mod[: -len(".base_layer")].rstrip(".")
    if path not in layers:
        return False
    module = model.get_submodule(path)
    base = module.base if isinstance(module, AdaptedLayer) else module
    have = dict(base.named_parameters(recurse=False)).get(tname)
    if have is None:
        return False
    have = have.detach()
    if tuple(have.shape) != tuple(saved.shape):
        raise PeftFormatError(
            f"{folder}: {key} (the base weight PEFT saved next to the adapter on {path}) has shape "
            f"{tuple(saved.shape)}, this model's has {tuple(have.shape)}: the adapter was trained on a model with "
            f"resized embeddings. Build the base the same way first (resize_token_embeddings and load those "
            f"weights), then load the adapter")
    saved = saved.to(have.device)
    if torch.equal(saved, have.to(saved.dtype)) or torch.equal(saved.to(have.dtype), have):
        return True
    diff = (saved.float() - have.float()).abs().max().item()
    if diff <= 1e-6 * max(1.0, have.float().abs().max().item()):
        return True
    raise PeftFormatError(
        f"{folder}: {key} (the base weight PEFT saved next to the adapter on {path}) differs from this model's "
        f"{path}.{tname} (max difference {diff:.3g}): the adapter was trained on a different (fine-tuned or "
        f"resized) base. lorakit does not replace base weights while loading an adapter; load that base first "
        f"(e.g. copy the tensor into {path}.{tname}), then load the adapter")


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _ops(model: nn.Module, path: str):
    module = model.get_submodule(path)
    return module.ops if isinstance(module, AdaptedLayer) else ops_for(module)


def peft_adapter_folders(path: str | os.PathLike) -> dict[str, Path]:
    """The PEFT adapters in ``path``, by name, in PEFT's own multi-adapter layout.

    PEFT's ``save_pretrained`` writes adapter ``"default"`` into the folder itself and every other adapter into a
    subfolder named after it; a folder holding only subfolders is therefore a set of named adapters.

    Example:
        >>> import tempfile
        >>> peft_adapter_folders(tempfile.mkdtemp())
        {}
    """
    folder = Path(path)
    found: dict[str, Path] = {}
    if (folder / PEFT_CONFIG).exists():
        found["default"] = folder
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            # hidden folders are no adapters (lorakit's temporaries are hidden; adapter names never start with '.')
            if sub.is_dir() and not sub.name.startswith(".") and (sub / PEFT_CONFIG).exists() and sub.name not in found:
                found[sub.name] = sub
    return found


def is_peft_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a PEFT adapter (``adapter_config.json``) or PEFT's per-name adapter subfolders."""
    return bool(peft_adapter_folders(path))


def load_peft(model: nn.Module, path: str | os.PathLike, name: str | None = None, trainable: bool = False
              ) -> nn.Module:
    """Load PEFT adapter(s) from ``path`` into ``model`` (a plain transformers/PyTorch model); they become active.

    ``path`` is one PEFT adapter folder or a folder PEFT's ``save_pretrained`` wrote several adapters into
    (``"default"`` at the top, the others in ``<path>/<name>``). As for lorakit folders: ``name=None`` loads every
    adapter under its PEFT name; with one adapter ``name`` renames it (load next to existing adapters under a
    chosen name); with several it selects one. Every adapter is translated and checked before the model changes,
    and a failure part-way is rolled back, so on any error the model is unchanged. Called by :func:`lorakit.load`.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0"]))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/peft", format="peft")
        >>> _ = load_peft(net, folder, name="again")
        >>> lorakit.adapter_names(net)
        ['default', 'again']
    """
    return install_adapters(model, peft_adapters(model, path, name), trainable, foreign=PeftFormatError)


def peft_adapters(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                  new_names: bool = True) -> list[AdapterToLoad]:
    """The PEFT adapters :func:`load_peft` would install (chosen by ``name`` as there), each translated into
    lorakit's layout and checked against the model's modules; nothing changes. ``new_names=False`` lets them have
    names the model already uses (:func:`lorakit.hotswap` replaces one). Errors are :class:`PeftFormatError`.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0"]))
        >>> folder = lorakit.save(net, tempfile.mkdtemp() + "/peft", format="peft")
        >>> peft_adapters(net, folder, new_names=False)[0].entry["config"]["r"]
        2
    """
    folder = Path(path)
    found = peft_adapter_folders(folder)
    if not found:
        read_peft_folder(folder)  # raises the precise "no adapter_config.json / no safetensors" error
    chosen = choose_adapters(model, list(found), name, folder, what="PEFT adapters", new_names=new_names)
    # translate every adapter first: all PEFT-side problems surface before the model changes
    adapters = []
    for saved, new in chosen:
        cfg, tensors = read_peft_folder(found[saved])
        entry, flat = peft_to_lorakit(cfg, tensors, model, found[saved])
        prints = _read_base_fingerprints(found[saved])
        if prints is not None:
            entry["extra"]["base_fingerprints"] = prints
        adapters.append(AdapterToLoad(entry, flat, "peft", new, found[saved], found[saved] / PEFT_WEIGHTS))
    return adapters


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def save_peft(model: nn.Module, path: str | os.PathLike, names: Sequence[str], base_model_name: str | None = None,
              *, base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write adapters ``names`` in PEFT's format to folder ``path`` (atomically); returns the folder.

    One adapter goes into ``path`` itself, whatever its name. Several follow PEFT's own ``save_pretrained`` layout:
    ``"default"`` in ``path``, every other adapter in ``path/<name>``, so ``PeftModel.from_pretrained(base, path)``
    loads "default" and ``peft_model.load_adapter(path / name, adapter_name=name)`` (or
    ``PeftModel.from_pretrained(base, path / name)``) the others. Every adapter is translated before anything is
    written. Called by ``lorakit.save(model, path, format="peft", ...)``.

    ``base_model_name_or_path`` (``base_model_name`` is its older spelling) and ``task_type`` (one of PEFT's
    ``CAUSAL_LM``, ``SEQ_CLS``, ``SEQ_2_SEQ_LM``, ``TOKEN_CLS``, ``QUESTION_ANS``, ``FEATURE_EXTRACTION``) go into
    ``adapter_config.json``, so ``peft.AutoPeftModelFor*.from_pretrained(path)`` can build the base itself. When
    not given they are taken from the model when it tells: its ``name_or_path`` (set by ``from_pretrained``) and
    its transformers class (``*ForCausalLM`` -> ``CAUSAL_LM``, ``*ForSequenceClassification`` -> ``SEQ_CLS``, ...);
    otherwise they stay null, as before.

    Example:
        >>> import torch, lorakit, tempfile
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0"]))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["1"]), name="other")
        >>> folder = save_peft(net, tempfile.mkdtemp() + "/peft", ["default", "other"])
        >>> sorted(p.name for p in folder.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors', 'other']
    """
    registry(model)  # a clear error for a model without adapters
    if base_model_name is not None and base_model_name_or_path is not None \
            and base_model_name != base_model_name_or_path:
        raise ValueError(f"save(format='peft'): base_model_name={base_model_name!r} and base_model_name_or_path="
                         f"{base_model_name_or_path!r} disagree; pass only base_model_name_or_path")
    base_name = base_model_name_or_path if base_model_name_or_path is not None else base_model_name
    if base_name is not None and (not isinstance(base_name, (str, os.PathLike)) or not str(base_name)):
        raise ValueError(f"save(format='peft'): base_model_name_or_path={base_name!r} must be a non-empty string "
                         f"(a hub id or a local folder)")
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"save(format='peft'): task_type={task_type!r} is invalid; PEFT's task types are "
                         f"{', '.join(PEFT_TASK_TYPES)}")
    base_name = str(base_name) if base_name is not None else _model_name_or_path(model)
    task_type = task_type if task_type is not None else infer_task_type(model)
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"save(format='peft') got repeated adapter names {names}")
    plans = [(name, _peft_payload(model, name)) for name in names]  # every check before anything is written
    for name, (_, tensors) in plans:
        refuse_non_finite(tensors, f"save({str(path)!r}, format='peft') of adapter {name!r}")
    folder = Path(path)
    check_save_target(folder, "peft", CONFIG_FILE, "lorakit")
    written = {folder if len(plans) == 1 or name == "default" else folder / name for name, _ in plans}
    stale = {n: p for n, p in peft_adapter_folders(folder).items() if p not in written} if folder.is_dir() else {}
    if stale:  # left in place they would load next to the new adapters
        raise ValueError(f"cannot save into {str(folder)!r}: it holds PEFT adapter(s) {sorted(stale)} "
                         f"({', '.join(str(p) for p in stale.values())}) that this save would not replace, and "
                         f"loading the folder would pick them up too; remove them or save to another folder")

    def write(folder: Path) -> None:
        for name, (cfg, tensors) in plans:
            sub = folder if len(plans) == 1 or name == "default" else folder / name
            sub.mkdir(parents=True, exist_ok=True)
            cfg["base_model_name_or_path"] = base_name
            cfg["task_type"] = task_type
            save_file(tensors, str(sub / PEFT_WEIGHTS), metadata={"format": "pt"})
            (sub / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
            prints = registry(model).extra.get(name, {}).get("base_fingerprints")
            if prints:
                side = {"format": "lorakit-base", "version": 1, "base_fingerprints": dict(prints),
                        "weights_sha256": _sha256(sub / PEFT_WEIGHTS)}
                (sub / BASE_FINGERPRINTS_FILE).write_text(json.dumps(side, indent=2, sort_keys=True))

    atomic_folder(Path(path), write)
    return Path(path)


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _read_base_fingerprints(folder: Path) -> dict[str, str] | None:
    """The base fingerprints lorakit wrote next to the PEFT adapter in ``folder`` (:data:`BASE_FINGERPRINTS_FILE`),
    or None: no side file, or one written for other weights (the adapter was saved again since, by PEFT or another
    tool). A damaged side file is a :class:`PeftFormatError` naming it."""
    side_file = folder / BASE_FINGERPRINTS_FILE
    if not side_file.is_file():
        return None
    try:
        side = json.loads(side_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PeftFormatError(f"{side_file}: not valid JSON ({err}); delete it (it only records the 4-bit base a "
                              "LoftQ adapter was fitted to) or save the adapter again") from None
    prints = side.get("base_fingerprints") if isinstance(side, dict) else None
    if not isinstance(prints, dict) or not all(isinstance(v, str) for v in prints.values()):
        raise PeftFormatError(f"{side_file}: expected {{\"base_fingerprints\": {{layer path: fingerprint}}, ...}}; "
                              "delete it or save the adapter again")
    if side.get("weights_sha256") != _sha256(folder / PEFT_WEIGHTS):
        return None
    return prints


def _model_name_or_path(model: nn.Module) -> str | None:
    """The model's ``from_pretrained`` source (``name_or_path`` / ``config._name_or_path``), or None."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if isinstance(name, (str, os.PathLike)) and str(name) else None


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class name; None when it is not clear.

    Example:
        >>> import torch
        >>> infer_task_type(torch.nn.Linear(2, 2)) is None
        True
    """
    cls = type(model).__name__
    for ending, task in _TASK_BY_CLASS:
        if cls.endswith(ending):
            return task
    config = getattr(model, "config", None)
    if cls.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"  # T5/BART-style; vision-language *ForConditionalGeneration stays unknown
    if cls.endswith("Model") and hasattr(model, "base_model_prefix") and config is not None:
        return "FEATURE_EXTRACTION"  # a bare transformers encoder/decoder (BertModel, LlamaModel)
    return None


def _layer_entries(model: nn.Module, name: str) -> list[AdapterEntry]:
    return adapter_entries(model, name)


def _module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for mpath in registry(model).modules_to_save.get(name, []):  # the adapter's own copy, under PEFT's key
        for tname, t in saved_copy(model, mpath, name).state_dict().items():
            out[f"{PREFIX}{mpath}.{tname}"] = t.detach().cpu().contiguous().clone()
    return out


def _base_config(config: AdapterConfig, entries, peft_type: str) -> dict[str, Any]:
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "target_modules": sorted(p for p, _, _ in entries), "modules_to_save": None, "bias": "none",
            "fan_in_fan_out": any(layer.ops.kind == "conv1d" for _, layer, _ in entries), "layers_to_transform": None,
            "layers_pattern": None, "revision": None}


def _peft_payload(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Adapter ``name`` as PEFT's config and tensors: its strategy translates it (plain dicts), this adds PEFT's
    common config fields and key prefixes."""
    reg = registry(model)
    config = reg.configs[name]
    entries = _layer_entries(model, name)
    strategy = get_method(config.method)
    if strategy.peft_type is None:
        raise ValueError(f"adapter {name!r} is {strategy.peft_refusal}")
    method_cfg, layers, shared = strategy.to_peft(name, config, entries, reg.shared.get(name))
    tensors = _module_tensors(model, name)
    # own copies: LoRA-drop layers share one pair, and safetensors refuses tensors sharing memory
    for path, named in layers.items():
        for suffix, t in named.items():
            tensors[f"{PREFIX}{path}.{suffix}"] = t.contiguous().clone()
    for tname, t in shared.items():  # VeRA's shared pair lives on PEFT's tuner, not in the model
        tensors[f"base_model.{tname}"] = t.contiguous().clone()
    cfg = _base_config(config, entries, strategy.peft_type)
    cfg.update(method_cfg)
    cfg["modules_to_save"] = list(reg.modules_to_save.get(name, [])) or None
    return cfg, tensors


def _peft_reader(peft_type: str, cfg: dict[str, Any]) -> type[Adapter] | None:
    """The registered strategy that reads PEFT adapters of this type and config, or None."""
    readers = [cls for cls in map(get_method, available_methods()) if cls.reads_peft(peft_type, cfg)]
    return readers[0] if readers else None
