"""Optimisers for adapted models: LoRA+ parameter groups and AdamW variants (fp32, 8-bit, paged) chosen by name.

**Parameter groups** (:func:`loraplus_param_groups`, used by :func:`make_optimizer`). Only trainable parameters
(``requires_grad``) are included. Each adapter parameter is grouped by its adapter's ``param_role(name)``:

========================  =======================================  ==========================================
parameter                 ``vector_rate="base"`` (lorakit default)  ``vector_rate="high"`` (PEFT-compatible)
========================  =======================================  ==========================================
LoRA B (role "B")         ``lr·ratio``                              ``lr·ratio``
LoRA A (role "A")         ``lr``                                    ``lr``
1-D adapter tensors       ``lr``                                    ``lr·ratio``
(role "vector": DoRA
magnitude, VeRA d and b,
SoRA gate, AdaLoRA λ)
embedding adapters        ``embedding_lr`` (default ``lr``)         ``embedding_lr`` (default ``lr``); 1-D ones
(role "embedding")                                                  ``lr·ratio``
other trainable tensors   ``lr``                                    1-D (biases, norms): ``lr·ratio``;
(modules_to_save heads,                                             others: ``lr``
biases, full fine-tuning)
========================  =======================================  ==========================================

Why the default (methods.md §3, §17): LoRA+'s argument (B needs a larger rate than A as width grows) is about the
two factor matrices only. PEFT's ``create_loraplus_optimizer`` also gives ``lr·ratio`` to *every* 1-D tensor, so
biases, LayerNorm weights, DoRA magnitudes and VeRA vectors silently get a 16x learning rate; lorakit keeps them at
``lr`` unless you ask for PEFT's rule with ``vector_rate="high"``. Embedding adapters are initialised the other way
round (A = 0, B random), where the theory's roles flip, so both their matrices get one rate: ``embedding_lr``, which
defaults to ``lr`` (PEFT's default is 1e-6, which all but freezes them). ``vector_rate="high", embedding_lr=1e-6``
reproduces PEFT's groups exactly (learning rates and weight decay).

Weight decay: ``weight_decay`` for every tensor except biases and normalisation-layer weights, which get 0 (the
transformers Trainer's convention; PEFT's LoRA+ does the same for its 1-D group, but recognises only
``nn.LayerNorm``, so a trainable RMSNorm weight decays there and not here; what a norm is: one rule,
:func:`lorakit.layers.is_norm`, shared with quantisation). An adapter's
``optimizer_options(param_name, config)`` overrides win over all of the above (SoRA's gates: ``weight_decay=0`` and
their own ``lr``); parameters with equal settings share a group. Every group carries a ``"name"`` (its role, plus
``/no_decay`` or the overrides) for logging.

**Optimisers** (:func:`make_optimizer`): ``"adamw"`` (torch), ``"adamw8bit"`` (lorakit's pure-PyTorch 8-bit AdamW,
:class:`lorakit.quant.adamw8bit.AdamW8bit`, state <= 0.3x of fp32 AdamW's), ``"paged_adamw8bit"`` and
``"paged_adamw"`` (bitsandbytes' paged optimisers on CUDA when bitsandbytes is installed; elsewhere paging has
nothing to do, so they fall back to ``adamw8bit`` / ``adamw`` with one warning saying so), and ``"sgd"``.

Example:
    >>> import torch, lorakit
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=4, targets=["0"], modules_to_save=["2"]))
    >>> opt = make_optimizer("adamw", net, lr=1e-4, weight_decay=0.01, loraplus_ratio=16)
    >>> [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    [('A', 0.0001, 0.01, 1), ('B', 0.0016, 0.01, 1), ('other', 0.0001, 0.01, 1), ('other/no_decay', 0.0001, 0.0, 1)]
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from .layers import AdaptedLayer, is_norm
from .quant.adamw8bit import AdamW8bit
from .registry import registry_or_none

__all__ = [
    "OPTIMIZERS",
    "PagedOptimizerFallbackWarning",
    "loraplus_param_groups",
    "make_optimizer",
    "parameter_lrs",
]

#: names accepted by :func:`make_optimizer`
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "sgd")
_ALIASES = {
    "adamw_torch": "adamw",
    "adamw_8bit": "adamw8bit",
    "adamw_bnb_8bit": "adamw8bit",
    "paged_adamw_8bit": "paged_adamw8bit",
    "paged_adamw_32bit": "paged_adamw",
}
_VECTOR_RATES = ("base", "high")
_ROLE_ORDER = ("A", "B", "vector", "embedding", "other")


class PagedOptimizerFallbackWarning(UserWarning):
    """A paged optimiser was requested where paging cannot work; the plain optimiser is used instead."""


# ---------------------------------------------------------------------------------------------------------------
# which parameter is what
# ---------------------------------------------------------------------------------------------------------------
def _adapter_owners(model: nn.Module) -> dict[int, tuple[Any, str, Any]]:
    """``id(param) -> (adapter, name inside the adapter, adapter's config or None)`` for every adapter parameter."""
    configs: dict[str, Any] = {}
    for module in model.modules():  # the registry sits on the model the user attached to (maybe wrapped)
        reg = registry_or_none(module)
        if reg is not None:
            configs.update(reg.configs)
    owners: dict[int, tuple[Any, str, Any]] = {}
    for module in model.modules():
        if not isinstance(module, AdaptedLayer):
            continue
        for adapter_name, adapter in module.adapters.items():
            for pname, p in adapter.named_parameters():
                # a shared tensor (LoRA-drop's shared pairs) is reached from several layers: the first owner decides
                owners.setdefault(id(p), (adapter, pname, configs.get(adapter_name)))
    return owners


def _plain_owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module, pname))
    return owners


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_args(lr: Any, ratio: Any, weight_decay: Any, vector_rate: Any, embedding_lr: Any) -> None:
    if not _number(lr) or lr <= 0:
        raise ValueError(f"lr={lr!r} is invalid; give a finite learning rate > 0, e.g. lr=2e-4")
    if not _number(ratio) or ratio <= 0:
        raise ValueError(f"loraplus ratio={ratio!r} is invalid; give a finite number > 0 (LoRA+ default 16; "
                         "B matrices get lr·ratio)")
    if not _number(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} is invalid; give a finite number >= 0, e.g. 0.0 or 0.01")
    if vector_rate not in _VECTOR_RATES:
        raise ValueError(f"vector_rate={vector_rate!r} is invalid; use 'base' (1-D tensors keep lr, lorakit's "
                         "default) or 'high' (every 1-D tensor gets lr·ratio, as PEFT)")
    if embedding_lr is not None and (not _number(embedding_lr) or embedding_lr < 0):
        raise ValueError(f"embedding_lr={embedding_lr!r} is invalid; give None (use lr) or a finite number >= 0 "
                         "(PEFT's LoRA+ uses 1e-6)")


