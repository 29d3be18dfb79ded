"""Attach adapters to any ``nn.Module`` and manage them: targeting, freezing, activation, merge, mix, route, unload.

Every operation that changes a model first builds and checks everything it needs on the side, then commits in one
go, so an error leaves the model exactly as it was.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .config import AdapterConfig, name_matches
from .layers import (AdaptedLayer, LayerOps, ModuleCopies, RouteState, TiedPartner, UnsupportedLayer, is_adaptable,
                     ops_for)
from .methods import combine_adapters, get_method
from .methods.base import Adapter, layer_generator
from .mixing import TASK_VECTOR_RULES, MixReport, check_mix_options, mix_layer, record_report

from .registry import (  # re-exported: the bookkeeping lives below the methods, users read it from here too
    REGISTRY_ATTR,
    AdapterRegistry,
    adapted_layers,
    registry,
    registry_or_none,
    saved_copy,
    saved_modules,
)

#: names of output heads that "all-linear" leaves alone (a model's output embedding is excluded too)
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler_head", "output_head")


# ---------------------------------------------------------------------------------------------------------------
# targeting
# ---------------------------------------------------------------------------------------------------------------
def _matches(spec: Any, path: str) -> bool:
    """``spec`` in the forms of ``targets``/``exclude``: a regex string matching the whole path, or a list of names
    (:func:`~lorakit.config.name_matches`)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(name_matches(name, path) for name in spec)


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the original model: adapters' internals and the registry are skipped."""
    skip: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        if isinstance(module, (AdaptedLayer, ModuleCopies)):
            skip.append(path + ".")
        yield path, module


def _output_heads(model: nn.Module) -> set[int]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # some models raise NotImplementedError
            out = None
        if out is not None:
            heads.add(id(out))
            if isinstance(out, AdaptedLayer):
                heads.add(id(out.base))
    return heads


def _is_linear_like(module: nn.Module) -> bool:
    base = module.base if isinstance(module, AdaptedLayer) else module
    try:
        return ops_for(base).kind in ("linear", "conv1d") and not isinstance(base, nn.Embedding)
    except UnsupportedLayer:
        return False


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """Modules that ``config`` targets, as ``(path, module)``; a module may be an existing AdaptedLayer.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> [p for p, _ in find_targets(net, AdapterConfig(targets=["0"]))]
        ['0']
    """
    heads = _output_heads(model)
    bypassed = _mha_out_projs(model)
    keep = [m for m in config.modules_to_save]
    found = []
    for path, module in _candidate_modules(model):
        if not path:
            continue
        if config.exclude is not None and _matches(config.exclude, path):
            continue
        if keep and (_matches(keep, path) or any(_matches(keep, p) for p in _ancestors(path))):
            continue  # a module saved whole (and everything inside it) trains as it is
        if config.targets == "all-linear":
            if not _is_linear_like(module) or id(module) in heads or id(module) in bypassed:
                continue
            if any(part in HEAD_NAMES for part in path.split(".")):
                continue
            found.append((path, module))
        elif _matches(config.targets, path):
            found.append((path, module))
    # a container matched by a name must not also hide its children: keep only the outermost? No — an explicit
    # name that matches a container is an error (reported by the caller), like PEFT.
    return found


def _mha_out_projs(model: nn.Module) -> set[int]:
    """``out_proj`` of every ``nn.MultiheadAttention``: a Linear that MHA never calls (it reads ``.weight``)."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _check_not_mha(path: str, module: nn.Module, bypassed: set[int]) -> None:
    if isinstance(module, nn.MultiheadAttention):
        raise UnsupportedLayer(
            f"{path} is an nn.MultiheadAttention, which lorakit does not support: it computes attention from its "
            "packed in_proj_weight/out_proj.weight in one fused call, so there is no layer call an adapter could "
            "join. Target the model's own nn.Linear projections instead, or exclude it")
    if id(module) in bypassed:
        raise UnsupportedLayer(
            f"{path} is the out_proj of an nn.MultiheadAttention, which reads out_proj.weight directly and never "
            "calls the module, so an adapter there would have no effect; lorakit does not support "
            "nn.MultiheadAttention. Remove it from targets (all-linear skips it)")


def adaptable_names(model: nn.Module) -> list[str]:
    """Paths of every module that could be adapted (used in error messages)."""
    return [p for p, m in _candidate_modules(model) if p and (isinstance(m, AdaptedLayer) or is_adaptable(m))]


def _short_list(names: Sequence[str], limit: int = 40) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


MAX_NAME_BYTES = 255  # the longest file or folder name (in bytes) of ext4, XFS, btrfs, APFS, NTFS (255 UTF-16 units)


def check_adapter_name(name: Any) -> None:
    """Refuse adapter names that break a save key ("<name>|layer|..."), a PEFT subfolder (also: longer than
    255 bytes in UTF-8, the longest folder name) or a module attribute.

    Example:
        >>> check_adapter_name("q_proj")  # fine
        >>> try:
        ...     check_adapter_name("a.b")
        ... except ValueError as err:
        ...     print(str(err).split(";")[0])
        adapter name 'a.b' is invalid
    """
    if (not isinstance(name, str) or not name or name.strip() != name or not name.isprintable()
            or any(c in name for c in "./\\|") or hasattr(nn.ModuleDict(), name)):
        raise ValueError(f"adapter name {name!r} is invalid; use a non-empty printable string without '.', '/', "
                         f"'\\', '|' or surrounding spaces, and not an nn.Module attribute name (e.g. 'keys')")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:  # PEFT's layout makes it a folder name
        raise ValueError(f"adapter name {name[:40]!r}... is {len(name.encode('utf-8'))} bytes in UTF-8; a name must "
                         f"fit in a folder name (at most {MAX_NAME_BYTES} bytes on most file systems), since PEFT's "
                         f"layout saves each named adapter in a subfolder of that name; use a shorter name")




# ---------------------------------------------------------------------------------------------------------------
# tied weights (one Parameter registered by several modules, e.g. input and output embeddings)
# ---------------------------------------------------------------------------------------------------------------
def _weight_owners(model: nn.Module) -> dict[int, list[TiedPartner]]:
    """``id(Parameter)`` -> every ``(module, attribute, path)`` registering it; paths as the user knows them (an
    adapted layer's base is named by the layer's path)."""
    owners: dict[int, list[TiedPartner]] = {}
    seen: set[tuple[int, str]] = set()
    wrapped = {id(m.base): p for p, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None or (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            owners.setdefault(id(param), []).append(TiedPartner(module, attr, wrapped.get(id(module), path)))
    return owners


def _tied_partners(owners: dict[int, list[TiedPartner]], base: nn.Module) -> tuple[TiedPartner, ...]:
    """Other modules sharing ``base``'s weight Parameter."""
    weight = base._parameters.get("weight") if isinstance(getattr(base, "_parameters", None), dict) else None
    if weight is None:
        return ()
    return tuple(o for o in owners.get(id(weight), []) if o.module is not base)


