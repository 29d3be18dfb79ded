"""Hot-swap: replace an attached adapter's values in place with another adapter's, read from a folder, without
rebuilding (and, for a ``torch.compile``d model, without recompiling) anything.

:func:`prepare_hotswap` runs once, before compiling: each adapter's strategy pads its factors with zeros to
``max_rank`` and reads its scaling from a tensor (``Adapter.prepare_hotswap``), so shapes and constants in the
compiled graph never change. :func:`hotswap` then reads a folder (lorakit's or PEFT's) with the same readers and the
same checks as :func:`lorakit.load` (:func:`~lorakit.io.loader.build_loaded` builds the new adapters on the side),
checks that they fit the prepared ones, and only then copies their values in (``Adapter.hotswap_from``). Which
members can be hot-swapped is each strategy's answer (``Adapter.hotswap_refusal``): plain LoRA with every init whose
saved form is plain LoRA (kaiming, gaussian, init_b, orthogonal, loftq), rsLoRA, and LoRA-FA; the others are refused
with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import AdapterConfig
from ..methods import Adapter, get_method
from ..registry import AdapterEntry, adapter_entries, registry, saved_copy
from .api import read_adapters
from .files import AdapterLoadError
from .loader import build_loaded


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (its adapters and paths are the original module's)."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` (non-persistent ones too), by name."""
    return {**dict(module.named_parameters()), **{k: v for k, v in module.named_buffers() if v is not None}}


def _layers_of(model: nn.Module, name: str) -> list[AdapterEntry]:
    return adapter_entries(model, name)


def prepare_hotswap(model: nn.Module, max_rank: int, names: str | Sequence[str] | None = None) -> nn.Module:
    """Make adapters ``names`` (default: all) ready for :func:`hotswap` with any adapter of the same method up to
    rank ``max_rank`` and any alpha; what they compute does not change.

    Each adapter's factors are padded with zeros to ``max_rank`` and its scaling becomes a tensor, so a swap only
    copies values: a ``torch.compile``d model keeps its graph (no recompilation). Call it once, before
    ``torch.compile`` and before building an optimiser (the padded factors are new parameters). Saving still writes
    each adapter at its own rank. Supported: LoRA with every init whose saved form is plain LoRA (kaiming,
    gaussian, init_b, orthogonal, loftq), rsLoRA, and LoRA-FA (into a LoRA-FA adapter); other members (PiSSA, DoRA,
    VeRA, AdaLoRA, SoRA before ``finish``, Delta-LoRA, LoRA-drop) are refused, before any change, with the reason. A
    finished SoRA adapter is plain LoRA and hot-swaps as such.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> _ = lorakit.prepare_hotswap(net, max_rank=8)
        >>> tuple(net[0].adapters["default"].A.shape)
        (8, 8)
    """
    if type(model).__name__ == "OptimizedModule":
        raise ValueError("prepare_hotswap() needs the model before torch.compile (padding changes shapes, which "
                         "would recompile); call it on the uncompiled model, then compile")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"prepare_hotswap(max_rank={max_rank!r}) is invalid; pass the largest rank of the adapters "
                         f"you will hot-swap in (an integer >= 1)")
    reg = registry(model)
    names = list(reg.configs) if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in names if n not in reg.configs]
    if unknown:
        raise ValueError(f"prepare_hotswap(): unknown adapter(s) {unknown}; this model has {list(reg.configs)}")
    todo: list[Adapter] = []
    for name in names:  # check everything before padding anything
        config = reg.configs[name]
        refusal = get_method(config.method).hotswap_refusal(config)
        if refusal is not None:
            raise ValueError(f"adapter {name!r} cannot be hot-swapped: {refusal}")
        entries = _layers_of(model, name)
        merged = [p for p, layer, _ in entries if name in layer.merged]
        if merged:
            raise ValueError(f"adapter {name!r} is merged into {len(merged)} layer(s) ({merged[0]}, ...); a swap "
                             f"would leave the old delta in the weights. lorakit.unmerge(model) first")
        big = [(p, a.A.shape[0]) for p, _, a in entries if a.A.shape[0] > max_rank]
        if big:
            raise ValueError(f"adapter {name!r} has rank {big[0][1]} on {big[0][0]}, above max_rank={max_rank}; "
                             f"pass a max_rank >= every rank you will use")
        todo.extend(a for _, _, a in entries)
    for adapter in todo:
        adapter.prepare_hotswap(max_rank)
    return model


