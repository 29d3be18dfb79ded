"""PEFT's LoRA format as plain dicts: the translation every strategy inherits from :class:`~.base.Adapter`, and the
number and pattern rules PEFT's LoRA-shaped types (LORA, ADALORA, VERA) share.

Nothing here reads or writes a file: :mod:`lorakit.io.peft` splits PEFT's keys into ``{layer path: {tensor name:
tensor}}`` before a strategy's ``from_peft`` and joins a strategy's ``to_peft`` output into PEFT's keys
(``base_model.model.<path>.<suffix>``) after it, and turns the ValueErrors raised here into ``PeftFormatError``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AdapterConfig
    from ..layers import AdaptedLayer, LayerOps
    from .base import Adapter

#: the file PEFT keeps its config in (named in error messages)
PEFT_CONFIG = "adapter_config.json"
#: PEFT's prefix of every key under the wrapped model (some configs repeat it in their patterns)
PEFT_MODEL_PREFIX = "base_model.model."
#: PEFT LoRA key suffix -> lorakit tensor name
LORA_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}


def peft_number(cfg: dict[str, Any], key: str, default: Any, folder: Path, kind: type = int,
                minimum: float = 1) -> Any:
    """``cfg[key]`` (``default`` when absent) as ``kind``, or a ValueError naming the key and the value.

    Example:
        >>> peft_number({"r": 4}, "r", 8, Path("adapter"))
        4
    """
    value = cfg.get(key, default)
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and value >= minimum and (kind is float or float(value).is_integer()))
    if not ok:
        want = "an integer" if kind is int else "a number"
        raise ValueError(f"{folder}/{PEFT_CONFIG}: {key}={value!r} is invalid; PEFT writes {want} >= {minimum} "
                         f"there (fix or re-save the adapter with PEFT)")
    return kind(value)


def peft_pattern_key(patterns: dict[str, Any] | None, path: str) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching the end of the path on a dot boundary.
    (PEFT's own key rule, kept apart from lorakit's target matcher on purpose: it must match PEFT exactly.)

    Example:
        >>> peft_pattern_key({"q_proj": 8}, "model.layers.0.q_proj")
        'q_proj'
    """
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def ranked_config(cfg: dict[str, Any], ranks: dict[str, int], default_r: int, default_alpha: float,
                  rslora: bool) -> dict[str, Any]:
    """lorakit rank/alpha patterns (exact paths) reproducing PEFT's per-layer ranks and alphas.

    Example:
        >>> ranked_config({}, {"a": 4, "b": 2}, 4, 8.0, False)["rank_pattern"]
        {'b': 2}
    """
    alpha_patterns = cfg.get("alpha_pattern") or {}
    if not isinstance(alpha_patterns, dict) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            and v > 0 for k, v in alpha_patterns.items()):
        raise ValueError(f"{PEFT_CONFIG}: alpha_pattern={alpha_patterns!r} must map module-name regexes to "
                         f"positive numbers")
    rank_pattern, alpha_pattern = {}, {}
    for path, r in ranks.items():
        if r != default_r:
            rank_pattern[path] = r
        try:
            key = peft_pattern_key(alpha_patterns, path)
        except re.error as err:
            raise ValueError(f"{PEFT_CONFIG}: alpha_pattern has an invalid regex ({err})") from None
        alpha = float(alpha_patterns[key]) if key is not None else float(default_alpha)
        alpha_pattern[path] = alpha
    return {"r": default_r, "alpha": float(default_alpha), "scaling": "rslora" if rslora else "standard",
            "rank_pattern": rank_pattern or None, "alpha_pattern": alpha_pattern or None}


