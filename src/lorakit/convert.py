"""Any family member as a plain LoRA: ``to_lora`` and the one-rank factors the serving targets need.

Every member's trained function on a layer is the base weight plus a dense change: DoRA's magnitude-rescaled
direction, VeRA's scaled random pair, AdaLoRA's pruned triplets, SoRA's gated rank, LoRA-drop's shared pair, and for
the members that move the base itself (PiSSA's residual, Delta-LoRA's accumulated updates) that movement too. The
change relative to the **original** base weight is::

    ΔW = adapter.delta_weight(layer) + adapter.base_shift()        (base_shift: None -> 0)

and a plain LoRA ``B A`` carries it exactly when its rank allows; otherwise :func:`lorakit.lowrank.factorize` (the
one truncated-SVD rule) gives the best rank-k approximation and its relative error.

Where the new LoRA applies:

* members that shifted the base (PiSSA, Delta-LoRA): to the original, unshifted base weights. In the model holding
  both, lorakit runs it on them: whenever the shifting adapter is not active, the layer undoes its shift (the same
  rule that gives every other adapter the true base). Saved alone or exported, it loads onto the unmodified base
  model, like ``save(convert_pissa=True)``;
* LoftQ: to the dequantised 4-bit NF4 base it was fitted to (its ``extra["base"]`` requirement is copied, so
  :func:`lorakit.quant.quantize_for_adapter` still prepares the right base for it);
* every other member: to the base as it is.

Per-layer ranks: :func:`to_lora` keeps each layer's own rank (``rank_pattern``/``alpha_pattern`` with exact layer
paths, alpha = rank so the scale is 1), which wastes nothing and which PEFT reads. ``uniform=True`` pads every layer
with zero rows/columns to one rank with one alpha, which vLLM, SGLang and llama.cpp need (they read one rank and one
alpha per adapter); :func:`uniform_lora_factors` gives those factors with the scale folded into ``B``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .lowrank import LayerFit, LowRank, check_rank_energy, factorize, factorize_product
from .methods import get_method
from .methods.lora import LoraAdapter
from .model import base_fingerprints, check_adapter_name, registry, saved_copy
from .registry import AdapterEntry, adapter_entries

__all__ = ["LayerConversion", "ToLoraReport", "describe_conversion", "layer_factorization", "member_delta", "to_lora",
           "uniform_lora_factors"]


@dataclass(frozen=True)
class LayerConversion(LayerFit):
    """One layer of a conversion: where it is and its kind, beside the :class:`~lorakit.lowrank.LayerFit` figures."""

    path: str = ""
    kind: str = ""


@dataclass
class ToLoraReport:
    """What :func:`to_lora` did: per-layer rank and relative error, and on which base the new LoRA applies."""

    source: str
    new_name: str
    method: str
    layers: list[LayerConversion] = field(default_factory=list)
    rank: int | None = None
    energy: float | None = None
    uniform_rank: int | None = None
    base: str = "the base weights as they are"
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((layer.rel_error for layer in self.layers), default=0.0)

    @property
    def exact(self) -> bool:
        return all(layer.exact for layer in self.layers)

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.path: layer.rank for layer in self.layers}

    def __str__(self) -> str:
        asked = (f"rank <= {self.rank}" if self.rank is not None else
                 f"energy {self.energy:g}" if self.energy is not None else "any rank")
        head = (f"to_lora: adapter {self.source!r} ({self.method}) -> plain LoRA {self.new_name!r} ({asked}; "
                f"{'exact' if self.exact else f'max relative error {self.max_rel_error:.3g}'})")
        width = max([len("layer")] + [len(layer.path) for layer in self.layers])
        rows = [head, f"  applies to: {self.base}"]
        if self.uniform_rank is not None:
            rows.append(f"  one rank for every layer: {self.uniform_rank} (zero-padded), alpha = rank")
        if self.modules_to_save:
            rows.append(f"  modules trained whole, copied: {', '.join(self.modules_to_save)}")
        rows.append(f"  {'layer':<{width}}  {'kind':<9} {'rank':>5} {'exact rank':>10} {'rel error':>10}")
        for layer in self.layers:
            rows.append(f"  {layer.path:<{width}}  {layer.kind:<9} {layer.rank:>5} {layer.exact_rank:>10} "
                        f"{layer.rel_error:>10.3g}")
        return "\n".join(rows)


def member_delta(layer: Any, adapter: Any) -> torch.Tensor:
    """The member's whole change of ``layer``'s weight relative to the original base, fp32 ``[out, in]``:
    ``delta_weight(layer)`` plus ``base_shift()`` (PiSSA's residual shift, Delta-LoRA's accumulated updates).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> member_delta(net[0], net[0].adapters["default"]).shape
        torch.Size([4, 4])
    """
    delta = adapter.delta_weight(layer).detach().float()
    shift = adapter.base_shift()
    if shift is not None:
        delta = delta + shift.detach().float().to(delta.device)
    return delta


def _entries(model: nn.Module, name: str) -> list[AdapterEntry]:
    return adapter_entries(model, name)


def _check_source(model: nn.Module, name: str, what: str) -> list[tuple[str, Any, Any]]:
    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"{what}: unknown adapter {name!r}; this model has {list(reg.configs)}")
    entries = _entries(model, name)
    if not entries:
        raise ValueError(f"{what}: adapter {name!r} adapts no layer (nothing to convert)")
    merged = sorted({path for path, layer, _ in entries if layer.merged})
    if merged:
        raise ValueError(f"{what}: layer(s) {merged[:3]} hold merged adapters, so their base weights are not the "
                         f"ones the adapter's change is relative to; lorakit.unmerge(model) first")
    return entries


def layer_factorization(layer: Any, adapter: Any, rank: int | None = None, energy: float | None = None) -> LowRank:
    """:func:`member_delta` of one layer as LoRA factors by the one truncated-SVD rule. A member with an exact
    low-rank form (``as_lora_factors``: LoRA and its inits, VeRA, AdaLoRA, SoRA, LoRA-drop, LoRA-FA) is decomposed
    from its thin factors (:func:`~lorakit.lowrank.factorize_product`, no dense SVD); DoRA and Delta-LoRA, whose
    change is full-rank, from the dense change (:func:`~lorakit.lowrank.factorize`).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="dora", r=2))
        >>> layer_factorization(net[0], net[0].adapters["default"], rank=1).rank
        1
    """
    try:
        a, b, s = adapter.as_lora_factors()  # s·B·A is the change on the original base (PiSSA's shift included)
    except ValueError:  # no exact low-rank form (the strategy says so)
        return factorize(member_delta(layer, adapter), rank=rank, energy=energy)
    return factorize_product(b.detach().float() * s, a.detach().float(), rank=rank, energy=energy)


def _factorize_layers(entries, rank: int | None, energy: float | None) -> list[tuple[str, Any, LowRank]]:
    return [(path, layer, layer_factorization(layer, adapter, rank, energy)) for path, layer, adapter in entries]


def _pad(f: LowRank, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``f``'s factors with zero rows of A / columns of B up to rank ``r`` (the product is unchanged)."""
    extra = r - f.rank
    if extra <= 0:
        return f.A, f.B
    a = torch.cat([f.A, f.A.new_zeros(extra, f.A.shape[1])], dim=0)
    b = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], extra)], dim=1)
    return a, b