def _refresh_ties(model: nn.Module) -> None:
    """Record on every un-merged adapted layer which modules share its weight (ties may be made after attach)."""
    owners = _weight_owners(model)
    for _, layer in adapted_layers(model):
        if not layer.merged:
            layer.tied_partners = _tied_partners(owners, layer.base)


def _sync_tie_settings(model: nn.Module, reg: AdapterRegistry, layers: Sequence[tuple[str, AdaptedLayer]]) -> None:
    """Keep transformers' tie settings true to the model: while some layer holds its own copy of a weight that was
    tied (merge untied it), ``config.tie_word_embeddings`` is False and the tied-keys map skips those weights, so
    ``save_pretrained``/``from_pretrained``/``tie_weights`` keep them apart; once all are re-tied, restore them.
    ``layers``: ``(path, layer)`` of every adapted layer, including ones just unwrapped by delete."""
    untied = [(path, layer) for path, layer in layers if layer.untied is not None]
    if untied and not reg.tie_settings:
        names = set()
        for path, layer in untied:
            names.add(path + ".weight")
            names.update(partner.path + ".weight" for partner in layer.untied.partners)
        seen: set[int] = set()
        for prefix, module in model.named_modules():
            config = getattr(module, "config", None)
            if config is not None and id(config) not in seen and getattr(config, "tie_word_embeddings", None) is True:
                seen.add(id(config))
                reg.tie_settings.append((config, "tie_word_embeddings", True))
                config.tie_word_embeddings = False
            keys = module.__dict__.get("all_tied_weights_keys")
            if isinstance(keys, dict) and keys:
                local = {n[len(prefix) + 1:] if prefix else n for n in names
                         if not prefix or n.startswith(prefix + ".")}
                kept = {k: v for k, v in keys.items() if k not in local and v not in local}
                if len(kept) != len(keys):
                    reg.tie_settings.append((module, "all_tied_weights_keys", keys))
                    module.__dict__["all_tied_weights_keys"] = kept
    elif not untied and reg.tie_settings:
        for obj, attr, old in reversed(reg.tie_settings):
            if isinstance(obj, nn.Module):
                obj.__dict__[attr] = old
            else:
                setattr(obj, attr, old)
        reg.tie_settings = []


def _check_tied(path: str, partners: tuple[TiedPartner, ...], config: AdapterConfig, adapter: Adapter,
                init_result: Any, layer: nn.Module) -> None:
    """Refuse an adapter that changes the base weight (PiSSA, LoftQ, Delta-LoRA) on a tied or merged layer."""
    # a base the adapter requires (LoftQ: an NF4 one) is a base it replaced when it was fitted
    changes_base = (bool(adapter.shifts_base) or init_result is not None
                    or type(adapter).base_requirements(config) is not None)
    if not changes_base:
        return
    what = f"method={config.method!r} with init={config.init!r}"
    if partners:
        names = ", ".join(sorted({partner.path for partner in partners}))
        raise ValueError(
            f"{path}: its weight is tied (shared) with {names}, and {what} changes the base weight, which would "
            f"change {names} too. Fix: exclude {path!r} from the adapter (exclude=[{path!r}] or leave it out of "
            f"targets), use another init/method there, or untie the weights first (give {path} its own copy of the "
            "weight and set model.config.tie_word_embeddings=False)."
        )
    if isinstance(layer, AdaptedLayer) and layer.merged:
        raise ValueError(f"{path}: adapters {layer.merged} are merged into this layer, and {what} changes the base "
                         "weight; call lorakit.unmerge(model) first")


# ---------------------------------------------------------------------------------------------------------------
# attach: build on the side, then commit
# ---------------------------------------------------------------------------------------------------------------
class PlanEntry(NamedTuple):
    """One layer the new adapter adapts. A named tuple, so loaders may still unpack it positionally."""

    path: str
    layer: AdaptedLayer  # the existing adapted layer, or a new one not yet in the model
    is_new: bool  # True: ``layer`` wraps a plain module and replaces it at commit
    adapter: Adapter
    init_result: Any  # what init_weights returned: None, a new base weight matrix, or a new base module


class SavedCopyPlan(NamedTuple):
    """One module the new adapter trains whole (``modules_to_save``)."""

    path: str
    wrapper: ModuleCopies  # the existing wrapper, or a new one not yet in the model
    is_new: bool  # True: ``wrapper`` replaces the plain module at commit
    copy: nn.Module  # the new adapter's own copy of the original module