# ---------------------------------------------------------------------------------------------------------------
# LoRA+ groups
# ---------------------------------------------------------------------------------------------------------------
def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                          vector_rate: str = "base", embedding_lr: float | None = None) -> list[dict]:
    """Optimiser parameter groups for ``model``'s trainable parameters with LoRA+ learning rates.

    B matrices get ``lr * ratio``, A matrices ``lr``; 1-D adapter tensors, embedding adapters and other trainable
    tensors follow the table in this module's docstring (``vector_rate="high", embedding_lr=1e-6`` reproduces
    PEFT's ``create_loraplus_optimizer``). ``ratio=1`` gives plain groups (everyone at ``lr``), still honouring
    no-decay tensors and adapters' ``optimizer_options``. Raises ValueError for bad values or if nothing trains.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> [(g["name"], g["lr"]) for g in loraplus_param_groups(net, lr=1e-4, ratio=16)]
        [('A', 0.0001), ('B', 0.0016)]
    """
    _check_args(lr, ratio, weight_decay, vector_rate, embedding_lr)
    trainable = list(_trainable(model))
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=True); attach an adapter with "
                         "lorakit.attach or set_trainable before building the optimiser")
    adapters = _adapter_owners(model)
    plain = _plain_owners(model)
    high = lr * ratio
    emb_lr = lr if embedding_lr is None else float(embedding_lr)
    groups: dict[tuple, dict] = {}
    for _, p in trainable:
        owner = adapters.get(id(p))
        overrides: dict[str, Any] = {}
        if owner is not None:
            adapter, pname, config = owner
            role = adapter.param_role(pname)
            if role not in _ROLE_ORDER[:4]:
                raise ValueError(f"{type(adapter).__name__}.param_role({pname!r}) returned {role!r}; expected one "
                                 "of 'A', 'B', 'vector', 'embedding'")
            if vector_rate == "high" and p.dim() == 1:
                p_lr = high  # PEFT: any 1-D tensor joins B's group (checked after its embedding-layer rule)
            elif role == "embedding":
                p_lr = emb_lr
            elif role == "B":
                p_lr = high
            else:
                p_lr = lr
            no_decay = False  # adapter tensors decay unless the adapter says otherwise
            if config is not None:
                overrides = dict(adapter.optimizer_options(pname, config) or {})
        else:
            role = "other"
            module, leaf = plain.get(id(p), (None, ""))
            no_decay = leaf == "bias" or (module is not None and is_norm(module))
            p_lr = high if vector_rate == "high" and p.dim() == 1 else lr
        group = {"lr": p_lr, "weight_decay": 0.0 if no_decay else float(weight_decay)}
        group.update(overrides)  # the adapter's own settings win (e.g. SoRA gates: no decay, own lr)
        label = role + ("/no_decay" if no_decay and "weight_decay" not in overrides else "")
        if overrides:
            label += "/" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        key = (_ROLE_ORDER.index(role), label, group["lr"], group["weight_decay"],
               tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in groups:
            groups[key] = {"params": [], **group, "name": label}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1], k[2]))]


def parameter_lrs(model: nn.Module, optimizer_or_groups: Any) -> dict[str, float]:
    """``{parameter name: learning rate}`` of every parameter in an optimiser (or a list of groups).

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> parameter_lrs(net, loraplus_param_groups(net, lr=0.1, ratio=4))
        {'0.adapters.default.A': 0.1, '0.adapters.default.B': 0.4}
    """
    groups = getattr(optimizer_or_groups, "param_groups", optimizer_or_groups)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of}


