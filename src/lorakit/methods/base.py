"""The strategy every family member implements.

An :class:`Adapter` is the per-layer state of one method (its parameters) plus the few verbs that differ between
methods. The defaults here are plain LoRA-shaped behaviour, so a method overrides only what differs:

* ``init_weights``  – initialise parameters from the base weight; may return a new base weight (PiSSA's residual)
* ``apply``         – the forward contribution: ``y -> y + delta(x)``
* ``delta_weight``  – the dense ``[out, in]`` change the adapter makes (fp32), used by merge/combine
* ``merge_into`` / ``unmerge_from`` – default ``W ± delta_weight``; DoRA overrides
* ``base_shift``    – what the adapter added to the frozen base weight (PiSSA residual, Delta-LoRA updates)
* training hooks    – ``regularization`` (extra loss), ``after_step`` (after optimizer.step), ``finish``
* ``param_role``    – how LoRA+ groups each parameter ("A", "B", "vector", "embedding")
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..registry import AdapterEntry
from .peft_lora import LORA_KEYS, lora_to_peft
from .watch import watch_adapter

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer, LayerOps


def layer_generator(config: "AdapterConfig", path: str) -> torch.Generator:
    """A CPU generator for one layer's init: seeded from config.seed and the layer path, or from the global RNG."""
    gen = torch.Generator(device="cpu")
    if config.seed is None:
        gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    else:
        gen.manual_seed((config.seed * 1_000_003 + zlib.crc32(path.encode())) % 2**62)
    return gen


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator, a: float = 5**0.5) -> torch.Tensor:
    """``nn.init.kaiming_uniform_`` (leaky-relu gain with slope ``a``) drawn from ``generator``, in fp32 on CPU."""
    gain = (2.0 / (1 + a * a)) ** 0.5
    bound = gain * (3.0 / fan_in) ** 0.5
    return torch.rand(shape, generator=generator) * (2 * bound) - bound


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a DTensor; a collective every rank runs in the same order), or ``t``
    itself. Training hooks that need a global view (AdaLoRA's budget, SoRA's pruning, Delta-LoRA's product) read
    their tensors through it, so one process computes exactly what it did before sharding existed.

    Example:
        >>> whole(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def placed_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (a whole tensor, the same on every rank) laid out like ``ref``: this rank's shard of it when ``ref`` is
    an FSDP2 DTensor (no communication: each rank cuts its own piece), else ``t`` itself.

    Example:
        >>> placed_like(torch.zeros(2), torch.ones(2)).tolist()
        [0.0, 0.0]
    """
    if not hasattr(ref, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, ref.device_mesh, ref.placements, src_data_rank=None)


#: one layer of an adapter, as the training hooks pass it to the per-adapter classmethods (``entries``)
HookEntry = AdapterEntry


class Adapter(nn.Module):
    """Base class of a method's per-layer adapter. See the module docstring for the verbs."""

    method: ClassVar[str] = ""
    #: rank used when AdapterConfig.r is None
    default_r: ClassVar[int] = 8
    #: True if the method needs its training hooks called (warns once when steps happen without them)
    needs_hooks: ClassVar[bool] = False
    #: True once the adapter has consolidated its training work (AdaLoRA, once pruned): the warn-once watcher stops
    #: watching it. A per-instance state with a class default, like ``shifts_base``
    hooks_done: bool = False
    #: True if the method may add to the frozen base weight (PiSSA, Delta-LoRA)
    shifts_base: bool = False
    #: which config init values the method accepts
    allowed_inits: ClassVar[tuple[str, ...]] = ("kaiming",)
    #: False if the method's layer function cannot be folded into the base weight
    mergeable: ClassVar[bool] = True
    #: False if the method's training hooks cannot run on FSDP2 shards: FSDP is then refused up front with a clear
    #: error (DDP works). Hooks needing a global view read whole tensors with :func:`whole` and write back with
    #: :func:`placed_like` (AdaLoRA, SoRA and Delta-LoRA do)
    shardable: ClassVar[bool] = True
    #: parameters that exist but never train (LoRA-FA's A)
    frozen_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ops: "LayerOps", config: "AdapterConfig", path: str, shared: nn.Module | None = None):
        super().__init__()
        self.path = path
        self.r = config.rank_for(path)
        self.scaling = config.scaling_value(path)
        self.in_features = ops.in_features
        self.out_features = ops.out_features
        self.layer_kind = ops.kind
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 and ops.supports_dropout() else nn.Identity()
        if type(self).needs_hooks:  # lets lorakit warn once if optimiser steps run without the training hooks
            watch_adapter(self)

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "AdapterConfig") -> None:
        """Method-specific checks; raise ValueError naming the field, the value and what is allowed."""
        if config.init not in cls.allowed_inits:
            raise ValueError(
                f"AdapterConfig.init={config.init!r} is not available for method={config.method!r}; "
                f"allowed: {', '.join(cls.allowed_inits)}"
            )

    @classmethod
    def check_layer(cls, ops: "LayerOps", config: "AdapterConfig", path: str) -> None:
        """Raise UnsupportedLayer/ValueError if this method cannot adapt this layer (called before any change)."""

    @classmethod
    def check_loaded_layer(cls, ops: "LayerOps", config: "AdapterConfig", path: str) -> None:
        """Raise AdapterLoadError if saved tensors of this config cannot be used on this base layer (called by
        :func:`lorakit.load`, before any change). Default: any base fits."""

    @classmethod
    def base_requirements(cls, config: "AdapterConfig") -> dict[str, Any] | None:
        """What the base layers must be for this adapter's tensors to mean what they meant when trained (recorded
        as ``extra["base"]`` in saved adapters), or None when any base of the right shape fits."""
        return None

    @classmethod
    def make_shared(cls, config: "AdapterConfig", targets: list[tuple[str, "LayerOps"]], name: str,
                    existing: nn.Module | None = None) -> nn.Module | None:
        """State shared by all layers of one adapter (VeRA's random pair, LoRA-drop's shared pair)."""
        return None

    # -- verbs ------------------------------------------------------------------------------------------------
    def init_weights(self, layer: "AdaptedLayer", config: "AdapterConfig", generator: torch.Generator) -> Any:
        """Initialise parameters. Return None, or a new fp32 ``[out, in]`` base weight, or a new base module."""
        return None

    def apply(self, layer: "AdaptedLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return ``y`` plus this adapter's contribution for input ``x``."""
        raise NotImplementedError

    def fused_forward(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor | None:
        """Base layer plus this adapter in one step when it is the layer's only live adapter, or None (the default)
        when no fused path applies right now; the layer then runs ``base(x)`` and :meth:`apply`."""
        return None

    def delta_weight(self, layer: "AdaptedLayer") -> torch.Tensor:
        """The dense ``[out, in]`` change (fp32) that :meth:`apply` adds."""
        raise NotImplementedError

    def merge_into(self, layer: "AdaptedLayer", w32: torch.Tensor) -> torch.Tensor:
        return w32 + self.delta_weight(layer)

    def unmerge_from(self, layer: "AdaptedLayer", w32: torch.Tensor) -> torch.Tensor:
        return w32 - self.delta_weight(layer)

    def base_shift(self) -> torch.Tensor | None:
        """fp32 ``[out, in]`` tensor this adapter added to the base weight, or None."""
        return None

    def shift_output(self, layer: "AdaptedLayer", x: torch.Tensor) -> torch.Tensor:
        """``x`` through :meth:`base_shift` (used to give other adapters and ``None`` routes the true base)."""
        shift = self.base_shift()
        return layer.ops.linear(x, shift.to(x.dtype))

    def on_base_changed(self) -> None:
        """The base weight changed (merge, Delta-LoRA update): drop caches derived from it."""

    def on_unmerged(self) -> None:
        """The layer restored its exact pre-merge weight itself (``unmerge_from`` was not called): drop any cache
        kept for undoing the merge."""

    # -- training hooks -----------------------------------------------------------------------------------------
    # Driven by ``lorakit.training_hooks(model)`` (plain loops), the transformers callback and lorakit's Trainer.
    # Per-layer verbs have per-adapter classmethod wrappers, so a method needing a global view (AdaLoRA's budget,
    # LoRA-drop) overrides the wrapper instead. ``entries``: a list of :class:`HookEntry` (path, layer, adapter) of one
    # adapter.
    def regularization(self) -> torch.Tensor | None:
        """Extra loss term of this layer's adapter (added by ``lorakit.regularization_loss``), or None."""
        return None

    def after_step(self, layer: "AdaptedLayer", step: int) -> None:
        """Work after ``optimizer.step()`` (gradients still present); ``step`` counts from 1."""

    def finish(self, layer: "AdaptedLayer") -> None:
        """Consolidate at the end of training (prune ranks, fold gates, ...)."""

    @classmethod
    def adapter_regularization(cls, entries: list, config: "AdapterConfig") -> torch.Tensor | None:
        terms = [t for _, _, a in entries if (t := a.regularization()) is not None]
        return sum(terms) if terms else None

    @classmethod
    def adapter_after_step(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig",
                           step: int) -> None:
        for _, layer, adapter in entries:
            adapter.after_step(layer, step)

    @classmethod
    def adapter_finish(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig") -> None:
        for _, layer, adapter in entries:
            adapter.finish(layer)

    @classmethod
    def adapter_state_dict(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig") -> dict:
        """Training state the hooks checkpoint for exact resume (nested dicts/lists of tensors and numbers)."""
        return {}

    @classmethod
    def adapter_load_state_dict(cls, model: nn.Module, name: str, entries: list, config: "AdapterConfig",
                                state: dict) -> None:
        """Inverse of :meth:`adapter_state_dict`."""

    def optimizer_options(self, param_name: str, config: "AdapterConfig") -> dict | None:
        """Per-parameter optimiser overrides (e.g. ``{"weight_decay": 0.0, "lr": ...}`` for SoRA's gates), or None.

        ``lorakit.optim`` puts parameters with equal overrides into their own parameter group.
        """
        return None

    # -- mixing -----------------------------------------------------------------------------------------------
    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` with ``s·B A`` equal to this adapter's delta, for exact low-rank mixing."""
        raise ValueError(f"method {self.method!r} has no exact low-rank form; use combine(how='svd')")

    @classmethod
    def combine(cls, layer: "AdaptedLayer", sources: list[tuple["Adapter", float]], how: str,
                rank: int | None = None) -> "Adapter | None":
        """This method's own rule for a new adapter on ``layer`` mixing ``sources`` (adapter, weight), see
        :func:`lorakit.combine`; or None (the default) to have them mixed by the generic low-rank rule, which LoRA's
        strategy holds (:func:`lorakit.methods.combine_adapters` picks the rule). A method whose layer function is
        not linear in its factors (DoRA) overrides this."""
        return None

    # -- PEFT's format: plain dicts in and out; lorakit.io.peft adds PEFT's key prefixes and wraps errors --------
    #: PEFT ``peft_type`` the method is written as; None: it cannot be written in PEFT's format (``peft_refusal``
    #: says why, after "adapter '<name>' is ")
    peft_type: ClassVar[str | None] = "LORA"
    peft_refusal: ClassVar[str] = ""
    #: PEFT key suffix -> tensor name, for the layer tensors ``from_peft`` reads
    peft_keys: ClassVar[dict[str, str]] = LORA_KEYS
    #: PEFT keys of tensors shared by all layers (no layer path; VeRA's projections)
    peft_shared_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def to_peft(cls, name: str, config: "AdapterConfig", entries: list, shared: nn.Module | None
                ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Adapter ``name`` in PEFT's terms: its config entries, ``{layer path: {PEFT suffix: tensor}}`` and its
        shared tensors. ``entries`` = [(layer_path, AdaptedLayer, Adapter), ...]. Default: plain LoRA from
        :meth:`as_lora_factors`, with a rank and an alpha per layer (PEFT stores LoRA-FA, SoRA, LoRA-drop so)."""
        shifted = [p for p, _, a in entries if a.base_shift() is not None]
        if shifted:
            raise ValueError(f"adapter {name!r} ({cls.method}) changed the base weights of {len(shifted)} layer(s); "
                             f"PEFT's format cannot express that. Merge it and export the full model instead "
                             f"(lorakit export / lorakit.unload(merge=True))")
        cfg, layers = lora_to_peft(name, cls.method, config, entries, native=False)
        return cfg, layers, {}

    @classmethod
    def as_plain_lora(cls, config: "AdapterConfig", entries: list
                      ) -> tuple["AdapterConfig", dict[str, dict[str, torch.Tensor]]] | None:
        """For ``save(convert_pissa=True)``: this adapter as a plain LoRA on the original base weights (its config
        and ``{layer path: {"A": .., "B": ..}}``), or None when it is saved as it is. Default: None."""
        return None

    @classmethod
    def reads_peft(cls, peft_type: str, cfg: dict[str, Any]) -> bool:
        """True if this strategy reads PEFT adapters of ``peft_type`` with config ``cfg`` (one registered strategy
        does for every type lorakit reads)."""
        return False

    @classmethod
    def peft_init(cls, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The AdapterConfig fields a PEFT config's init settings set (LoRA's ``init_lora_weights`` and
        ``loftq_config``), read before any tensor; a ValueError naming the init when lorakit cannot load it.
        Default: none (the config's init is PEFT's default)."""
        return {}

    @classmethod
    def check_peft_layer(cls, ops: "LayerOps", init: dict[str, Any], path: str) -> None:
        """Raise ValueError (naming the layer and the fix) if a PEFT adapter whose init set ``init`` (from
        :meth:`peft_init`) cannot be used on this base layer (LoftQ needs its NF4 base). Default: any base fits."""

    @classmethod
    def from_peft(cls, cfg: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]],
                  shared: dict[str, torch.Tensor], ops: dict[str, "LayerOps"], folder: Path
                  ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """A PEFT adapter (``layers`` named by :attr:`peft_keys`, ``shared`` by :attr:`peft_shared_keys`) as
        AdapterConfig keyword arguments, ``{layer path: {tensor name: tensor}}`` and shared tensors; ValueError
        naming ``folder`` and the key when it cannot be read."""
        raise ValueError(f"{folder}: method {cls.method!r} does not read PEFT adapters")

    # -- hot-swap (lorakit.prepare_hotswap / lorakit.hotswap) ---------------------------------------------------
    #: the rank this adapter's tensors are padded to by :meth:`prepare_hotswap`; 0 until then. A per-instance state
    #: with a class default, like ``shifts_base``
    hotswap_rank: int = 0

    @classmethod
    def hotswap_refusal(cls, config: "AdapterConfig") -> str | None:
        """Why an adapter of this method with ``config`` cannot be hot-swapped (a phrase completing "cannot be
        hot-swapped: "), or None when it can. Default: refused; LoRA's strategy accepts its plain forms."""
        return (f"method {cls.method!r} has no hot-swap form (lorakit hot-swaps plain LoRA: every init whose saved "
                f"form is plain LoRA, rsLoRA; and LoRA-FA); delete the adapter and lorakit.load the other one instead")

    def prepare_hotswap(self, max_rank: int) -> None:
        """Make room for any adapter of this method up to ``max_rank`` without changing what this one computes:
        pad its factors with zeros and read the scaling from a tensor, so :meth:`hotswap_from` only copies values
        (a compiled forward keeps its shapes and constants). Called only when :meth:`hotswap_refusal` is None."""
        raise NotImplementedError(f"method {self.method!r} does not implement prepare_hotswap")

    def hotswap_check(self, new: "Adapter") -> None:
        """Raise ValueError naming the layer if ``new`` (the same layer's adapter, built by the loader from a folder)
        cannot replace this prepared adapter's values in place (a rank above the prepared one)."""
        raise NotImplementedError(f"method {self.method!r} does not implement hotswap_check")

    def hotswap_from(self, new: "Adapter") -> None:
        """Copy ``new``'s values into this prepared adapter's tensors in place (checked by :meth:`hotswap_check`), so
        it computes exactly what ``new`` computes."""
        raise NotImplementedError(f"method {self.method!r} does not implement hotswap_from")

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def is_trainable(self, param_name: str) -> bool:
        return param_name.split(".")[-1] not in self.frozen_params

    def param_role(self, param_name: str) -> str:
        """LoRA+ role of a parameter: "A" (base lr), "B" (lr·ratio), "vector" (1-D), "embedding"."""
        if self.layer_kind == "embedding":
            return "embedding"
        if param_name.endswith("B"):
            return "B"
        p = dict(self.named_parameters())[param_name]
        return "vector" if p.dim() == 1 else "A"

    def export_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save: every parameter and persistent buffer, except shared state (saved once per adapter)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("shared.")}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state` (shapes already checked by the loader)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("shared.")]
        if missing or unexpected:
            raise ValueError(f"{self.path}: missing {missing}, unexpected {unexpected}")

    def extra_repr(self) -> str:
        return f"method={self.method}, r={self.r}, scaling={self.scaling:g}"