@dataclass
class AttachPlan:
    """Everything :func:`commit_plan` will do to attach one adapter, built on the side by :func:`build_plan`."""

    name: str
    config: AdapterConfig
    registry: AdapterRegistry
    new_registry: bool
    shared: nn.Module | None
    entries: list[PlanEntry] = field(default_factory=list)
    copies: list[SavedCopyPlan] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    tied: dict[str, tuple[TiedPartner, ...]] = field(default_factory=dict)  # layer path -> modules sharing its weight


def _parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def build_plan(model: nn.Module, config: AdapterConfig, name: str, init: bool = True,
               base_fingerprints: Mapping[str, str] | None = None) -> AttachPlan:
    """Everything ``attach`` will do, computed without touching ``model``.

    ``init=False`` (a load): the saved tensors need the base they were fitted to; ``base_fingerprints`` (what
    :func:`attach` recorded, ``{layer path: fingerprint}`` of each 4-bit base) refuses any other 4-bit base.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> plan = build_plan(net, AdapterConfig(r=2), "default")
        >>> [(e.path, e.is_new) for e in plan.entries], type(net[0]).__name__
        ([('0', True)], 'Linear')
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a lorakit.AdapterConfig, got {type(config).__name__}")
    check_adapter_name(name)
    reg = registry_or_none(model)
    if reg is not None and name in reg.configs:
        raise ValueError(f"adapter name {name!r} is taken on this model (have: {list(reg.configs)}); "
                         "pick another name or lorakit.delete(model, name) first")
    method = get_method(config.method)
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(
            f"targets={config.targets!r} matched no module. Adaptable modules: {_short_list(adaptable_names(model))}"
        )
    resolved = []
    bypassed = _mha_out_projs(model)
    for path, module in targets:
        if isinstance(module, ModuleCopies):
            raise ValueError(f"{path} is trained whole by adapter(s) {list(module.copies)} (modules_to_save), so it "
                             "cannot also be adapted; exclude it from targets")
        if path == "":
            raise ValueError("cannot adapt the root module itself; wrap it, e.g. nn.Sequential(layer)")
        _check_not_mha(path, module, bypassed)
        base = module.base if isinstance(module, AdaptedLayer) else module
        try:
            ops = module.ops if isinstance(module, AdaptedLayer) else ops_for(base)
        except UnsupportedLayer as err:
            raise UnsupportedLayer(f"{path}: {err}") from None
        method.check_layer(ops, config, path)
        if not init:  # loading saved tensors: the base must be the one they were fitted to (LoftQ's 4-bit base)
            method.check_loaded_layer(ops, config, path)
            check_base_fingerprint(path, ops, (base_fingerprints or {}).get(path))
        resolved.append((path, module, ops))

    mts = []
    for pattern in config.modules_to_save:
        hits = [p for p, _ in _candidate_modules(model) if p and _matches([pattern], p)]
        if not hits:
            raise ValueError(f"modules_to_save entry {pattern!r} matched no module")
        mts.extend(hits)
    mts = sorted(set(mts))
    mts = [p for p in mts if not any(q in mts for q in _ancestors(p))]  # a module saved whole includes its children
    copies = [_saved_copy_plan(model, path) for path in mts]

    new_registry = reg is None
    reg = reg if reg is not None else AdapterRegistry()
    shared = method.make_shared(config, [(p, ops) for p, _, ops in resolved], name,
                                existing=None)
    plan = AttachPlan(name=name, config=config, registry=reg, new_registry=new_registry, shared=shared, copies=copies,
                 modules_to_save=sorted(set(mts)))
    owners = _weight_owners(model)
    for path, module, ops in resolved:
        is_new = not isinstance(module, AdaptedLayer)
        base = module.base if not is_new else module
        partners = _tied_partners(owners, base) if not ops.quantized else ()
        layer = AdaptedLayer(module).train(module.training) if is_new else module
        adapter = method(layer.ops, config, path, shared)
        _check_tied(path, partners, config, adapter, None, module)  # before a costly init (PiSSA's SVD)
        result = adapter.init_weights(layer, config, layer_generator(config, path)) if init else None
        _check_tied(path, partners, config, adapter, result, module)
        plan.entries.append(PlanEntry(path, layer, is_new, adapter, result))
        plan.tied[path] = partners
    return plan


def check_base_fingerprint(path: str, ops: LayerOps, recorded: str | None) -> None:
    """Raise ValueError (one line: the layer, both fingerprints, the fix) if ``recorded``, the fingerprint of the
    4-bit base an adapter was fitted to, is not that of ``ops``' 4-bit base. Nothing recorded (adapters saved before
    fingerprints, or needing no particular base): no check. A full-precision base where a 4-bit one was recorded is
    refused too (a LoftQ adapter's method says so first; a plain LoRA made from it by ``to_lora`` has only this).

    Example:
        >>> check_base_fingerprint("q_proj", ops_for(nn.Linear(4, 4)), None)
    """
    if recorded is None:  # most loads: nothing recorded, so no hashing of the 4-bit codes
        return
    have = ops.base_fingerprint()
    if have == recorded:
        return
    if have is None:
        raise ValueError(
            f"{path}: its base is full precision, but this adapter was fitted to a 4-bit base (fingerprint "
            f"{recorded}; a LoftQ adapter, or a LoRA converted from one) and would compute another function here. "
            "Fix: load the 4-bit base saved with it (lorakit.quant.load_quantized(fresh_model, folder) on the folder "
            "lorakit.quant.save_quantized wrote), then load the adapter")
    raise ValueError(
        f"{path}: its 4-bit base (fingerprint {have}) is not the exact one this adapter was fitted to ({recorded}): "
        "its NF4 codes or settings differ (LoftQ with loftq_iter > 1 fits its own base, which a fresh "
        "lorakit.quantize(model) does not reproduce), so outputs would silently differ. Fix: load the base saved "
        "with the adapter (lorakit.quant.save_quantized(model, folder) after attaching LoftQ, then "
        "lorakit.quant.load_quantized(fresh_model, folder)), or re-run LoftQ on the full-precision model (attach "
        "init='loftq' before any quantisation; it builds its own 4-bit base)")


def base_fingerprints(entries: Iterable[Any]) -> dict[str, str]:
    """``{layer path: fingerprint}`` of the 4-bit bases of ``entries`` (anything with ``.path`` and ``.layer``, such
    as :class:`PlanEntry` or :class:`~lorakit.registry.AdapterEntry`); full-precision layers are left out.

    Example:
        >>> base_fingerprints([])
        {}
    """
    prints = {entry.path: entry.layer.ops.base_fingerprint() for entry in entries}
    return {path: value for path, value in prints.items() if value is not None}


def _saved_copy_plan(model: nn.Module, path: str) -> SavedCopyPlan:
    """The wrapper for a module in ``modules_to_save`` (existing or new, not yet in the model) and a fresh copy of
    its original for the new adapter. The original itself is never changed."""
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLayer):
        raise ValueError(f"modules_to_save: {path} is adapted by adapter(s) {list(module.adapters)}; a module cannot "
                         "be both adapted and trained whole (drop it from modules_to_save or delete those adapters)")
    inner = [f"{path}.{p}" for p, m in module.named_modules() if p and isinstance(m, (AdaptedLayer, ModuleCopies))]
    if inner:
        raise ValueError(f"modules_to_save: {path} holds adapted or saved modules ({_short_list(inner, 4)}); "
                         "a module trained whole cannot contain them (exclude them from targets)")
    is_new = not isinstance(module, ModuleCopies)
    wrapper = ModuleCopies(module).train(module.training) if is_new else module
    if is_new:
        wrapper.path = path
    return SavedCopyPlan(path, wrapper, is_new, copy.deepcopy(wrapper.original))


def commit_plan(model: nn.Module, plan: AttachPlan, make_active: bool = True, trainable: bool = True) -> None:
    """Apply a plan built by :func:`build_plan` (cannot fail halfway for valid plans).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> commit_plan(net, build_plan(net, AdapterConfig(r=2), "default"))
        >>> type(net[0]).__name__
        'AdaptedLayer'
    """
    reg = plan.registry
    if plan.new_registry:
        model.__dict__[REGISTRY_ATTR] = reg
    for path, layer, is_new, adapter, result in plan.entries:
        if is_new:
            parent, child = _parent_of(model, path)
            setattr(parent, child, layer)
        if not layer.merged:
            layer.tied_partners = plan.tied.get(path, ())
        if isinstance(result, nn.Module):  # init produced a new base module (e.g. LoftQ's quantised base)
            layer.base = result
            layer.ops = ops_for(result)
            for other in layer.adapters.values():
                other.on_base_changed()
        elif isinstance(result, torch.Tensor):
            layer.change_base_weight(lambda w, new=result: new)
        layer.add(plan.name, adapter)
    for path, wrapper, is_new, own in plan.copies:
        if is_new:
            parent, child = _parent_of(model, path)
            setattr(parent, child, wrapper)
        wrapper.add(plan.name, own)
    reg.configs[plan.name] = plan.config
    reg.layers[plan.name] = [entry.path for entry in plan.entries]
    reg.modules_to_save[plan.name] = plan.modules_to_save
    if plan.shared is not None:
        reg.shared[plan.name] = plan.shared
    # the new adapter trains; everything else freezes (except modules_to_save)
    trainable_params = {id(p) for entry in plan.entries for p in entry.adapter.parameters() if p.requires_grad}
    if plan.shared is not None:
        trainable_params |= {id(p) for p in plan.shared.parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(trainable and id(p) in trainable_params)
    for saved in plan.copies:  # the adapter's own copies train; the originals stay frozen
        for p in saved.copy.parameters():
            p.requires_grad_(trainable)
    if make_active:
        set_active(model, plan.name)


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Attach a new adapter to ``model`` in place and return the model.

    The new adapter becomes the active one and the only trainable parameters, with its own copies of the modules
    in ``modules_to_save`` (each adapter trains its own copy; the original module stays frozen and unchanged, see
    :class:`lorakit.layers.ModuleCopies`); all other parameters are frozen. Raises, leaving the model untouched,
    if nothing matches, the name is taken, or a targeted layer is unsupported.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, targets=["0", "2"]))
        >>> lorakit.adapter_names(net)
        ['default']
    """
    if registry_or_none(model) is not None:  # the new adapter becomes the only active one
        _refuse_head_switch(model, [name], f"attach(name={name!r})")
    plan = build_plan(model, config, name)
    commit_plan(model, plan)
    needs = get_method(config.method).base_requirements(config)
    if needs:  # saved with the adapter, so anyone loading it can tell which base it needs (LoftQ: its NF4 base)
        extra = plan.registry.extra.setdefault(name, {})
        extra["base"] = needs
        # and which exact 4-bit base: LoftQ's own codes, which a fresh quantisation need not reproduce
        prints = base_fingerprints(plan.entries)
        if prints:
            extra["base_fingerprints"] = prints
    return model


# ---------------------------------------------------------------------------------------------------------------
# management
# ---------------------------------------------------------------------------------------------------------------
def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model`` (attach order).

    Example:
        >>> import torch, lorakit
        >>> lorakit.adapter_names(torch.nn.Linear(2, 2))
        []
    """
    reg = registry_or_none(model)
    return list(reg.configs) if reg is not None else []


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    reg = registry_or_none(model)
    return list(reg.active) if reg is not None else []


def _check_known(model: nn.Module, names: Sequence[str]) -> AdapterRegistry:
    reg = registry(model)
    unknown = [n for n in names if n not in reg.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(reg.configs)}")
    return reg


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters; several active adapters add their deltas.

    A merged adapter stays in the base weights whatever is active; if it trains a whole module (modules_to_save),
    leaving it out of ``names`` would pair its merged weights with another copy of that module, so that is refused
    (ValueError, nothing changed; so are :func:`attach` and :func:`lorakit.load`, which activate the new adapter):
    call :func:`unmerge` first.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2), name="a")
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2), name="b")
        >>> lorakit.set_active(net, ["a", "b"]); lorakit.active_adapters(net)
        ['a', 'b']
    """
    names = [names] if isinstance(names, str) else list(names)
    reg = _check_known(model, names)
    _refuse_head_switch(model, names, f"set_active({names})")
    reg.active = names
    for _, layer in adapted_layers(model):
        layer.set_active(names)
    for _, wrapper in saved_modules(model):
        wrapper.set_active(names)


def _refuse_head_switch(model: nn.Module, names: Sequence[str], doing: str) -> None:
    """A merged adapter's change stays in the base weights whatever is active, but the module it trains whole
    (modules_to_save) runs only while it is active: making ``names`` active without it would run its merged body
    with another head (another adapter's copy, or the original). Refused before anything changes."""
    merged = {n for _, layer in adapted_layers(model) for n in layer.merged}
    for path, wrapper in saved_modules(model):
        for owner in sorted(merged & set(wrapper.copies)):
            if owner not in names:
                raise ValueError(f"{doing}: adapter {owner!r} is merged into the base weights and trains its own "
                                 f"copy of {path!r} (modules_to_save), so it would run its merged weights with "
                                 f"another {path!r}; call lorakit.unmerge(model) first")


def set_trainable(model: nn.Module, names: str | Sequence[str], trainable: bool = True) -> None:
    """Switch ``requires_grad`` of the named adapters' own trainable parameters."""
    names = [names] if isinstance(names, str) else list(names)
    reg = _check_known(model, names)
    for _, layer in adapted_layers(model):
        for n in names:
            if n in layer.adapters:
                adapter = layer.adapters[n]
                for pname, p in adapter.named_parameters():
                    p.requires_grad_(trainable and adapter.is_trainable(pname))
    for n in names:
        if n in reg.shared:
            for p in reg.shared[n].parameters():
                p.requires_grad_(trainable)
    for _, wrapper in saved_modules(model):
        for n in names:
            if n in wrapper.copies:
                for p in wrapper.copies[n].parameters():
                    p.requires_grad_(trainable)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block (merged adapters are unmerged for the block and merged back after).

    Modules that adapters train whole (``modules_to_save``) run their original inside the block.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> with lorakit.disabled(net):
        ...     y = net(torch.randn(1, 4))
    """
    layers = [layer for _, layer in adapted_layers(model)]
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
    remerge = {id(layer): list(layer.merged) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
        layer.refresh()
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(remerge[id(layer)])
            layer.refresh()
        for wrapper in wrappers:
            wrapper.disabled = False


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if merged) and its copies of ``modules_to_save`` modules.
    The last adapter leaves plain layers and the original modules behind. A base-weight shift it made (PiSSA,
    Delta-LoRA) is undone up to the roundings it took, as in :func:`unload`.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> lorakit.delete(net, "default"); lorakit.adapter_names(net)
        []
    """
    reg = _check_known(model, [name])
    layers = list(adapted_layers(model))
    for path, layer in layers:
        if name in layer.adapters:
            layer.remove(name)
        if not layer.adapters:
            parent, child = _parent_of(model, path)
            setattr(parent, child, layer.base)
    _sync_tie_settings(model, reg, layers)
    del reg.configs[name]
    reg.layers.pop(name, None)
    reg.modules_to_save.pop(name, None)
    reg.extra.pop(name, None)
    reg.shared.pop(name, None)
    reg.active = [n for n in reg.active if n != name]
    for path, wrapper in list(saved_modules(model)):
        if name in wrapper.copies:
            wrapper.remove(name)
        if not wrapper.copies:  # no adapter trains it any more: the original module object goes back
            parent, child = _parent_of(model, path)
            setattr(parent, child, wrapper.original)
    if not reg.configs:
        del model.__dict__[REGISTRY_ATTR]


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights for zero-overhead inference.

    Merges accumulate in fp32 (fp64 for fp64 layers) and round once to the weight's dtype. A 4-bit base is
    dequantised to its compute dtype first (exact; see :func:`lorakit.quant.requantize` to go back to 4-bit).

    * Exact to undo: each merged layer keeps its pre-merge weight (one extra copy, in the weight's dtype, until
      :func:`unmerge` or :func:`unload`), so unmerging everything restores every base weight bit-exactly, in
      every dtype (fp32, fp16, bf16, ...).
    * Refused, before any layer changes, if a merged weight would not be finite in its dtype (an fp16 overflow,
      NaN factors): the ValueError names the layer; merge in float32/bfloat16 instead.
    * Tied weights (e.g. ``lm_head`` sharing ``embed_tokens``' Parameter): the adapted layer first gets its own
      copy of the weight, so only its function changes and the partner keeps the original; a UserWarning says so,
      and transformers' ``config.tie_word_embeddings`` is set to False so ``save_pretrained`` writes both and
      ``from_pretrained`` keeps them apart. :func:`unmerge` re-ties them (and restores the setting).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> lorakit.merge(net)
    """
    reg = registry(model)
    names = list(reg.active) if names is None else ([names] if isinstance(names, str) else list(names))
    _check_known(model, names)
    for name in names:
        method = get_method(reg.configs[name].method)
        if not method.mergeable:
            raise ValueError(f"adapter {name!r} ({method.method}) cannot be merged into the base weights")
    layers = list(adapted_layers(model))
    for _, layer in layers:  # every layer's result is checked before any layer changes
        layer.check_merge(names)
    _refresh_ties(model)
    untied = []
    for path, layer in layers:
        partners = layer.merge(names)
        if partners:
            untied.append(f"{path} (tied with {', '.join(partners)})")
    if untied:
        warnings.warn(
            f"lorakit.merge: {'; '.join(untied)}: the weight is shared (tied weights), so to merge only the adapted "
            "layer it now has its own copy of the weight with the change folded in, and the partner keeps the "
            "original (transformers: config.tie_word_embeddings set to False, so a saved model loads them apart). "
            "lorakit.unmerge(model) re-ties them.", UserWarning, stacklevel=2)
    _sync_tie_settings(model, reg, layers)


# unload's ``merge`` flag shadows merge() inside it; this second name reaches the function
merge_adapters = merge


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Undo :func:`merge` (all merged adapters by default).

    Unmerging every adapter of a layer restores its pre-merge weight bit-exactly (any dtype) and re-ties a
    weight that merge had untied (if its partners still hold the original unchanged; otherwise the layer keeps
    its own equal copy). A partial unmerge leaves the original weight plus the remaining merged changes,
    accumulated in fp32 and rounded once.
    """
    names = None if names is None else ([names] if isinstance(names, str) else list(names))
    layers = list(adapted_layers(model))
    for _, layer in layers:
        layer.unmerge(names)
    reg = registry_or_none(model)
    if reg is not None:
        _sync_tie_settings(model, reg, layers)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit object and return the model with its original module types.

    ``merge=True`` first merges the active adapters (see :func:`merge`: refused if a weight would overflow; a tied
    weight is untied with a warning), so the returned plain model computes the adapted function.
    ``merge=False`` returns the original base model: adapters merged earlier are unmerged first (bit for bit, in
    every dtype), so their deltas leave the weights too. A base-weight shift (PiSSA's residual ``W - s·B0·A0``,
    Delta-LoRA's accumulated updates) is undone by taking it back in fp32 and rounding once; the shifted weight
    itself was rounded when it was made (PiSSA: once; Delta-LoRA: at every update), so such a layer comes back
    within those roundings (PiSSA: about one unit in the last place of its dtype), not bit for bit. A module
    trained whole (``modules_to_save``) is replaced by the active adapter's copy with ``merge=True`` (refused,
    before anything changes, if several active adapters own one), by its original module with ``merge=False``.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> type(lorakit.unload(net)[0]).__name__
        'Linear'
    """
    reg = registry_or_none(model)
    wrappers = list(saved_modules(model))
    # which module each wrapper leaves behind, decided (and refused if ambiguous) before anything changes
    keep = {path: (wrapper.current() if merge else wrapper.original) for path, wrapper in wrappers}
    if reg is not None and merge:
        merge_adapters(model)
    for path, layer in list(adapted_layers(model)):
        if not merge:
            layer.unmerge()  # the original weights, not the merged ones (unmerge undoes every merge exactly)
        for name in list(layer.adapters):
            if name not in layer.merged:
                layer.remove(name)
        parent, child = _parent_of(model, path)
        setattr(parent, child, layer.base)
    for path, _ in wrappers:
        parent, child = _parent_of(model, path)
        setattr(parent, child, keep[path])
    if reg is not None:
        del model.__dict__[REGISTRY_ATTR]
    return model


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, example ``i`` of every batch runs through adapter ``names[i]`` (``None``: base model).

    A module adapters train whole (``modules_to_save``) runs each example through its adapter's copy (the original
    for ``None`` and adapters without one); such a module must take batch-first inputs.

    Works in eval and train mode; adapters must not be merged.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2), name="a")
        >>> with lorakit.route(net, ["a", None]):
        ...     y = net(torch.randn(2, 4))
    """
    names = list(names)
    _check_known(model, [n for n in names if n is not None])
    layers = [layer for _, layer in adapted_layers(model)]
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise RuntimeError(f"route() cannot run with merged adapters {merged}; call lorakit.unmerge(model) first")
    state = RouteState(names)
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
    for module in layers + wrappers:
        module.set_route(state)
    try:
        yield model
    finally:
        for module in layers + wrappers:
            module.set_route(None)


# ---------------------------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------------------------
COMBINE_HOW = ("cat", "linear", "svd") + TASK_VECTOR_RULES


def combine(model: nn.Module, weights: dict[str, float], name: str = "mix", how: str = "cat",
            rank: int | None = None, *, density: float | None = None, majority_sign: str = "total",
            seed: int | None = None, energy: float | None = None) -> nn.Module:
    """Add adapter ``name`` mixing existing adapters with ``weights``.

    * ``cat``: exactly ``Σ w_i ΔW_i`` (rank = sum of ranks).
    * ``linear``: PEFT's definition, ``A = Σ sign(w_i)·sqrt(|w_i s_i|)·A_i``, ``B = Σ sqrt(|w_i s_i|)·B_i``,
      equal ranks only; an approximation (cross terms ``B_i A_j`` appear).
    * ``svd``: best rank-``rank`` approximation (default: the largest source rank, capped per layer at
      ``min(out, in)``) of ``Σ w_i ΔW_i``. An explicit ``rank`` must be an integer from 1 to ``min(out, in)`` of
      every mixed layer (else ValueError); ``rank`` with ``cat``/``linear`` is a ValueError.

    Methods with a non-linear layer function (DoRA) provide their own rule (see their docs).

    Task-vector rules (:mod:`lorakit.mixing`), on each adapter's exact change to the original base weight, for every
    family member: ``task_arithmetic`` (``Σ w_i ΔW_i``), ``magnitude_prune`` / ``ties`` (need ``density``, the
    fraction kept, 0 < density ≤ 1; TIES elects signs by ``majority_sign="total" | "frequency"``) and
    ``dare_linear`` / ``dare_ties`` (``density``; ``seed``: the same seed gives the same mix, None draws one from
    torch's RNG, records it in :func:`lorakit.mix_report` and names it in a UserWarning, so any mix can be made
    again; ``lorakit mix`` requires ``--seed``). The result is a plain LoRA: exact by default (the mix's numerical
    rank per layer), or the best approximation of ``rank`` or ``energy`` (a UserWarning gives the worst error);
    :func:`lorakit.mix_report` lists each layer's rank and relative error. These rules need the adapters on the same
    layers and not merged.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> for n in "ab": _ = lorakit.attach(net, lorakit.AdapterConfig(r=2), name=n)
        >>> _ = lorakit.combine(net, {"a": 0.7, "b": 0.3}, name="mix", how="cat")
    """
    if how not in COMBINE_HOW:
        raise ValueError(f"combine(how={how!r}) is invalid; allowed: {', '.join(COMBINE_HOW)}")
    if how in TASK_VECTOR_RULES:
        return _combine_task_vectors(model, weights, name, how, rank, density, majority_sign, seed, energy)
    if density is not None or seed is not None or energy is not None or majority_sign != "total":
        raise ValueError(f"combine(how={how!r}) takes no density/seed/energy/majority_sign; they belong to how in "
                         f"{TASK_VECTOR_RULES}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"combine(rank={rank!r}) is invalid; allowed: None (the largest source rank) or an "
                             "integer >= 1")
        if how != "svd":
            raise ValueError(f"combine(rank={rank!r}) only applies to how='svd'; how={how!r} keeps the source "
                             "ranks (drop rank, or use how='svd')")
        rank = int(rank)
    reg = _check_mix_sources(model, weights, name)
    methods = {reg.configs[n].method for n in weights}
    plan_layers = []
    for path, layer in adapted_layers(model):
        sources = [(layer.adapters[n], float(w)) for n, w in weights.items() if n in layer.adapters]
        if sources:
            plan_layers.append((path, layer, sources))
    if rank is not None:
        limit = {path: min(layer.ops.out_features, layer.ops.in_features) for path, layer, _ in plan_layers}
        over = [p for p, m in limit.items() if rank > m]
        if over:
            raise ValueError(f"combine(rank={rank}) exceeds what layer {over[0]!r} can hold (rank <= "
                             f"min(out, in) = {limit[over[0]]}); use rank <= {min(limit.values())}")
    new_adapters = {}
    for path, layer, sources in plan_layers:
        new_adapters[path] = combine_adapters(methods, layer, sources, how, rank)
    _commit_mix(model, reg, weights, name, plan_layers, new_adapters)
    return model


def _check_mix_sources(model: nn.Module, weights: dict[str, float], name: str) -> AdapterRegistry:
    """The checks every combine makes on its inputs (names, weights, heads), before anything is built."""
    if not weights:
        raise ValueError("combine() needs at least one adapter in weights")
    reg = _check_known(model, list(weights))
    check_adapter_name(name)
    if name in reg.configs:
        raise ValueError(f"adapter name {name!r} is taken on this model; pick another name")
    heads = {n: reg.modules_to_save[n] for n in weights if reg.modules_to_save.get(n)}
    if heads:
        raise ValueError(f"combine() cannot mix adapters that train whole modules (modules_to_save: {heads}): "
                         "there is no meaningful mix of their copies, and the mix would silently run the original "
                         "modules; combine adapters without modules_to_save")
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):  # True is not 1.0 here
            raise ValueError(f"combine weight for {k!r} must be a finite number, got {w!r}; give it as a number, "
                             f"e.g. {{{k!r}: 1.0}}")
    return reg


def _combine_task_vectors(model: nn.Module, weights: dict[str, float], name: str, how: str, rank: int | None,
                          density: float | None, majority_sign: str, seed: int | None,
                          energy: float | None) -> nn.Module:
    """:func:`combine` with a rule of :mod:`lorakit.mixing`: checks, every layer's mix built on the side, commit."""
    check_mix_options(how, density, majority_sign, seed, rank, energy)
    reg = _check_mix_sources(model, weights, name)
    names = list(weights)
    covered = {n: set(reg.layers.get(n, [])) for n in names}
    union = set().union(*covered.values())
    lacking = {n: sorted(union - paths) for n, paths in covered.items() if union - paths}
    if lacking:
        detail = "; ".join(f"{n!r} does not adapt {_short_list(p, 5)}" for n, p in lacking.items())
        raise ValueError(f"combine(how={how!r}) mixes layer by layer and needs the adapters on the same layers: "
                         f"{detail}. Attach them with the same targets, or use how='cat' (an absent adapter adds 0)")
    plan_layers = []
    for path, layer in adapted_layers(model):
        merged = [n for n in names if n in layer.merged]
        if merged:
            raise ValueError(f"combine(how={how!r}): adapter(s) {merged} are merged into {path!r}, so their change "
                             "is part of the base weight; call lorakit.unmerge(model) first")
        if any(n in layer.adapters for n in names):
            plan_layers.append((path, layer, [(n, layer.adapters[n], float(weights[n])) for n in names]))
    if how in ("dare_linear", "dare_ties") and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # recorded in the report: any mix can be redone
        warnings.warn(f"combine(how={how!r}) without seed drew seed={seed} (recorded in lorakit.mix_report(model, "
                      f"{name!r}).seed); pass seed={seed} to make the same mix again", UserWarning, stacklevel=3)
    report = MixReport(name=name, how=how, weights={n: float(w) for n, w in weights.items()},
                       density=None if density is None else float(density),
                       majority_sign=majority_sign if how in ("ties", "dare_ties") else None, seed=seed,
                       rank=None if rank is None else int(rank), energy=None if energy is None else float(energy))
    new_adapters = {}
    with torch.no_grad():
        for path, layer, sources in plan_layers:
            new_adapters[path], report.layers[path] = mix_layer(layer, path, sources, how, density, majority_sign,
                                                                seed, rank, energy)
    _commit_mix(model, reg, weights, name, [(p, layer, s) for p, layer, s in plan_layers], new_adapters)
    record_report(model, report, list(new_adapters.values()))
    if not report.exact:
        worst = max(report.layers, key=lambda p: report.layers[p].rel_error)
        warnings.warn(f"combine(how={how!r}, rank={rank}, energy={energy}): adapter {name!r} approximates the mix "
                      f"(worst relative error {report.layers[worst].rel_error:.3g} at {worst!r}); "
                      f"lorakit.mix_report(model, {name!r}) lists every layer", UserWarning, stacklevel=3)
    return model


def _commit_mix(model: nn.Module, reg: AdapterRegistry, weights: dict[str, float], name: str, plan_layers: list,
                new_adapters: dict[str, Adapter]) -> None:
    """Add the built adapters as ``name`` (frozen, a plain config with one rank per layer and scaling 1)."""
    first = next(iter(new_adapters.values()))
    ranks = {path: a.r for path, a in new_adapters.items()}
    config = reg.configs[next(iter(weights))].replace(
        method=first.method, r=max(ranks.values()), alpha=None, targets=sorted(new_adapters),
        rank_pattern=ranks, alpha_pattern={p: float(r) for p, r in ranks.items()}, scaling="standard",
        init="kaiming", dropout=0.0, modules_to_save=[], exclude=None,
    )
    # commit
    for path, layer, _ in plan_layers:
        layer.add(name, new_adapters[path])
    reg.configs[name] = config
    reg.layers[name] = sorted(new_adapters)
    reg.modules_to_save[name] = []
    for p in (p for a in new_adapters.values() for p in a.parameters()):
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------------------------
def _logical_numel(module: nn.Module) -> int:
    """Parameters of a module counted as the model's logical weights (packed 4-bit weights count per weight)."""
    total = 0
    seen: set[int] = set()
    for m in module.modules():
        logical = getattr(m, "logical_numel", None)
        if callable(logical):
            total += logical()
            seen.update(id(p) for p in m.parameters(recurse=False))
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> lorakit.trainable_parameters(net)
        (16, 36)
    """
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    return trainable, _logical_numel(model)


def parameter_report(model: nn.Module) -> str:
    """A human-readable table: per adapter its method, layers, own parameters and share of the model.

    Frozen shared tensors (VeRA's random pair) are listed separately: they are counted as "frozen extra",
    not as trainable parameters.
    """
    reg = registry(model)
    base_total = 0
    adapter_param_ids: set[int] = set()
    for _, layer in adapted_layers(model):
        for adapter in layer.adapters.values():
            adapter_param_ids.update(id(p) for p in adapter.parameters())
    for n in reg.shared:
        adapter_param_ids.update(id(p) for p in reg.shared[n].parameters())
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
    for wrapper in wrappers:
        adapter_param_ids.update(id(p) for p in wrapper.copies.parameters())
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in adapter_param_ids and id(p) not in seen:
            seen.add(id(p))
            base_total += p.numel()
    for m in model.modules():
        logical = getattr(m, "logical_numel", None)
        if callable(logical):
            base_total += logical() - sum(p.numel() for p in m.parameters(recurse=False))
    lines = [f"{'adapter':<16}{'method':<12}{'layers':>7}{'params':>12}{'% of base':>11}{'frozen extra':>14}  active"]
    for name, cfg in reg.configs.items():
        own, frozen_extra, n_layers = 0, 0, 0
        counted: set[int] = set()
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                n_layers += 1
                adapter = layer.adapters[name]
                for pname, p in adapter.named_parameters():
                    if id(p) not in counted and not pname.startswith("shared."):
                        counted.add(id(p))
                        if adapter.is_trainable(pname):
                            own += p.numel()
                        else:
                            frozen_extra += p.numel()
        if name in reg.shared:
            for p in reg.shared[name].parameters():
                if id(p) not in counted:
                    counted.add(id(p))
                    if p.requires_grad:
                        own += p.numel()
                    else:
                        frozen_extra += p.numel()
            frozen_extra += sum(b.numel() for b in reg.shared[name].buffers())
        for wrapper in wrappers:  # its own copies of modules_to_save modules
            if name in wrapper.copies:
                own += sum(p.numel() for p in wrapper.copies[name].parameters() if id(p) not in counted)
        share = 100.0 * own / max(base_total, 1)
        lines.append(f"{name:<16}{cfg.method:<12}{n_layers:>7}{own:>12,}{share:>10.3f}%{frozen_extra:>14,}  "
                     f"{'yes' if name in reg.active else 'no'}")
    lines.append(f"base model parameters: {base_total:,}")
    return "\n".join(lines)