def lora_to_peft(name: str, method: str, config: "AdapterConfig", entries: list[tuple[str, "AdaptedLayer", "Adapter"]],
                 native: bool) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """PEFT LoRA config entries and ``{path: {PEFT suffix: tensor}}`` for adapter ``name``.

    ``native``: the adapters are LoRA-shaped (``A``, ``B``, ``scaling``) under their own config (its rank, its
    scaling rule, rsLoRA included); otherwise each layer is written from :meth:`~.base.Adapter.as_lora_factors`
    with a per-layer rank and a standard alpha.

    Example:
        >>> import torch, lorakit
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
        >>> layer = net[0]
        >>> cfg, layers = lora_to_peft("default", "lora", lorakit.AdapterConfig(r=2),
        ...                            [("0", layer, layer.adapters["default"])], native=True)
        >>> cfg["r"], sorted(layers["0"])
        (2, ['lora_A.weight', 'lora_B.weight'])
    """
    ranks, alphas = {}, {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for path, layer, adapter in entries:
        if native:
            r = adapter.r  # (a hot-swap-ready adapter is padded with zeros past its rank)
            a, b, s = adapter.A.detach()[:r].float(), adapter.B.detach()[:, :r].float(), adapter.scaling
        else:
            try:
                a, b, s = (t.detach().float() if torch.is_tensor(t) else t for t in adapter.as_lora_factors())
            except ValueError as exc:
                raise ValueError(f"adapter {name!r} ({method}) cannot be written as PEFT LoRA: {exc}") from None
        r = a.shape[0]
        ranks[path] = r
        # PEFT computes s from (alpha, r) per layer: choose alpha so that its s equals ours exactly
        alphas[path] = s * (math.sqrt(r) if (native and config.scaling == "rslora") else r)
        kind = layer.ops.kind
        if kind == "embedding":
            layers[path] = {"lora_embedding_A": a, "lora_embedding_B": b}
        else:
            if kind == "conv2d":
                w = layer.base.weight
                a = a.reshape(r, *w.shape[1:])
                b = b.reshape(b.shape[0], r, 1, 1)
            layers[path] = {"lora_A.weight": a, "lora_B.weight": b}
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    default_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    cfg: dict[str, Any] = {}
    if config.init == "loftq":
        # PEFT's record of a LoftQ adapter; init_lora_weights stays true so PEFT does not re-run LoftQ on load
        cfg["loftq_config"] = {"loftq_bits": 4, "loftq_iter": int(config.loftq_iter)}
    cfg.update(r=default_r, lora_alpha=default_alpha, use_rslora=bool(native and config.scaling == "rslora"),
               use_dora=False, lora_dropout=float(config.dropout), init_lora_weights=True,
               rank_pattern={re.escape(p): r for p, r in ranks.items() if r != default_r},
               alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != default_alpha})
    return cfg, layers


def lora_from_peft(cfg: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]], ops: dict[str, "LayerOps"],
                   folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """A PEFT LoRA adapter (``layers`` = ``{path: {"A": .., "B": .., ["magnitude": ..]}}``) as AdapterConfig
    keyword arguments and lorakit's ``{path: {tensor name: tensor}}``.

    Example:
        >>> import torch
        >>> from lorakit.layers import ops_for
        >>> kw, out = lora_from_peft({"r": 2, "lora_alpha": 4}, {"l": {"A": torch.zeros(2, 3), "B": torch.zeros(5, 2)}},
        ...                          {"l": ops_for(torch.nn.Linear(3, 5))}, Path("adapter"))
        >>> kw["r"], kw["alpha"], sorted(out["l"])
        (2, 4.0, ['A', 'B'])
    """
    ranks, out = {}, {}
    for path, named in layers.items():
        if "A" not in named or "B" not in named:
            raise ValueError(f"{folder}: layer {path} lacks lora_A or lora_B")
        a, b = named["A"], named["B"]
        layer_ops = ops[path]
        r = a.shape[0] if a.dim() else 0
        if a.dim() < 2 or b.dim() < 2 or b.numel() % max(r, 1) or not r:
            a2 = b2 = a  # cannot be LoRA factors: reported below
        elif layer_ops.kind == "embedding":
            # PEFT: A [r, num_embeddings], B [dim, r]; lorakit's embedding matrix is [dim, num_embeddings]
            a2, b2 = a, b
        else:
            a2, b2 = a.reshape(r, -1), b.reshape(b.shape[0], -1)
        if tuple(a2.shape) != (r, layer_ops.in_features) or tuple(b2.shape) != (layer_ops.out_features, r):
            raise ValueError(f"{folder}: layer {path} is {layer_ops.out_features}x{layer_ops.in_features} but the "
                             f"adapter has A {tuple(a.shape)}, B {tuple(b.shape)}")
        ranks[path] = r
        out[path] = {"A": a2, "B": b2}
        if "magnitude" in named:
            out[path]["magnitude"] = named["magnitude"].reshape(-1)
    kwargs = ranked_config(cfg, ranks, peft_number(cfg, "r", 8, folder),
                           peft_number(cfg, "lora_alpha", 8, folder, float, 0), bool(cfg.get("use_rslora")))
    return kwargs, out