def _warn_inexact(what: str, name: str, layers: list[LayerConversion]) -> None:
    inexact = sorted((layer for layer in layers if not layer.exact), key=lambda layer: -layer.rel_error)
    if inexact:
        worst = inexact[0]
        warnings.warn(f"{what}: adapter {name!r} is not exact as a LoRA of the asked rank on {len(inexact)} of "
                      f"{len(layers)} layer(s); largest relative error {worst.rel_error:.3g} at layer {worst.path} "
                      f"(rank {worst.rank}, its change has rank {worst.exact_rank}); pass a larger rank or energy, "
                      f"or none for an exact conversion", stacklevel=3)


def _base_note(model: nn.Module, name: str, entries) -> tuple[str, dict | None]:
    config = registry(model).configs[name]
    needs = get_method(config.method).base_requirements(config)
    if any(adapter.base_shift() is not None for _, _, adapter in entries):
        return ("the ORIGINAL base weights (the member shifted them; in this model the new LoRA runs on them "
                "whenever the member is not active, and saved or exported it loads onto the unmodified base "
                "model)"), needs
    if needs:
        spec = ", ".join(f"{k}={v}" for k, v in needs.items())
        return (f"the base the member was fitted to ({spec}): its dequantised weights, not the full-precision "
                f"originals"), needs
    return "the base weights as they are", needs