def hotswap(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Replace the values of attached adapter ``name`` in place with the adapter saved in folder ``path`` (by
    lorakit or PEFT): the model then computes exactly what a fresh :func:`lorakit.load` of that folder would.

    The new adapter must be of the same method, on the same layers (and heads in ``modules_to_save``), of any rank
    up to the ``max_rank`` given to :func:`prepare_hotswap` (required first) and any alpha or scaling rule. A
    ``torch.compile``d model (pass it or the original) runs the swapped values without recompiling. The folder is
    read and checked exactly as :func:`lorakit.load` checks it, and every check runs before any value changes: on
    an error (another method, a larger rank, other layers, a folder for another base, no preparation) the model is
    unchanged. The registry takes the new adapter's config, so :func:`lorakit.save` writes the new adapter.
    Dropout and trainable flags stay the attached adapter's. Supported members: see :func:`prepare_hotswap`.

    Example:
        >>> import torch, lorakit, tempfile
        >>> other = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(other, lorakit.AdapterConfig(r=4, alpha=16, init="gaussian"))
        >>> folder = lorakit.save(other, tempfile.mkdtemp() + "/b")
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> _ = lorakit.prepare_hotswap(net, max_rank=8)
        >>> _ = lorakit.hotswap(net, folder)
        >>> torch.equal(net[0].adapters["default"].A[:4], other[0].adapters["default"].A)
        True
    """
    model = _uncompiled(model)
    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"hotswap(): the model has no adapter {name!r} (have {list(reg.configs)}); attach or load "
                         f"one, call lorakit.prepare_hotswap(model, max_rank=...), then hot-swap into it")
    entries = _layers_of(model, name)
    unprepared = [p for p, _, a in entries if not a.hotswap_rank]
    if unprepared:
        raise ValueError(f"hotswap(): adapter {name!r} is not prepared for hot-swapping (e.g. {unprepared[0]}); call "
                         f"lorakit.prepare_hotswap(model, max_rank=<largest rank you will load>) once, before "
                         f"torch.compile")
    merged = [p for p, layer, _ in entries if name in layer.merged]
    if merged:
        raise ValueError(f"hotswap(): adapter {name!r} is merged into {merged[0]}, ...; lorakit.unmerge(model) first")
    folder = Path(path)
    items, foreign = read_adapters(model, folder, name, new_names=False)
    if len(items) != 1:
        raise AdapterLoadError(f"{folder} holds {len(items)} adapters ({[i.saved_name for i in items]}); hot-swap "
                               f"reads one: name the attached adapter like one of them, or save the one you want "
                               f"alone")
    item = items[0]
    old_config = reg.configs[name]
    new_config = AdapterConfig.from_dict(item.entry["config"])  # read_adapters checked it
    if new_config.method != old_config.method:
        raise ValueError(f"hotswap(): {folder} holds a {new_config.method!r} adapter, but {name!r} is "
                         f"{old_config.method!r}; hot-swap replaces an adapter with one of the same method")
    refusal = get_method(new_config.method).hotswap_refusal(new_config)
    if refusal is not None:
        raise ValueError(f"hotswap(): the adapter in {folder} cannot be hot-swapped: {refusal}")
    have, got = set(reg.layers[name]), set(item.entry.get("layers", []))
    if have != got:
        raise ValueError(f"hotswap(): {folder} adapts other layers than {name!r} (only there: "
                         f"{sorted(got - have)[:4]}; missing: {sorted(have - got)[:4]}); hot-swap needs the same "
                         f"target layers: delete the adapter and lorakit.load the other one instead")
    heads = sorted(reg.modules_to_save.get(name, []))
    if sorted(item.entry.get("modules_to_save", [])) != heads:
        raise ValueError(f"hotswap(): {folder} trains heads {sorted(item.entry.get('modules_to_save', []))}, "
                         f"{name!r} trains {heads}; hot-swap needs the same modules_to_save")
    taken = set(reg.configs)
    item.new_name = next(f"{name}_hotswap{i}" for i in range(len(taken) + 1) if f"{name}_hotswap{i}" not in taken)
    plan = build_loaded(model, item, foreign)  # the one loader's checks; the model is not changed
    attached = {path: adapter for path, _, adapter in entries}
    pairs = [(attached[e.path], e.adapter) for e in plan.entries]
    for old, new in pairs:
        old.hotswap_check(new)
    copies = [(saved_copy(model, mpath, name), own) for mpath, _, _, own in plan.copies]

    # every check passed: copy the values in; a failure part-way (Ctrl-C) puts the old values back
    # (every parameter and buffer by value, saved or not; plain attributes, e.g. r, scaling, init, as they were)
    before = [(a, {k: v.detach().clone() for k, v in _tensors(a).items()},
               {k: v for k, v in vars(a).items() if not k.startswith("_")}) for a, _ in pairs]
    before_heads = [(m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m, _ in copies]
    try:
        for old, new in pairs:
            old.hotswap_from(new)
        for module, own in copies:
            with torch.no_grad():
                for key, value in module.state_dict().items():
                    value.copy_(own.state_dict()[key])
    except BaseException:
        for adapter, state, attributes in before:
            swapped = _tensors(adapter)
            with torch.no_grad():
                for key, value in state.items():
                    swapped[key].copy_(value)
            adapter.__dict__.update(attributes)
        for module, state in before_heads:
            module.load_state_dict(state)
        raise
    reg.configs[name] = new_config
    reg.extra[name] = dict(item.entry.get("extra", {}))
    return model