#: PEFT LoRA ``init_lora_weights`` values lorakit cannot load, with the reason
PEFT_UNSUPPORTED_INITS = {
    "pissa": "PiSSA changes the base weights it was trained on",
    "olora": "OLoRA changes the base weights it was trained on",
    "corda": "CorDA changes the base weights it was trained on",
    "lora_ga": "LoRA-GA changes the base weights it was trained on",
    "eva": "EVA (data-driven initialisation) is not supported by lorakit's PEFT reader",
    "mica": "MiCA is a LoRA variant with its own forward",
}
#: PEFT LoRA ``init_lora_weights`` values (prefixes) whose adapter needs the base its init modified
PEFT_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga", "eva")


def peft_init_changes_base(cfg: dict[str, Any]) -> bool:
    """True if a PEFT LoRA config's init modified the base it was trained on (PiSSA, OLoRA, LoftQ, ...), so the
    adapter is wrong on the original base.

    Example:
        >>> peft_init_changes_base({"init_lora_weights": "pissa_niter_4"}), peft_init_changes_base({})
        (True, False)
    """
    init = cfg.get("init_lora_weights")
    named = isinstance(init, str) and any(init.lower().startswith(m) for m in PEFT_BASE_CHANGING_INITS)
    return named or bool(cfg.get("loftq_config"))


def lora_peft_init(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The AdapterConfig fields a PEFT LoRA folder's init settings set (``init_lora_weights``, ``loftq_config``):
    ``{}`` for PEFT's default inits, LoftQ's ``init`` and ``loftq_iter`` for a LoftQ folder; a ValueError naming
    the init and the fix for an init lorakit cannot load (:data:`PEFT_UNSUPPORTED_INITS`).

    Example:
        >>> lora_peft_init({"init_lora_weights": True}, Path("x"))
        {}
        >>> lora_peft_init({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 2}}, Path("x"))
        {'init': 'loftq', 'loftq_iter': 2}
    """
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str):
        key = "pissa" if init.startswith("pissa") else init  # PEFT writes "pissa_niter_<n>" for fast PiSSA
        if key in PEFT_UNSUPPORTED_INITS:
            hint = (" Convert it to plain LoRA first (PEFT: save_pretrained(..., "
                    "path_initial_model_for_weight_conversion=...))" if "base weights" in
                    PEFT_UNSUPPORTED_INITS[key] else "")
            raise ValueError(f"{folder}: init_lora_weights={init!r}: {PEFT_UNSUPPORTED_INITS[key]}; lorakit "
                             f"does not support loading it.{hint}")
    loftq = peft_loftq_settings(cfg, folder)
    return {} if loftq is None else {"init": "loftq", "loftq_iter": loftq["loftq_iter"]}


def peft_loftq_settings(cfg: dict[str, Any], folder: Path) -> dict[str, int] | None:
    """The LoftQ settings of a PEFT LoRA folder, or None: ``init_lora_weights: "loftq"`` (PEFT's own save) or a
    non-empty ``loftq_config`` (lorakit's export, which keeps ``init_lora_weights: true`` so PEFT loads it onto its
    4-bit base without re-running LoftQ). LoftQ is LoRA's init, so its PEFT form is LoRA's to read; a bad
    value is a ValueError (the PEFT reader reports it as PeftFormatError).

    Example:
        >>> peft_loftq_settings({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 2}}, Path("x"))
        {'loftq_bits': 4, 'loftq_iter': 2}
    """
    lcfg = cfg.get("loftq_config") or {}
    if cfg.get("init_lora_weights") != "loftq" and not lcfg:
        return None
    if not isinstance(lcfg, dict):
        raise ValueError(f"{folder}/adapter_config.json: loftq_config={lcfg!r} must be a JSON object")
    bits = lcfg.get("loftq_bits", 4)
    if bits != 4 or isinstance(bits, bool):
        raise ValueError(f"{folder}: the adapter is LoftQ with loftq_bits={bits!r}; lorakit's quantised bases "
                              f"are 4-bit NF4 only, so it does not support this adapter")
    return {"loftq_bits": 4, "loftq_iter": peft_number(lcfg, "loftq_iter", 1, folder)}