# ---------------------------------------------------------------------------------------------------------------
# optimisers by name
# ---------------------------------------------------------------------------------------------------------------
def _on_cuda(groups: list[dict]) -> bool:
    return any(p.is_cuda for g in groups for p in g["params"])


def _bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401

        return bitsandbytes
    except Exception:  # ImportError, or a broken CUDA setup raising at import
        return None


def _embedding_weights(model: nn.Module) -> set[int]:
    found = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and not isinstance(module, AdaptedLayer):
            found.add(id(module.weight))
    return found


def _fp32_state_for_embeddings(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Trainable ``nn.Embedding`` weights keep fp32 optimiser state (bitsandbytes' advice for 8-bit optimisers)."""
    emb = _embedding_weights(model)
    out = []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in emb]
        full = [p for p in g["params"] if id(p) in emb]
        if keep:
            out.append({**g, "params": keep})
        if full:
            out.append({**g, "params": full, "optim_bits": 32, "name": g["name"] + "/fp32_state"})
    return out


def _paged_fallback_warning(name: str, plain: str, cuda: bool) -> None:
    if cuda:
        why = ("bitsandbytes is not installed (or failed to import), and the paging itself is bitsandbytes' CUDA "
               "feature; `pip install bitsandbytes` to get it")
    else:
        why = ("paging moves optimiser state between GPU and CPU memory through CUDA unified memory so that a "
               "memory spike does not run out of GPU memory; it only matters on CUDA, and these parameters are "
               "not on a CUDA device")
    warnings.warn(f"optimizer {name!r}: {why}. Using the plain {plain!r} optimiser instead (the same update, "
                  "without paging).", PagedOptimizerFallbackWarning, stacklevel=3)


def canonical_optimizer_name(name: str) -> str:
    """The optimiser's canonical name (case, dashes and aliases such as ``adamw_8bit`` resolved); it may still be
    unknown (check ``in OPTIMIZERS``).

    Example:
        >>> canonical_optimizer_name("AdamW-8bit")
        'adamw8bit'
    """
    key = str(name).lower().replace("-", "_")
    return _ALIASES.get(key, key)


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                   loraplus_ratio: float | None = None, **kw: Any) -> torch.optim.Optimizer:
    """An optimiser for ``model``'s trainable parameters, selected by name, with LoRA+ groups if ``loraplus_ratio``.

    Names: ``"adamw"``, ``"adamw8bit"``, ``"paged_adamw8bit"``, ``"paged_adamw"``, ``"sgd"`` (aliases such as
    ``"paged_adamw_8bit"``/``"paged_adamw_32bit"`` are accepted). ``loraplus_ratio=None`` means ratio 1 (plain
    AdamW learning rates). ``vector_rate`` and ``embedding_lr`` in ``kw`` go to :func:`loraplus_param_groups`; the
    rest to the optimiser (``betas``, ``eps``; ``block_size``/``min_8bit_size`` for the 8-bit AdamW; ``momentum``
    for SGD). The paged names use bitsandbytes on CUDA and otherwise warn once and use the plain optimiser.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> opt = make_optimizer("adamw8bit", net, lr=1e-3, loraplus_ratio=16)
        >>> type(opt).__name__, [g["lr"] for g in opt.param_groups]
        ('AdamW8bit', [0.001, 0.016])
    """
    key = str(name).lower().replace("-", "_") if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    vector_rate = kw.pop("vector_rate", "base")
    embedding_lr = kw.pop("embedding_lr", None)
    ratio = 1.0 if loraplus_ratio is None else loraplus_ratio
    groups = loraplus_param_groups(model, lr, ratio=ratio, weight_decay=weight_decay, vector_rate=vector_rate,
                                   embedding_lr=embedding_lr)
    common = dict(lr=lr, weight_decay=weight_decay, **kw)
    if key == "adamw":
        return torch.optim.AdamW(groups, **common)
    if key == "sgd":
        return torch.optim.SGD(groups, **common)
    if key == "adamw8bit":
        return AdamW8bit(_fp32_state_for_embeddings(model, groups), **common)
    # paged: bitsandbytes on CUDA, else the same update without paging
    cuda = _on_cuda(groups)
    bnb = _bitsandbytes() if cuda else None
    if bnb is not None:
        cls = bnb.optim.PagedAdamW8bit if key == "paged_adamw8bit" else bnb.optim.PagedAdamW
        optimizer = cls(groups, **common)
        if key == "paged_adamw8bit":
            manager = bnb.optim.GlobalOptimManager.get_instance()
            for module in model.modules():
                if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
        return optimizer
    if key == "paged_adamw8bit":
        _paged_fallback_warning(key, "adamw8bit", cuda)
        return AdamW8bit(_fp32_state_for_embeddings(model, groups), **common)
    _paged_fallback_warning(key, "adamw", cuda)
    return torch.optim.AdamW(groups, **common)