def to_lora(model: nn.Module, name: str = "default", new_name: str | None = None, rank: int | None = None,
            energy: float | None = None, uniform: bool = False) -> ToLoraReport:
    """Add a plain LoRA adapter ``new_name`` (default ``f"{name}_lora"``) carrying adapter ``name``'s weight change.

    On every layer ``name`` adapts, the new adapter's ``B A`` equals the member's exact change relative to the
    original base (:func:`member_delta`: DoRA's magnitude included, PiSSA's and Delta-LoRA's base shifts included,
    LoftQ relative to its NF4 base), exactly when ``rank``/``energy`` are not given, else as the best rank-``k``
    approximation (``rank=k``) or the smallest rank keeping ``energy`` of the squared singular values. Inexact layers
    raise a warning naming the worst layer and its error. ``uniform=True`` pads every layer to one rank (zeros) with
    one alpha, the shape vLLM, SGLang and llama.cpp read. The member's own copies of ``modules_to_save`` modules are
    copied for the new adapter. The new adapter is frozen and not activated (``lorakit.set_active(model,
    new_name)``); nothing else changes. Bad input raises before any change.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(method="dora", r=2))
        >>> report = lorakit.to_lora(net)
        >>> report.new_name, report.exact, lorakit.adapter_names(net)
        ('default_lora', True, ['default', 'default_lora'])
    """
    check_rank_energy(rank, energy, "to_lora")
    entries = _check_source(model, name, "to_lora")
    reg = registry(model)
    new_name = f"{name}_lora" if new_name is None else new_name
    check_adapter_name(new_name)
    if new_name in reg.configs:
        raise ValueError(f"to_lora: adapter name {new_name!r} is taken on this model (have: {list(reg.configs)}); "
                         f"pass another new_name or lorakit.delete(model, {new_name!r}) first")
    source = reg.configs[name]
    factors = _factorize_layers(entries, rank, energy)
    layers = [LayerConversion(f.rank, f.exact_rank, f.rel_error, path=path, kind=layer.ops.kind) for path, layer, f in factors]
    r_all = max(f.rank for _, _, f in factors) if uniform else None
    adapters = {}
    for path, layer, f in factors:
        a, b = _pad(f, r_all) if uniform else (f.A, f.B)
        adapters[path] = LoraAdapter.from_factors(layer.ops, path, a, b, 1.0)
    ranks = {path: a.r for path, a in adapters.items()}
    top = max(ranks.values())
    # scale 1 on every layer: alpha = rank (per layer through the patterns, which name exact layer paths)
    config = source.replace(
        method="lora", r=top, alpha=float(top), targets=sorted(adapters),
        rank_pattern={p: r for p, r in ranks.items() if r != top} or None,
        alpha_pattern={p: float(r) for p, r in ranks.items() if r != top} or None,
        scaling="standard", init="kaiming", dropout=0.0, exclude=None, modules_to_save=[])
    base_note, needs = _base_note(model, name, entries)
    prints = base_fingerprints(entries) if needs else {}
    heads = list(reg.modules_to_save.get(name, []))
    copies = {path: copy.deepcopy(saved_copy(model, path, name)) for path in heads}
    # commit: nothing above changed the model
    for path, layer, _ in entries:
        layer.add(new_name, adapters[path])
    for path, module in copies.items():
        wrapper = model.get_submodule(path)
        for p in module.parameters():
            p.requires_grad_(False)
        wrapper.add(new_name, module)
    reg.configs[new_name] = config.replace(modules_to_save=heads) if heads else config
    reg.layers[new_name] = sorted(adapters)
    reg.modules_to_save[new_name] = heads
    if needs:  # and the exact 4-bit base: the new LoRA carries the member's change relative to it
        reg.extra[new_name] = {"base": dict(needs)}
        if prints:
            reg.extra[new_name]["base_fingerprints"] = prints
    for adapter in adapters.values():
        for p in adapter.parameters():
            p.requires_grad_(False)
    report = ToLoraReport(source=name, new_name=new_name, method=source.method, layers=layers, rank=rank,
                          energy=energy, uniform_rank=r_all, base=base_note, modules_to_save=heads)
    _warn_inexact("to_lora", name, layers)
    return report


def uniform_lora_factors(model: nn.Module, name: str = "default", rank: int | None = None, energy: float | None = None
                         ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """Adapter ``name`` as one-rank LoRA factors, the layout llama.cpp's GGUF adapters (and vLLM, SGLang) read:
    ``({layer path: (A [r, in], B [out, r])}, alpha, r)`` with the scale folded into ``B`` and ``alpha = r`` (so a
    reader's ``alpha / r`` is 1), every layer zero-padded to the largest rank. ``B @ A`` is the member's change
    relative to the original base (:func:`member_delta`), exact unless ``rank``/``energy`` are given (then a warning
    names the worst layer). fp32 tensors on the adapter's device; the model is not changed.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2, rank_pattern={"1": 3}))
        >>> for layer in net:
        ...     _ = layer.adapters["default"].B.data.normal_()  # as if trained
        >>> factors, alpha, r = uniform_lora_factors(net)
        >>> r, alpha, tuple(factors["0"][0].shape)
        (3, 3.0, (3, 8))
    """
    check_rank_energy(rank, energy, "uniform_lora_factors")
    entries = _check_source(model, name, "uniform_lora_factors")
    factors = _factorize_layers(entries, rank, energy)
    _warn_inexact("uniform_lora_factors", name,
                  [LayerConversion(f.rank, f.exact_rank, f.rel_error, path=p, kind=layer.ops.kind) for p, layer, f in factors])
    r = max(f.rank for _, _, f in factors)
    return {path: _pad(f, r) for path, _, f in factors}, float(r), r


def describe_conversion(report: ToLoraReport) -> str:
    """One line for an export table: ``converted from <method> at rank r (exact | max rel error e)``."""
    ranks = sorted(set(report.ranks.values()))
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    return (f"converted from {report.method} to plain LoRA at rank {shown} "
            f"({'exact' if report.exact else f'max relative error {report.max_rel_error:.3g}'})")
