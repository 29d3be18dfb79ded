"""Compare family members side by side on one model, one dataset and one budget, and write a report.

Each contender (a method with its recommended settings, plus full fine-tuning and a frozen-model head-only baseline)
trains in its own subprocess so that its peak memory is its own. Two tasks: ``classification`` (the default:
held-out accuracy) and ``causal-lm`` (chat, instruction or plain-text rows: held-out loss on the assistant/response
tokens, perplexity and a few greedy answers). Every contender can run with several seeds (mean ± sd, and a paired
comparison with LoRA over the seeds), as inline variants (``"lora:r=4"``, ``"lora:init=pissa:alpha=8"``) or as a
sweep of one field (``sweep="r=1,2,4,8"``). Each run measures what isolates the method: the model's frozen weight
bytes, trainable and optimiser-state bytes, bytes of activations saved for backward per token, tokens per second,
beside the process's peak resident set. The report folder gets ``results.json`` (schema: docs/compare-results.md),
``report.md``, PNG plots, a self-contained ``report.html``, and ``runs/`` (one file per finished contender and seed,
which ``resume=True`` reuses).

The contenders table, :data:`CONTENDERS`, is the one place that lists them. A contender names its settings and,
when it needs more than "attach, then train", its own steps: ``prepare`` (e.g. quantise the base for QLoRA) and
``procedure`` (e.g. LoRA-drop's two stages). :func:`register_contender` adds one from outside the package.

Example (the README's first command runs this on the embedded default, all-MiniLM-L6-v2 on movie reviews):
    >>> from lorakit.compare import CONTENDERS, parse_variant
    >>> "lora" in CONTENDERS and "full" in CONTENDERS
    True
    >>> parse_variant("lora:r=4:init=pissa").overrides
    {'r': 4, 'init': 'pissa'}
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .assets import movie_reviews
from .config import AdapterConfig
from .io import atomic_write_text, save
from .methods import get_method
from .model import attach
from .train.data import (LM_FORMATS, Collator, DataError, detect_format, encode, label_names, load_source,
                         render_instruction)
from .train.job import detect_task, load_base, resolve_model_path
from .train.trainer import TrainConfig, TrainResult, Trainer

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


# ---------------------------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ContenderRun:
    """What a contender's steps work on: the loaded classifier, its head's name and everything training needs."""

    model: "nn.Module"
    head: str | None  # the classifier head's module name; None for a causal LM (its output layer is pretrained)
    train_config: TrainConfig
    train_rows: list[dict]
    eval_rows: list[dict]
    collate: Callable[[list[dict]], dict]
    trainable_params: int | None = None
    task: str = "classification"  # the Trainer's metric: "classification" (accuracy) or "lm" (perplexity)
    prompts: list = field(default_factory=list)  # causal LM: the held-out rows the answers are generated for

    def count_trainable(self) -> int:
        """Record the parameters that train *now*. Procedures call it when training starts, because some methods
        shrink while training (AdaLoRA prunes its ranks at the end) and the report shows what trained."""
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return self.trainable_params

    def trainer(self) -> Trainer:
        """lorakit's Trainer on this run's data, evaluating accuracy (or loss and perplexity) on the held-out rows."""
        return Trainer(self.model, self.train_config, self.train_rows, self.eval_rows, collate_fn=self.collate,
                       task=self.task)


#: ``procedure(run, adapter_config) -> TrainResult``: trains the contender (``adapter_config`` is None for the
#: baselines) and calls ``run.count_trainable()`` when training starts
Procedure = Callable[[ContenderRun, "AdapterConfig | None"], TrainResult]


def attach_and_train(run: ContenderRun, config: AdapterConfig | None) -> TrainResult:
    """The default procedure: attach the adapter (if the contender has one), then train with lorakit's Trainer."""
    if config is not None:
        attach(run.model, config)
    run.count_trainable()
    return run.trainer().train()


@dataclass(frozen=True)
class Prepare:
    """A step run on the freshly loaded model before the procedure (quantise the base, choose what trains)."""

    run: Callable[[ContenderRun], None]
    label: str = ""  # shown by ``lorakit compare --list``; empty: nothing worth saying
    quantizes_base: bool = False  # recorded in results.json's settings


@dataclass(frozen=True)
class Contender:
    """One entry of the bake-off.

    ``adapter``: AdapterConfig fields, or a function of the step budget returning them (None: a baseline without
    adapter); ``train``: TrainConfig overrides (the learning rate at least); ``kind``: ``"adapter"``, ``"full"`` or
    ``"head"`` (the report compares only adapters with LoRA; baselines save every trainable tensor);
    ``prepare`` / ``procedure``: the contender's own steps (default: none, then :func:`attach_and_train`);
    ``needs``: modules those steps import (a contender whose module is missing is skipped, not failed; the worker
    processes import them up front); ``cost``: run time relative to LoRA's (measured on MiniLM), only used to start
    the long ones first; ``trails_because``: why it may trail LoRA under a short budget (shown when it does).

    Example:
        >>> Contender(adapter={"method": "lora", "r": 4}, train={"lr": 1e-3}).adapter_fields(steps=10)
        {'method': 'lora', 'r': 4}
    """

    adapter: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    kind: str = "adapter"
    prepare: Prepare | None = None
    procedure: Procedure = attach_and_train
    needs: tuple[str, ...] = ()
    cost: float = 1.0
    about: str = ""
    trails_because: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("adapter", "full", "head"):
            raise ValueError(f"Contender.kind={self.kind!r} is invalid; allowed: adapter, full, head")
        if (self.kind == "adapter") != (self.adapter is not None):
            raise ValueError("a Contender of kind 'adapter' needs adapter settings, and only that kind has them")

    @property
    def quantizes_base(self) -> bool:
        """True if the contender trains over a 4-bit base (its prepare step quantises the model)."""
        return self.prepare is not None and self.prepare.quantizes_base

    def adapter_fields(self, steps: int) -> dict[str, Any] | None:
        """The AdapterConfig fields for a run of ``steps`` optimiser steps (None for a baseline)."""
        return self.adapter(steps) if callable(self.adapter) else (dict(self.adapter) if self.adapter else None)


def _train_head_only(run: ContenderRun) -> None:
    if run.head is None:
        raise ValueError("the head-only baseline needs a classification head; it does not apply to causal LMs")
    for n, p in run.model.named_parameters():
        p.requires_grad_(n.startswith(run.head + "."))


def _train_every_weight(run: ContenderRun) -> None:
    for p in run.model.parameters():
        p.requires_grad_(True)


def _quantise_base(run: ContenderRun) -> None:
    import torch

    from .quant import quantize  # optional piece: availability() reports a build without it

    # a new classifier head stays full precision; a causal LM keeps its output layer (quantize's default)
    quantize(run.model, compute_dtype=torch.float32, skip=(run.head,) if run.head else None)


def _lora_drop_two_stages(run: ContenderRun, config: AdapterConfig | None) -> TrainResult:
    """LoRA-drop attaches in its own two stages: stage 1 runs drop_fraction of the step budget on a drop_fraction
    sample, stage 2 the full budget; the held-out evaluation follows, as the default procedure's does."""
    from .train.recipes.lora_drop import run_lora_drop

    drop = run_lora_drop(run.model, config, run.train_rows, trainer_config=run.train_config, collate_fn=run.collate)
    result = drop.stage2
    result.evals.append(run.trainer().evaluate())
    run.count_trainable()  # stage 2's adapter: the selected layers' pairs and the shared ones
    return result


HEAD_ONLY = Prepare(_train_head_only)
EVERY_WEIGHT = Prepare(_train_every_weight)
QUANTISED_BASE = Prepare(_quantise_base, label="4-bit NF4 base", quantizes_base=True)

#: the name LoRA's row has: the report measures every family member against it
REFERENCE = "lora"

#: contender name -> Contender. The one place (with the methods registry) that lists the methods.
CONTENDERS: dict[str, Contender] = {
    "head-only": Contender(kind="head", prepare=HEAD_ONLY, train={"lr": 5e-3}, cost=0.6,
                           about="frozen pretrained model, only the new classifier head trains",
                           trails_because="baseline: the encoder is frozen, only the classifier head learns."),
    "full": Contender(kind="full", prepare=EVERY_WEIGHT, train={"lr": 5e-5}, cost=1.5,
                      about="every weight trains (the upper reference)"),
    "lora": Contender(adapter={"method": "lora", "r": 8, "alpha": 16}, train={"lr": 2e-3}),
    "lora+": Contender(adapter={"method": "lora", "r": 8, "alpha": 16}, train={"lr": 4e-4, "loraplus_ratio": 16.0},
                       needs=("lorakit.optim",)),
    "rslora": Contender(adapter={"method": "lora", "r": 8, "alpha": 16, "scaling": "rslora"}, train={"lr": 1e-3}),
    "pissa": Contender(adapter={"method": "lora", "r": 8, "alpha": 8, "init": "pissa_fast"}, train={"lr": 1e-3},
                       trails_because="PiSSA trains the principal components directly and is sensitive to the "
                                      "learning rate."),
    "dora": Contender(adapter={"method": "dora", "r": 8, "alpha": 16}, train={"lr": 2e-3}, cost=1.2),
    # VeRA trains two vectors per layer: it needs a large lr, and d_initial=1.0 (PEFT: 0.1) lets the frozen random
    # projections pass signal from the first step; a sweep on this task: lr 2e-2..5e-2 -> 0.776..0.782
    "vera": Contender(adapter={"method": "vera", "r": 256, "d_initial": 1.0}, train={"lr": 5e-2}, cost=1.8,
                      trails_because="VeRA trains ~100x fewer parameters (two vectors per layer over frozen random "
                                     "matrices); the paper needs many more steps and a higher learning rate to "
                                     "catch up."),
    "lora_fa": Contender(adapter={"method": "lora_fa", "r": 8, "alpha": 16}, train={"lr": 4e-3},
                         trails_because="LoRA-FA freezes A at its random init, so only B adapts: less capacity per "
                                        "step."),
    "adalora": Contender(adapter=lambda steps: {"method": "adalora", "r": 12, "target_r": 8, "alpha": 16,
                                                "total_steps": steps, "t_init": steps // 10, "t_final": steps // 4,
                                                "delta_t": max(1, steps // 40)},
                         # AdaLoRA starts its singular values E at zero, so lr 2e-3 barely moves it in 50 steps (0.61)
                         train={"lr": 1e-2}, cost=1.3,
                         trails_because="AdaLoRA spends the start of the budget at a higher rank and prunes; with a "
                                        "short budget the pruning happens before the ranks have learned much."),
    "sora": Contender(adapter={"method": "sora", "r": 8, "alpha": 16}, train={"lr": 2e-3}, cost=1.2,
                      trails_because="SoRA's soft-threshold shrinks gates towards zero, trading accuracy for a "
                                     "smaller final rank."),
    "lora_drop": Contender(adapter={"method": "lora_drop", "r": 8, "alpha": 16}, train={"lr": 2e-3}, cost=1.4,
                           procedure=_lora_drop_two_stages, needs=("lorakit.train.recipes.lora_drop",),
                           trails_because="LoRA-drop spends part of the budget on its measuring stage and shares one "
                                          "adapter across the less important layers."),
    "delta_lora": Contender(adapter=lambda steps: {"method": "delta_lora", "r": 8, "alpha": 16,
                                                   "delta_start": steps // 5},
                            train={"lr": 2e-3},
                            trails_because="Delta-LoRA only starts moving the base weights after delta_start "
                                           "steps."),
    "qlora": Contender(adapter={"method": "lora", "r": 8, "alpha": 16}, prepare=QUANTISED_BASE, train={"lr": 2e-3},
                       cost=1.2, needs=("lorakit.quant",),
                       trails_because="the 4-bit base changes the pretrained function slightly (NF4 rounding)."),
    # LoftQ quantises each targeted layer itself (alternating NF4 and SVD), so the model is not pre-quantised
    "loftq": Contender(adapter={"method": "lora", "r": 8, "alpha": 16, "init": "loftq"}, train={"lr": 2e-3},
                       cost=1.2, needs=("lorakit.quant", "lorakit.quant.loftq"),
                       trails_because="the 4-bit base changes the pretrained function slightly (NF4 rounding)."),
}

#: what ``CompareConfig()`` runs: the package's own contenders, in the table's order
DEFAULT_ORDER = list(CONTENDERS)


def register_contender(name: str, contender: Contender, *, replace: bool = False) -> None:
    """Add ``contender`` to the bake-off under ``name`` (``lorakit compare --methods name`` and the Python API).

    Its adapter's method must be registered in this process (``lorakit.methods``). Contenders registered at run
    time exist only in this process: run them with ``CompareConfig(isolate=False)``, or register them in a module
    the worker processes import.

    Example:
        >>> register_contender("lora-r2", Contender(adapter={"method": "lora", "r": 2}, train={"lr": 2e-3}))
        >>> "lora-r2" in CONTENDERS
        True
        >>> del CONTENDERS["lora-r2"]
    """
    if not isinstance(contender, Contender):
        raise TypeError(f"register_contender needs a lorakit.compare.Contender, got {type(contender).__name__}")
    if not isinstance(name, str) or not name.strip() or "," in name:
        raise ValueError(f"contender name {name!r} is invalid; allowed: a non-empty string without commas")
    if name in CONTENDERS and not replace:
        raise ValueError(f"contender {name!r} already exists; pass replace=True to redefine it")
    CONTENDERS[name] = contender


# ---------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """What a task measures and its defaults (what ``lorakit compare --task NAME`` runs with no other flag).

    ``metric``: the row key of the quality figure; ``higher_is_better``: its direction; ``trainer_task``: the
    Trainer's evaluation (``"classification"``: accuracy, ``"lm"``: token-weighted loss and perplexity).
    """

    metric: str
    metric_label: str
    higher_is_better: bool
    trainer_task: str
    model: str
    data: str
    methods: tuple[str, ...] | None  # None: every contender of the table
    steps: int
    batch_size: int
    max_length: int
    eval_size: int
    lr_scale: float = 1.0  # the contenders' learning rates (tuned on MiniLM classification) times this


#: task name -> what it measures and its defaults. The causal-LM default is small on purpose (4 contenders, 20
#: steps of batch 4 on SmolLM2-135M: a few minutes on 2 cores); raise --steps / --methods for a real study.
TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec(metric="accuracy", metric_label="held-out accuracy", higher_is_better=True,
                               trainer_task="classification", model="minilm", data="movie_reviews", methods=None,
                               steps=50, batch_size=32, max_length=40, eval_size=500),
    "causal-lm": TaskSpec(metric="eval_loss", metric_label="held-out loss (answer tokens)", higher_is_better=False,
                          trainer_task="lm", model="smollm2", data="chatterbot",
                          methods=("lora", "dora", "qlora", "vera"), steps=20, batch_size=4, max_length=64,
                          eval_size=48, lr_scale=0.5),
}

#: fields a variant may set besides AdapterConfig's: the learning rate
TRAIN_VARIANT_FIELDS = ("lr",)


# ---------------------------------------------------------------------------------------------------------------
# Variants and sweeps: "lora:r=4", "dora:r=8:alpha=16", sweep "r=1,2,4,8"
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """A contender named inline: a table entry plus field overrides (``"lora:r=4:init=pissa"``)."""

    spec: str  # the name shown in every table and plot
    base: str
    overrides: dict[str, Any]


def _parse_value(text: str) -> Any:
    """``4`` -> 4, ``1e-3`` -> 0.001, ``true`` -> True, ``none`` -> None, anything else stays a string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        value = json.loads(text)
    except ValueError:
        return text.strip()
    return value if isinstance(value, (int, float)) else text.strip()


def _adapter_field_names() -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(AdapterConfig)]


def parse_variant(spec: str) -> Variant:
    """Split ``"base:field=value:field=value"`` into the table entry and its overrides (no validation of values).

    Example:
        >>> v = parse_variant("vera:r=1024")
        >>> v.base, v.overrides
        ('vera', {'r': 1024})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"contender {spec!r} is invalid; allowed: a name from the contenders table, optionally "
                         f"followed by :field=value settings (e.g. lora:r=4)")
    base, *parts = [p.strip() for p in spec.strip().split(":")]
    overrides: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise ValueError(f"variant {spec!r}: {part!r} is not field=value; write e.g. {base}:r=4")
        if key in overrides:
            raise ValueError(f"variant {spec!r} sets {key!r} twice")
        overrides[key] = _parse_value(value)
    return Variant(spec.strip(), base, overrides)


def contender_for(spec: str) -> Contender:
    """The :class:`Contender` a name or inline variant stands for (a table entry with its fields overridden).

    Example:
        >>> contender_for("lora:r=4").adapter_fields(steps=50)
        {'method': 'lora', 'r': 4, 'alpha': 16}
    """
    variant = parse_variant(spec)
    if variant.base not in CONTENDERS:
        raise ValueError(f"unknown contender(s) [{variant.base!r}]; choose from: {', '.join(CONTENDERS)}")
    base = CONTENDERS[variant.base]
    if not variant.overrides:
        return base
    if base.kind != "adapter":
        raise ValueError(f"variant {spec!r}: {variant.base!r} is a baseline without adapter settings; variants "
                         f"apply to adapter contenders")
    known = set(_adapter_field_names()) - {"method"}
    unknown = [k for k in variant.overrides if k not in known and k not in TRAIN_VARIANT_FIELDS]
    if unknown:
        raise ValueError(f"variant {spec!r}: unknown field {unknown[0]!r}; allowed: AdapterConfig fields "
                         f"({', '.join(sorted(known))}) or {', '.join(TRAIN_VARIANT_FIELDS)}")
    adapter_over = {k: v for k, v in variant.overrides.items() if k not in TRAIN_VARIANT_FIELDS}
    train_over = {k: v for k, v in variant.overrides.items() if k in TRAIN_VARIANT_FIELDS}

    def fields_for(steps: int, _base: Contender = base) -> dict[str, Any]:
        return {**_base.adapter_fields(steps), **adapter_over}

    return replace(base, adapter=fields_for, train={**base.train, **train_over})


def check_contender(spec: str, steps: int) -> None:
    """Raise one clear ValueError if ``spec`` names no contender, sets an unknown field or a value its method
    rejects (checked by building its AdapterConfig, as training would), before anything trains."""
    contender = contender_for(spec)
    fields_ = contender.adapter_fields(steps)
    if fields_ is not None:
        try:
            AdapterConfig(**fields_)
        except ValueError as exc:
            raise ValueError(f"contender {spec!r} is invalid: {exc}") from None
    if "lr" in contender.train:
        TrainConfig(lr=contender.train["lr"], progress=False)  # "lr=-1" fails here, naming TrainConfig.lr


def parse_sweep(sweep: str) -> tuple[str, list[Any]]:
    """``"r=1,2,4,8"`` -> ``("r", [1, 2, 4, 8])``.

    >>> parse_sweep("init=kaiming,pissa")
    ('init', ['kaiming', 'pissa'])
    """
    key, eq, values = (sweep or "").partition("=")
    key = key.strip()
    items = [_parse_value(v) for v in values.split(",") if v.strip()]
    if not eq or not key or not items:
        raise ValueError(f"sweep {sweep!r} is invalid; write field=value,value,... (e.g. r=1,2,4,8)")
    if key not in set(_adapter_field_names()) - {"method"} and key not in TRAIN_VARIANT_FIELDS:
        raise ValueError(f"sweep {sweep!r}: unknown field {key!r}; allowed: AdapterConfig fields or "
                         f"{', '.join(TRAIN_VARIANT_FIELDS)}")
    return key, items


def _with_field(spec: str, key: str, value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return f"{spec}:{key}={'none' if value is None else text}"


def expand_sweep(methods: Sequence[str], sweep: str, steps: int = 50) -> list[str]:
    """Each adapter contender of ``methods`` becomes one variant per sweep value; baselines stay; the reference
    (LoRA) stays as well, so every variant has its paired comparison. A variant equal to a contender already in
    the list is not trained twice. Idempotent: expanding an expanded list changes nothing.

    Example:
        >>> expand_sweep(["lora", "dora", "full"], "r=4,8")
        ['lora', 'lora:r=4', 'dora:r=4', 'dora:r=8', 'full']
    """
    key, values = parse_sweep(sweep)
    out: list[str] = []
    for spec in methods:
        contender = contender_for(spec)
        variant = parse_variant(spec)
        if contender.kind != "adapter" or key in variant.overrides:
            out.append(spec)
            continue
        if variant.spec == REFERENCE:
            out.append(spec)
        for value in values:
            out.append(_with_field(spec, key, value))
    out = list(dict.fromkeys(out))
    # a variant that trains exactly what a listed contender trains (lora:r=8 next to lora) is dropped
    seen: dict[str, str] = {}
    kept = []
    for spec in out:
        check_contender(spec, steps)  # a value the method rejects is named here, before anything trains
        contender = contender_for(spec)
        fields_ = contender.adapter_fields(steps)
        resolved = AdapterConfig(**fields_).to_dict() if fields_ is not None else None  # defaults spelled out
        ident = json.dumps([resolved, contender.train, contender.kind,
                            contender.prepare.label if contender.prepare else None], sort_keys=True, default=str)
        if ident in seen:
            continue
        seen[ident] = spec
        kept.append(spec)
    return kept


def sweep_value(row: dict, key: str) -> Any:
    """The value of the swept field ``key`` in a result row (its settings), or None."""
    settings = row.get("settings") or {}
    adapter = settings.get("adapter") or {}
    if key in adapter:
        return adapter[key]
    if key in TRAIN_VARIANT_FIELDS:
        return (settings.get("train") or {}).get(key)
    if adapter and key in _adapter_field_names():
        try:
            return AdapterConfig(**adapter).to_dict()[key]  # a default the settings leave out (init=kaiming)
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Memory sizes
# ---------------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_bytes(text: str | int | float) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"1.5GiB"`` -> 1_610_612_736, ``"500MB"``, or a plain number of bytes.

    >>> parse_bytes("2GB"), parse_bytes("512MiB")
    (2000000000, 536870912)
    """
    import re

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory size {text!r} is invalid; write e.g. 2GB, 1.5GiB or 500MB")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} is invalid; it must be positive")
    return size


# ---------------------------------------------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CompareConfig:
    """One comparison: task, model, data, budget and which contenders (None: the task's default).

    Example:
        >>> cfg = CompareConfig(task="causal-lm")
        >>> cfg.model, cfg.data, cfg.methods
        ('smollm2', 'chatterbot', ['lora', 'dora', 'qlora', 'vera'])
    """

    model: str | None = None  # a local transformers folder, "minilm" or "smollm2" (the embedded defaults)
    data: str | None = None  # a JSONL/CSV/JSON file, "movie_reviews" or "chatterbot"
    methods: list[str] | None = None  # names or inline variants ("lora:r=4")
    steps: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    eval_size: int | None = None
    train_size: int | None = None  # None: all remaining rows
    warmup_steps: int = 10
    seed: int = 0  # seeds the held-out split and the first training run; run k of --seeds uses seed + k
    jobs: int = 0  # contenders trained side by side; 0 = auto (2 on a 2-core machine, up to 4 on bigger ones)
    threads: int = 0  # torch threads per worker; 0 = auto (the cores divided among the workers)
    out: str = "report"
    # each contender in its own process, so that its peak memory is its own; False: one after another in this
    # process (contenders registered at run time, e.g. by a test, exist only here)
    isolate: bool = True
    task: str = "classification"  # or "causal-lm"
    seeds: int = 1  # training runs per contender (seed, seed+1, ...); the held-out split stays the same
    sweep: str | None = None  # "field=v1,v2,...": each adapter contender becomes one variant per value
    budget_seconds: float | None = None  # equal wall time: each contender trains as many steps as fit
    tune_lr: bool = False  # a short learning-rate sweep per contender first (on rows carved from training)
    memory_cap: str | None = None  # e.g. "2GB": the report names the best contender whose training memory fits
    resume: bool = False  # reuse finished runs in out/runs/ (same settings), train only the rest
    answers: int = 3  # causal-lm: held-out prompts answered greedily by every contender
    answer_tokens: int = 32

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is invalid; allowed: {', '.join(TASKS)}")
        spec = TASKS[self.task]
        self.model = self.model if self.model is not None else spec.model
        self.data = self.data if self.data is not None else spec.data
        if self.methods is None:
            self.methods = list(spec.methods) if spec.methods is not None else list(DEFAULT_ORDER)
        for name in ("steps", "batch_size", "max_length", "eval_size"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(spec, name))
        if self.steps < 1 or self.batch_size < 1 or self.eval_size < 1:
            raise ValueError("steps, batch_size and eval_size must be >= 1")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds={self.seeds!r} is invalid; allowed: an integer >= 1")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"budget_seconds={self.budget_seconds!r} is invalid; allowed: a positive number")
        if self.memory_cap is not None:
            parse_bytes(self.memory_cap)
        if self.answers < 0 or self.answer_tokens < 1:
            raise ValueError("answers must be >= 0 and answer_tokens >= 1")
        for name in self.methods:  # unknown names, fields and values fail here, before anything trains
            check_contender(name, self.steps)
        if self.sweep:
            self.methods = expand_sweep(self.methods, self.sweep, self.steps)
            for name in self.methods:
                check_contender(name, self.steps)
        if not self.methods:
            raise ValueError("no contenders chosen; pass --methods (e.g. lora,dora)")
        cores = _cores()
        if self.jobs < 0 or self.threads < 0:
            raise ValueError("jobs and threads must be >= 0 (0 = choose automatically)")
        if self.jobs == 0:
            # small models on few cores: two single-threaded workers do ~1.45x the work of one two-threaded one
            self.jobs = cores if cores <= 2 else min(4, cores // 2)
        self.jobs = max(1, min(self.jobs, len(self.methods) * self.seeds)) if self.isolate else 1
        if self.threads == 0:
            self.threads = max(1, cores // self.jobs)

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    def fingerprint(self) -> str:
        """The settings a finished run depends on (``resume`` reuses a run only if they are equal)."""
        keep = ("model", "data", "task", "steps", "batch_size", "max_length", "eval_size", "train_size",
                "warmup_steps", "seed", "budget_seconds", "tune_lr", "answers", "answer_tokens")
        return json.dumps({k: getattr(self, k) for k in keep}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------------------------
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container/taskset limits
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_rows(data: str, seed: int, eval_size: int, train_size: int | None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of {"text", "label"} with integer labels; the split is seeded."""
    if data == "movie_reviews":
        rows = [dict(r) if isinstance(r, dict) else {"text": r[0], "label": r[1]} for r in movie_reviews()]
    else:
        records = load_source(data)
        fmt = detect_format(records)
        if fmt in LM_FORMATS:  # the task does not match the data: say so before anything trains
            raise DataError(records[0].origin, f"these are {fmt} rows without a 'label'; the classification task "
                                               f"needs text,label rows (for {fmt} rows pass --task causal-lm)")
        label_names(records)  # every row has a usable label, else a DataError naming its file and line
        for r in records:
            if not isinstance(r.get("text"), str) or not r["text"].strip():
                raise DataError(r.origin, "field 'text' must be a non-empty string (compare trains classifiers on "
                                          "text,label rows)")
        rows = [{"text": r["text"], "label": r["label"]} for r in records]
    labels = sorted({r["label"] for r in rows}, key=str)
    if not all(isinstance(lbl, int) for lbl in labels):
        ids = {lbl: i for i, lbl in enumerate(labels)}
        rows = [{"text": r["text"], "label": ids[r["label"]]} for r in rows]
    random.Random(seed).shuffle(rows)
    if len(rows) <= eval_size:
        raise ValueError(f"{data}: {len(rows)} rows is not more than eval_size={eval_size}")
    held_out, train = rows[:eval_size], rows[eval_size:]
    return (train[:train_size] if train_size else train), held_out


def load_lm_rows(data: str, seed: int, eval_size: int, train_size: int | None) -> tuple[list, list, str]:
    """(train, held-out, format) rows for the causal-LM task: chat, instruction or text rows, as ``lorakit train``
    reads them (``lorakit.train.data``); the split is seeded."""
    records = load_source(data)
    fmt = detect_format(records)
    if fmt not in LM_FORMATS:
        raise DataError(records[0].origin, f"these are {fmt} rows (text, label); the causal-lm task needs chat "
                                           f"(messages), instruction (instruction, output) or text rows (for "
                                           f"text,label rows use --task classification)")
    rows = list(records)
    random.Random(seed).shuffle(rows)
    if len(rows) <= eval_size:
        raise ValueError(f"{data}: {len(rows)} rows is not more than eval_size={eval_size}; lower --eval-size")
    held_out, train = rows[:eval_size], rows[eval_size:]
    return (train[:train_size] if train_size else train), held_out, fmt


def resolve_model(model: str) -> str:
    """A local transformers folder, or an embedded default ("minilm", "smollm2") fetched by lorakit.assets."""
    return resolve_model_path(model)


def check_task(cfg: CompareConfig) -> None:
    """One clear error, before training, if the model or the data does not fit the task."""
    path = resolve_model(cfg.model)
    is_lm = detect_task(path) == "lm"
    wants_lm = cfg.spec.trainer_task == "lm"
    if wants_lm and not is_lm:
        raise ValueError(f"model {cfg.model!r} is not a causal LM (its config.json names no *ForCausalLM "
                         f"architecture); the causal-lm task needs one, e.g. --model smollm2")
    if wants_lm:
        load_lm_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)
        for name in cfg.methods:
            if contender_for(name).kind == "head":
                raise ValueError(f"contender {name!r} trains a new classification head; the causal-lm task has "
                                 f"none (drop it from --methods)")
    else:
        if is_lm:
            raise ValueError(f"model {cfg.model!r} is a causal LM; the classification task needs an encoder such as "
                             f"--model minilm (or pass --task causal-lm)")
        load_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)


def weights_floor_bytes(path: str) -> int:
    """The least any contender's model can weigh: every weight at 4 bits (NF4's size, scales left out)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                total += math.prod(shape) if shape else 1
    return total // 2


def describe_contender(name: str, steps: int = 50) -> str:
    """One line: what the contender trains and with which settings.

    >>> describe_contender("lora")
    'method=lora r=8 alpha=16 | lr=0.002'
    """
    contender = contender_for(name)
    adapter = contender.adapter_fields(steps)
    parts = [" ".join(f"{k}={v}" for k, v in adapter.items()) if adapter else contender.kind]
    if contender.prepare is not None:
        parts.append(contender.prepare.label)
    parts.append(" ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in contender.train.items()))
    return " | ".join(p for p in parts if p)


def availability(name: str) -> str | None:
    """None if the contender can run here, else why not."""
    contender = contender_for(name)
    try:
        adapter = contender.adapter_fields(100)
        if adapter is not None:
            get_method(adapter["method"])
        for module in contender.needs:
            __import__(module)
    except (ImportError, AttributeError) as exc:
        return f"not available in this build ({exc})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Costs that isolate the method
# ---------------------------------------------------------------------------------------------------------------
def _storage_key(t) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some tensor subclasses)
        return None


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (tied or shared tensors count once)."""
    seen: dict[Any, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is None:
            seen[id(t)] = t.numel() * t.element_size()
        elif key not in seen:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def weight_bytes(model: "nn.Module") -> tuple[int, int]:
    """(frozen bytes, trainable bytes): the model's parameters and buffers that do not train (for a 4-bit base:
    the packed NF4 weights and their scales) and those that do.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 2)
        >>> net.bias.requires_grad_(False)
        Parameter containing:...
        >>> weight_bytes(net)
        (8, 32)
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return tensor_bytes(frozen), tensor_bytes(trainable)


def saved_activation_bytes(model: "nn.Module", batch: dict) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward pass of ``batch`` (measured with
    ``torch.autograd.graph.saved_tensors_hooks``), the model's own parameters and buffers left out. Nothing is
    updated: the graph is dropped without a backward pass."""
    import torch

    own = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[Any, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key is None:
            seen[id(t)] = t.numel() * t.element_size()
        elif key not in own and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
            del out
    finally:
        model.train(was_training)
    return sum(seen.values())


class _OptimizerStateProbe:
    """Records the bytes of the optimiser's state after its first step (torch's global step hook, so lorakit's
    Trainer needs no change); AdamW: two moments per trainable value."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self._handle = None

    def __enter__(self) -> "_OptimizerStateProbe":
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(optimizer, args, kwargs) -> None:
            if self.bytes is None:
                tensors = [v for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor)]
                self.bytes = tensor_bytes(tensors)

        self._handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()


def _tokens_per_second(run_dir: str) -> float | None:
    """Median tokens/s of the Trainer's logged training steps (its log.jsonl)."""
    import statistics

    path = Path(run_dir, "log.jsonl")
    if not path.exists():
        return None
    rates = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "train" and isinstance(rec.get("tokens_per_s"), (int, float)):
            rates.append(float(rec["tokens_per_s"]))
    rates = rates[1:] or rates  # the first logged step includes warm-up
    return statistics.median(rates) if rates else None


# ---------------------------------------------------------------------------------------------------------------
# One contender (runs in its own process)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    run: ContenderRun
    contender: Contender
    adapter: dict[str, Any] | None
    total_params: int
    tokenizer: Any
    fmt: str | None


def _load(name: str, cfg: CompareConfig, workdir: str, seed: int, steps: int, lr: float | None,
          train_rows: list | None = None, eval_rows: list | None = None) -> _Loaded:
    """Load model and data for one training run of contender ``name`` (fresh weights every time)."""
    import torch

    torch.manual_seed(seed)  # every contender starts from the same head init and data order
    _quiet_transformers()
    contender = contender_for(name)
    adapter = contender.adapter_fields(steps)
    path = resolve_model(cfg.model)
    train_cfg_extra = dict(contender.train)
    if lr is not None or cfg.spec.lr_scale != 1.0:
        train_cfg_extra["lr"] = lr if lr is not None else _base_lr(name, cfg)
    train_cfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps,
                            schedule="linear", seed=seed, log_every=max(1, steps // 20), group_by_length=True,
                            output_dir=os.path.join(workdir, "run"), progress=False, **train_cfg_extra)
    if cfg.spec.trainer_task == "lm":
        model, tokenizer = load_base(path, "lm")
        if train_rows is None:
            train_rows, eval_rows, fmt = load_lm_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)
        else:
            fmt = detect_format(train_rows)
        train_set = encode(train_rows, tokenizer, fmt, max_length=cfg.max_length)
        eval_set = encode(eval_rows, tokenizer, fmt, max_length=cfg.max_length)
        run = ContenderRun(model, None, train_cfg, train_set, eval_set, Collator(tokenizer), task="lm",
                           prompts=list(eval_rows))
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        fmt = None
        if train_rows is None:
            train_rows, eval_rows = load_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)
        n_labels = len({r["label"] for r in train_rows + eval_rows})
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels)

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=cfg.max_length,
                            return_tensors="pt")
            return {**enc, "labels": torch.tensor([r["label"] for r in rows])}

        eval_rows = sorted(eval_rows, key=lambda r: len(r["text"]))  # less padding; accuracy ignores order
        run = ContenderRun(model, _head_name(model), train_cfg, train_rows, eval_rows, collate)
    total_params = sum(p.numel() for p in model.parameters())
    return _Loaded(run, contender, adapter, total_params, tokenizer, fmt)


def _train(loaded: _Loaded, seed: int) -> TrainResult:
    run, contender, adapter = loaded.run, loaded.contender, loaded.adapter
    if contender.prepare is not None:
        contender.prepare.run(run)
    # the new head trains with every adapter (and is saved with it), like a user's classifier fine-tune
    heads = [run.head] if run.head else []
    config = AdapterConfig(**adapter, modules_to_save=heads, seed=seed) if adapter is not None else None
    return contender.procedure(run, config)


def _base_lr(name: str, cfg: CompareConfig) -> float:
    """The contender's learning rate on this task (its table rate, times the task's scale unless a variant set it)."""
    contender = contender_for(name)
    lr = float(contender.train.get("lr", TrainConfig.lr))
    return lr if "lr" in parse_variant(name).overrides else lr * TASKS[cfg.task].lr_scale


def _quality(cfg: CompareConfig, metrics: dict) -> float | None:
    value = metrics.get(cfg.spec.metric)
    return float(value) if isinstance(value, (int, float)) else None


def _better(cfg: CompareConfig | TaskSpec, a: float, b: float) -> bool:
    spec = cfg.spec if isinstance(cfg, CompareConfig) else cfg
    return a > b if spec.higher_is_better else a < b


def _seconds_per_step(name: str, cfg: CompareConfig, workdir: str, seed: int) -> float:
    """A short calibration run (6 steps, no evaluation) of the contender: its median seconds per step."""
    calib = 6
    loaded = _load(name, cfg, os.path.join(workdir, "calibrate"), seed, calib, None)
    loaded.run.eval_rows = []
    result = _train(loaded, seed)
    times = result.step_times[2:] or result.step_times
    return max(sorted(times)[len(times) // 2], 1e-6)


def _tune_lr(name: str, cfg: CompareConfig, workdir: str, seed: int, steps: int) -> tuple[float, dict[str, float]]:
    """Try the contender's learning rate x 1/3, 1 and 3 for a third of the budget on the training rows minus a
    tuning split; return the best rate and what each reached (the held-out rows are never looked at)."""
    if cfg.spec.trainer_task == "lm":
        train_rows, _, _ = load_lm_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)
    else:
        train_rows, _ = load_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)
    n_tune = max(1, min(len(train_rows) // 5, cfg.eval_size, 200))
    tune_eval, tune_train = train_rows[:n_tune], train_rows[n_tune:]
    base_lr = _base_lr(name, cfg)
    tried: dict[str, float] = {}
    best_lr, best_q = base_lr, None
    short = max(3, steps // 3)
    for factor in (1.0, 1 / 3, 3.0):  # the table's rate first: it wins ties
        lr = base_lr * factor
        loaded = _load(name, cfg, os.path.join(workdir, f"tune-{factor:g}"), seed, short, lr, tune_train, tune_eval)
        try:
            result = _train(loaded, seed)
            q = _quality(cfg, result.final_eval)
        except ValueError:  # a rate that diverges (NonFiniteLossError) is simply not chosen
            q = None
        tried[f"{lr:.3g}"] = q if q is not None else float("nan")
        if q is not None and (best_q is None or _better(cfg, q, best_q)):
            best_lr, best_q = lr, q
    return best_lr, tried


def run_contender(name: str, cfg: CompareConfig, workdir: str, seed: int | None = None) -> dict[str, Any]:
    """Train one contender (a table name or an inline variant) with one seed and measure it. Returns its row of
    the results (plus curves, costs and, for causal LMs, its answers)."""
    import torch

    torch.set_num_threads(cfg.threads)
    seed = cfg.seed if seed is None else seed
    steps, lr, tried = cfg.steps, None, None
    if cfg.budget_seconds:
        steps = max(1, int(cfg.budget_seconds / _seconds_per_step(name, cfg, workdir, seed)))
    if cfg.tune_lr:
        lr, tried = _tune_lr(name, cfg, workdir, seed, steps)
    loaded = _load(name, cfg, workdir, seed, steps, lr)
    run, contender, adapter, model = loaded.run, loaded.contender, loaded.adapter, loaded.run.model
    t0 = time.perf_counter()
    with _OptimizerStateProbe() as probe:
        result = _train(loaded, seed)
    wall = time.perf_counter() - t0
    trainable = run.trainable_params if run.trainable_params is not None else run.count_trainable()
    final = result.final_eval
    answers = _answers(loaded, cfg) if cfg.spec.trainer_task == "lm" and cfg.answers else None
    if contender.kind == "adapter":
        folder = save(model, os.path.join(workdir, "adapter"))
    else:  # what a user would have to ship: every trainable tensor
        from safetensors.torch import save_file

        folder = Path(workdir, "weights")
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(folder / "weights.safetensors"))
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    # costs, measured after everything above so that they cannot change a result
    frozen_bytes, trainable_bytes = weight_bytes(model)
    probe_batch = run.collate(list(run.train_rows[:cfg.batch_size]))
    tokens = int(probe_batch["attention_mask"].sum()) if "attention_mask" in probe_batch else \
        int(probe_batch["input_ids"].numel())
    activations = saved_activation_bytes(model, probe_batch)
    optimizer_bytes = probe.bytes if probe.bytes is not None else 0
    train_settings = {**contender.train, **({"lr": run.train_config.lr} if lr is not None or
                                             cfg.spec.lr_scale != 1.0 else {})}
    row = {
        "name": name, "kind": contender.kind, "seed": seed, "steps": len(result.losses),
        "settings": {"adapter": adapter, "train": train_settings, "quantize": contender.quantizes_base},
        "family": (adapter or {}).get("method", contender.kind), "base": parse_variant(name).base,
        "trainable_params": trainable, "total_params": loaded.total_params,
        "trainable_pct": 100.0 * trainable / loaded.total_params,
        "accuracy": final.get("accuracy"), "eval_loss": final.get("eval_loss"),
        "perplexity": final.get("perplexity"),
        "seconds_per_step": result.seconds_per_step, "wall_seconds": wall,
        "tokens_per_second": _tokens_per_second(run.train_config.output_dir),
        "peak_rss_bytes": result.peak_memory_bytes, "artifact_bytes": size,
        "model_weight_bytes": frozen_bytes, "trainable_bytes": trainable_bytes,
        "optimizer_state_bytes": optimizer_bytes,
        "activation_bytes_per_token": activations / max(1, tokens),
        # weights + gradients (one per trainable value) + optimiser state + activations of one batch
        "train_memory_bytes": frozen_bytes + 2 * trainable_bytes + optimizer_bytes
                              + int(activations / max(1, tokens) * tokens),
        "losses": result.losses,
    }
    if tried is not None:
        row["lr_tried"] = tried
    if answers is not None:
        row["answers"] = answers
    return row


def _prompt_and_reference(row: dict, fmt: str, tokenizer) -> tuple[str, str, str]:
    """(prompt text for the model, the prompt as shown, the held-out reference answer) of one LM row."""
    if fmt == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        shown = next((m["content"] for m in reversed(messages[:last]) if m.get("role") == "user"), "")
        prompt = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=False)
        return prompt, shown, messages[last]["content"]
    if fmt == "instruction":
        prompt, response = render_instruction(row)
        return prompt, row["instruction"], response
    words = row["text"].split()
    half = max(1, len(words) // 2)
    return " ".join(words[:half]), " ".join(words[:half]), " ".join(words[half:])


def _answers(loaded: _Loaded, cfg: CompareConfig) -> list[dict[str, str]]:
    """Greedy answers of the trained model to the first held-out prompts."""
    import torch

    model, tokenizer = loaded.run.model, loaded.tokenizer
    rows = loaded.run.prompts[:cfg.answers]
    out = []
    was_training = model.training
    model.eval()
    try:
        for row in rows:
            prompt, shown, reference = _prompt_and_reference(row, loaded.fmt, tokenizer)
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=loaded.fmt != "chat")
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=cfg.answer_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            out.append({"prompt": shown, "reference": reference, "answer": text})
    finally:
        model.train(was_training)
    return out


def _quiet_transformers() -> None:
    """The new classifier head is *meant* to be missing from the checkpoint: no load report or progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _head_name(model) -> str:
    for name in ("classifier", "score", "head", "out_proj"):
        if hasattr(model, name):
            return name
    raise ValueError("the model has no classification head named classifier/score/head; use a "
                     "*ForSequenceClassification model")


# ---------------------------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------------------------
def _slug(name: str, seed: int) -> str:
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)[:60]
    return f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}-seed{seed}"


def _finished_runs(cfg: CompareConfig, out: Path) -> dict[tuple[str, int], dict]:
    """Runs in ``out/runs/`` written with the same settings (what ``resume`` skips)."""
    found: dict[tuple[str, int], dict] = {}
    folder = out / "runs"
    if not folder.is_dir():
        return found
    for path in folder.glob("*.json"):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged file: that run trains again
        if not isinstance(saved, dict) or saved.get("fingerprint") != cfg.fingerprint():
            continue
        row = saved.get("row") or {}
        if isinstance(row.get("name"), str) and isinstance(row.get("seed"), int):
            found[(row["name"], row["seed"])] = row
    return found


def compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every contender in ``cfg.methods`` for every seed (each in a subprocess) and write the report to
    ``cfg.out``. Returns the results dictionary that is also written to ``results.json``.

    Everything that can be wrong with the input (task, model, data, contender names and fields, sweep values,
    a memory cap below what any contender can need) fails before the first contender trains.
    """
    out = Path(cfg.out)
    check_task(cfg)  # model and data fit the task; fetch/convert the model once, before the workers start
    if cfg.memory_cap is not None:
        cap, floor = parse_bytes(cfg.memory_cap), weights_floor_bytes(resolve_model(cfg.model))
        if cap < floor:
            raise ValueError(f"--memory-cap {cfg.memory_cap} is below what any contender can need: the model's "
                             f"weights alone take at least {_fmt_bytes(floor)} at 4 bits each; raise the cap")
    out.mkdir(parents=True, exist_ok=True)
    _warm_imports()
    from concurrent.futures import ThreadPoolExecutor, as_completed

    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    finished = _finished_runs(cfg, out) if cfg.resume else {}
    runs: dict[tuple[str, int], dict] = {}
    skipped: dict[str, str] = {}
    total, done = len(cfg.methods) * len(seeds), 0
    jobs = []
    for name in cfg.methods:  # what this build cannot run goes under "Not run"; the rest still runs
        why = availability(name)
        if why:
            skipped[name] = why
            done += len(seeds)
            log(f"[{done}/{total}] {name}: skipped, {why}")
            continue
        for seed in seeds:
            if (name, seed) in finished:
                runs[(name, seed)] = finished[(name, seed)]
                done += 1
                log(f"[{done}/{total}] {name}{_seed_tag(cfg, seed)}: finished in an earlier run (resumed)")
            else:
                jobs.append((name, seed))
    workers = max(1, min(cfg.jobs, len(jobs)))
    log(f"training {len(jobs)} run(s), {workers} at a time with {cfg.threads} torch thread(s) each")
    started = time.perf_counter()

    def timed(job: tuple[str, int]) -> tuple[dict, float]:
        t0 = time.perf_counter()
        return (_run_isolated if cfg.isolate else _run_here)(job[0], cfg, job[1]), time.perf_counter() - t0

    # each worker is its own process; these threads only wait for them. Longest first, so that the last
    # contenders to finish are short ones and no core idles for long at the end (the report keeps the given order)
    schedule = sorted(jobs, key=lambda j: -contender_for(j[0]).cost) if workers > 1 else jobs
    (out / "runs").mkdir(exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(timed, job): job for job in schedule}
        for fut in as_completed(futures):
            name, seed = futures[fut]
            done += 1
            try:
                row, seconds = fut.result()
            except RuntimeError as exc:  # one contender's failure is a row of the report, not the end of it
                skipped[name] = f"failed: {exc}"
                log(f"[{done}/{total}] {name}{_seed_tag(cfg, seed)}: FAILED "
                    f"({str(exc).splitlines()[-1] if str(exc) else exc})")
                continue
            runs[(name, seed)] = row
            atomic_write_text(out / "runs" / f"{_slug(name, seed)}.json",
                              json.dumps({"fingerprint": cfg.fingerprint(), "row": row}))
            log(f"[{done}/{total}] {name}{_seed_tag(cfg, seed)}: {_headline(cfg.spec, row)}, "
                f"{row['trainable_params']:,} trainable, {row['seconds_per_step']:.3f} s/step ({seconds:.0f} s)")
    rows = aggregate([[runs[(n, s)] for s in seeds if (n, s) in runs] for n in cfg.methods if n not in skipped],
                     cfg.spec)
    skipped = {n: skipped[n] for n in cfg.methods if n in skipped}
    results = {"schema_version": SCHEMA_VERSION, "config": asdict(cfg), "rows": rows, "skipped": skipped,
               "total_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M"),
               "environment": _environment()}
    results["comparisons"] = reference_comparisons(rows, cfg.spec, cfg.eval_size)
    cap = parse_bytes(cfg.memory_cap) if cfg.memory_cap else None
    results["recommendations"] = recommend(rows, cfg.spec, cfg.eval_size, cap, cfg.memory_cap)
    write_report(results, out)
    for rec in results["recommendations"]:
        if rec["name"] is None:
            log(f"note: {rec['text']}")
    log(f"report written to {out}/ (report.md, report.html, results.json, plots)")
    return results


def _seed_tag(cfg: CompareConfig, seed: int) -> str:
    return f" (seed {seed})" if cfg.seeds > 1 else ""


def _headline(spec: TaskSpec, row: dict) -> str:
    if spec.trainer_task == "lm":
        return f"eval loss {_fmt(row.get('eval_loss'), '.4f')} (perplexity {_fmt(row.get('perplexity'), '.2f')})"
    return f"accuracy {_fmt(row.get('accuracy'), '.3f')}"


def _run_isolated(name: str, cfg: CompareConfig, seed: int | None = None) -> dict[str, Any]:
    """Run one contender in a fresh process: forked where possible (imports and data already loaded, so it
    starts in well under a second), else a new interpreter. Either way its peak memory is its own."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return _run_in_subprocess(name, cfg, seed)
    # forkserver, not fork: a plain fork of a process that already ran torch ops can deadlock in OpenMP; the
    # fork server is a fresh interpreter that only imported the heavy modules, so its forks start fast and safe
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_preload_modules(cfg))
    with tempfile.TemporaryDirectory(prefix="lorakit-compare-") as work:
        proc = ctx.Process(target=_forked_worker, args=(name, cfg, work, seed), daemon=False)
        proc.start()
        proc.join()
        result, error = Path(work, "result.json"), Path(work, "error.txt")
        if proc.exitcode != 0 or not result.exists():
            raise RuntimeError(error.read_text()[-2000:] if error.exists() else f"worker exit code {proc.exitcode}")
        return json.loads(result.read_text())


def _run_here(name: str, cfg: CompareConfig, seed: int | None = None) -> dict[str, Any]:
    """Run one contender in this process (``CompareConfig(isolate=False)``). Failures come back as RuntimeError
    with the traceback, as from a worker process, so that compare() reports them the same way."""
    import traceback

    import torch

    threads = torch.get_num_threads()  # run_contender sets the worker's count; this process keeps its own
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-compare-") as work:
            return run_contender(name, cfg, work, seed)
    except Exception:
        raise RuntimeError(traceback.format_exc()[-2000:]) from None
    finally:
        torch.set_num_threads(threads)


def _preload_modules(cfg: CompareConfig) -> list[str]:
    """What the fork server imports once so that each worker starts with it (~5 s per worker otherwise: loading
    a transformers model pulls in ~1500 modules). Names that fail to import are skipped by multiprocessing."""
    mods = ["torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
            "transformers.models.auto.tokenization_auto", "safetensors.torch", "lorakit.compare",
            "lorakit.train.trainer", "lorakit.train.data", "lorakit.train.job", "lorakit.model", "lorakit.io",
            "lorakit.methods.lora"]
    try:
        model_type = json.loads(Path(resolve_model(cfg.model), "config.json").read_text()).get("model_type", "")
        if model_type.replace("_", "").isalnum():
            mods.append(f"transformers.models.{model_type}.modeling_{model_type}")
    except (OSError, ValueError):
        pass
    for name in cfg.methods:
        contender = contender_for(name)
        adapter = contender.adapter_fields(cfg.steps)
        if adapter:
            mods.append(f"lorakit.methods.{adapter['method']}")
        mods += contender.needs
    return list(dict.fromkeys(mods))


def _forked_worker(name: str, cfg: CompareConfig, work: str, seed: int | None = None) -> None:
    import traceback

    try:
        row = run_contender(name, cfg, work, seed)
        Path(work, "result.json").write_text(json.dumps(row))
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        Path(work, "error.txt").write_text(traceback.format_exc())
        raise SystemExit(1)


def _warm_imports() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run_in_subprocess(name: str, cfg: CompareConfig, seed: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lorakit-compare-") as work:
        spec = Path(work, "spec.json")
        spec.write_text(json.dumps({"name": name, "config": asdict(cfg), "workdir": work, "seed": seed}))
        proc = subprocess.run([sys.executable, "-m", "lorakit.compare", str(spec)], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        result = Path(work, "result.json")
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError((proc.stderr or proc.stdout).strip()[-2000:])
        return json.loads(result.read_text())


def _environment() -> dict[str, Any]:
    import platform

    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "cores": _cores(),
            "cpu": platform.processor() or platform.machine()}


# ---------------------------------------------------------------------------------------------------------------
# Seeds, noise and recommendations
# ---------------------------------------------------------------------------------------------------------------
#: results.json's schema version (docs/compare-results.md describes every key)
SCHEMA_VERSION = 2

#: numbers averaged over seeds (each also gets "<key>_sd" when there are two or more seeds)
NUMERIC_KEYS = ("trainable_params", "total_params", "trainable_pct", "accuracy", "eval_loss", "perplexity",
                "seconds_per_step", "wall_seconds", "tokens_per_second", "peak_rss_bytes", "artifact_bytes",
                "model_weight_bytes", "trainable_bytes", "optimizer_state_bytes", "activation_bytes_per_token",
                "train_memory_bytes", "steps")

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom.

    >>> t_critical(1), t_critical(4)
    (12.706, 2.776)
    """
    if df < 1:
        raise ValueError(f"df={df} is invalid; allowed: an integer >= 1")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964  # above 30: the Cornish-Fisher expansion around the normal quantile (error < 1e-4)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of two contenders measured with the same seeds: the differences d = a - b, their mean,
    sample sd, standard error sd/sqrt(n), t = mean/se, and whether |mean| exceeds the 95% critical value times se
    (a paired t-test). With fewer than two pairs the noise is unknown (``beyond_noise`` None).

    Example:
        >>> r = paired_difference([0.80, 0.82, 0.81], [0.78, 0.79, 0.80])
        >>> round(r["mean"], 4), r["df"], r["beyond_noise"]  # differences 0.02, 0.03, 0.01: margin 0.025
        (0.02, 2, False)
    """
    if len(a) != len(b):
        raise ValueError("paired_difference needs the same number of values (one per seed) on both sides")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    out: dict[str, Any] = {"n": n, "mean": mean, "sd": None, "se": None, "t": None, "df": n - 1,
                           "margin": None, "beyond_noise": None, "how": "paired over seeds"}
    if n < 2:
        return out
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    margin = t_critical(n - 1) * se
    out.update(sd=sd, se=se, t=(mean / se if se > 0 else (math.inf if mean else 0.0)), margin=margin,
               beyond_noise=abs(mean) > margin)
    return out


def binomial_difference(p1: float, p2: float, n: int) -> dict[str, Any]:
    """One seed, accuracies ``p1`` and ``p2`` on the same ``n`` held-out rows: the difference, its standard error
    sqrt(p1(1-p1)/n + p2(1-p2)/n) (the sampling noise of the held-out set; it ignores seed noise, so it is a lower
    bound on the real noise) and whether the difference exceeds 1.96 of it.

    >>> r = binomial_difference(0.84, 0.78, 500)
    >>> round(r["se"], 4), r["beyond_noise"]
    (0.0247, True)
    """
    se = math.sqrt(max(p1 * (1 - p1), 0.0) / n + max(p2 * (1 - p2), 0.0) / n)
    return {"n": 1, "mean": p1 - p2, "sd": None, "se": se, "t": (p1 - p2) / se if se > 0 else None, "df": None,
            "margin": 1.96 * se, "beyond_noise": abs(p1 - p2) > 1.96 * se,
            "how": f"one seed: binomial noise of {n} held-out rows only"}


def aggregate(groups: Sequence[Sequence[dict]], spec: TaskSpec | None = None) -> list[dict]:
    """One row per contender from its per-seed rows: numbers become means (and ``<key>_sd`` with 2+ seeds), the
    loss curve the mean curve; ``runs`` keeps every seed's row, ``seeds`` their seeds."""
    import statistics

    rows = []
    for runs in groups:
        if not runs:
            continue
        first = runs[0]
        row = {k: v for k, v in first.items() if k not in NUMERIC_KEYS and k not in ("losses", "seed", "lr_tried")}
        for key in NUMERIC_KEYS:
            values = [r.get(key) for r in runs if _number(r.get(key))]
            if not values:
                row[key] = first.get(key)
                continue
            mean = sum(values) / len(values)
            row[key] = int(round(mean)) if all(isinstance(v, int) for v in values) else mean
            if len(values) > 1:
                row[f"{key}_sd"] = statistics.stdev(values)
        length = min(len(r.get("losses") or []) for r in runs)
        row["losses"] = [sum(r["losses"][i] for r in runs) / len(runs) for i in range(length)]
        row["seeds"] = [r.get("seed") for r in runs]
        row["runs"] = [dict(r) for r in runs]
        rows.append(row)
    return rows


def _runs_of(row: dict) -> list[dict]:
    return row.get("runs") or [{**row, "seed": row.get("seed", 0)}]


def compare_rows(a: dict, b: dict, spec: TaskSpec, eval_size: int, key: str | None = None) -> dict[str, Any] | None:
    """``a`` against ``b`` on ``key`` (default: the task's quality figure), paired over their common seeds; with
    one seed, accuracy falls back to the binomial noise of the held-out rows, anything else has unknown noise."""
    key = key or spec.metric
    by_seed_a = {r.get("seed"): r.get(key) for r in _runs_of(a) if _number(r.get(key))}
    by_seed_b = {r.get("seed"): r.get(key) for r in _runs_of(b) if _number(r.get(key))}
    common = sorted(set(by_seed_a) & set(by_seed_b), key=str)
    if not common:
        return None
    if len(common) >= 2:
        return paired_difference([by_seed_a[s] for s in common], [by_seed_b[s] for s in common])
    if key == "accuracy":
        return binomial_difference(by_seed_a[common[0]], by_seed_b[common[0]], eval_size)
    result = paired_difference([by_seed_a[common[0]]], [by_seed_b[common[0]]])
    result["how"] = "one seed: the noise is unknown (run with --seeds 2 or more)"
    return result


def reference_comparisons(rows: Sequence[dict], spec: TaskSpec, eval_size: int) -> dict[str, dict]:
    """Every contender against LoRA (the reference) on the task's quality figure: name -> :func:`compare_rows`."""
    ref = next((r for r in rows if r["name"] == REFERENCE), None)
    if ref is None:
        return {}
    out = {}
    for r in rows:
        if r["name"] == REFERENCE:
            continue
        result = compare_rows(r, ref, spec, eval_size)
        if result is not None:
            out[r["name"]] = result
    return out


def _quality_text(spec: TaskSpec, value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "–"
    fmt = ".3f" if spec.higher_is_better else ".4f"
    return f"{value:{fmt}}" + (f" ± {sd:{fmt}}" if sd is not None else "")


def _diff_text(spec: TaskSpec, diff: float) -> str:
    if spec.metric == "accuracy":
        return f"{100 * abs(diff):.1f} points"
    return f"{abs(diff):.4f}"


def _noise_text(spec: TaskSpec, result: dict | None, fmt: Callable[[float], str] | None = None) -> str:
    if result is None or result.get("beyond_noise") is None:
        how = (result or {}).get("how", "no common seeds")
        return f"of unknown significance ({how})"
    margin = fmt(result["margin"]) if fmt is not None else _diff_text(spec, result["margin"])
    verdict = "more than the noise" if result["beyond_noise"] else "within the noise"
    return f"{verdict} (±{margin} at 95%, {result['how']})"


def recommend(rows: Sequence[dict], spec: TaskSpec, eval_size: int, memory_cap: int | None = None,
              cap_text: str | None = None) -> list[dict[str, Any]]:
    """The "Which method should I use?" answers computed from ``rows``: best quality, lowest training memory,
    fastest, fewest trainable parameters and (with ``memory_cap`` bytes) the best whose training memory fits.

    Each answer: ``question``, ``name`` (None if nothing qualifies), ``figure``, ``runner_up``, ``lead``,
    ``beyond_noise`` (True/False; None if unknown) and one sentence, ``text``.

    Example:
        >>> rows = [{"name": "lora", "accuracy": 0.8, "trainable_params": 10},
        ...         {"name": "vera", "accuracy": 0.7, "trainable_params": 1}]
        >>> [r["name"] for r in recommend(rows, TASKS["classification"], 500)]
        ['lora', 'vera']
    """
    answers: list[dict[str, Any]] = []

    def pick(question: str, key: str, higher: bool, candidates: Sequence[dict], fmt: Callable[[float], str],
             noise: Callable[[dict, dict], dict | None], exact: str | None = None) -> dict[str, Any] | None:
        have = [r for r in candidates if _number(r.get(key))]
        if not have:
            return None
        ordered = sorted(have, key=lambda r: -r[key] if higher else r[key])
        best, second = ordered[0], (ordered[1] if len(ordered) > 1 else None)
        ans = {"question": question, "name": best["name"], "key": key, "figure": best[key],
               "runner_up": second["name"] if second else None,
               "lead": abs(best[key] - second[key]) if second else None, "beyond_noise": None}
        text = f"{best['name']} ({fmt(best[key])})"
        if second is None:
            ans["text"] = text + "; the only contender measured."
            return ans
        if exact is not None:
            ans["beyond_noise"] = best[key] != second[key]
            ans["text"] = (f"{text}; next: {second['name']} ({fmt(second[key])}); {exact}" if best[key] != second[key]
                           else f"{text}; tied with {second['name']}; {exact}")
            return ans
        result = noise(best, second)
        ans["beyond_noise"] = None if result is None else result.get("beyond_noise")
        ans["noise"] = result
        margin_fmt = None if key == spec.metric else fmt
        ans["text"] = (f"{text}; next: {second['name']} ({fmt(second[key])}); the lead is "
                       f"{_noise_text(spec, result, margin_fmt)}.")
        return ans

    def quality_fmt(v: float) -> str:
        return _quality_text(spec, v)

    def quality_noise(a: dict, b: dict) -> dict | None:
        return compare_rows(a, b, spec, eval_size)

    def speed_noise(a: dict, b: dict) -> dict | None:
        result = compare_rows(a, b, spec, eval_size, key="tokens_per_second")
        if result is not None and result.get("beyond_noise") is None:
            result["how"] = "one seed: timing noise not measured (±20% is typical on a shared machine)"
        return result

    for ans in (
        pick(f"Best quality ({spec.metric_label})", spec.metric, spec.higher_is_better, rows, quality_fmt,
             quality_noise),
        pick("Lowest training memory (weights + gradients + optimiser state + activations of one batch)",
             "train_memory_bytes", False, rows, _fmt_bytes, quality_noise,
             exact="bytes are counted, not sampled, so there is no noise."),
        pick("Fastest (training tokens per second)", "tokens_per_second", True, rows, lambda v: f"{v:,.0f} tokens/s",
             speed_noise),
        pick("Fewest trainable parameters", "trainable_params", False, rows, lambda v: f"{v:,.0f}", quality_noise,
             exact="parameter counts are exact."),
    ):
        if ans is not None:
            answers.append(ans)
    if memory_cap is not None:
        label = cap_text or _fmt_bytes(memory_cap)
        measured = [r for r in rows if _number(r.get("train_memory_bytes"))]
        fits = [r for r in measured if r["train_memory_bytes"] <= memory_cap]
        question = f"Best quality within a training memory of {label}"
        ans = pick(question, spec.metric, spec.higher_is_better, fits, quality_fmt, quality_noise) if fits else None
        if ans is None:
            smallest = min(measured, key=lambda r: r["train_memory_bytes"], default=None)
            need = (f"; the smallest, {smallest['name']}, needs {_fmt_bytes(smallest['train_memory_bytes'])}"
                    if smallest else "")
            ans = {"question": question, "name": None, "key": spec.metric, "figure": None, "runner_up": None,
                   "lead": None, "beyond_noise": None,
                   "text": f"no contender trains within {label} of training memory{need}."}
        answers.append(ans)
    return answers


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
QUALITY_MARGIN = 0.03  # every family member should be within 3 accuracy points of LoRA, or the report says why


def _fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _with_sd(r: dict, key: str, spec: str) -> str:
    text = _fmt(r.get(key), spec)
    sd = r.get(f"{key}_sd")
    return f"{text} ± {format(sd, spec)}" if sd is not None and text != "–" else text


def _task_of(results_or_cfg: dict) -> TaskSpec:
    cfg = results_or_cfg.get("config", results_or_cfg)
    return TASKS.get(cfg.get("task") or "classification", TASKS["classification"])


def table_markdown(rows: Sequence[dict], task: str = "classification") -> str:
    """The results table in Markdown (mean ± sd over seeds where there are several)."""
    lm = TASKS[task].trainer_task == "lm"
    quality = "held-out loss (answer tokens) | perplexity" if lm else "held-out accuracy | eval loss"
    head = (f"| method | trainable params | % of model | {quality} | time / step | "
            "peak memory (RSS) | adapter file |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        q = (f"{_with_sd(r, 'eval_loss', '.4f')} | {_with_sd(r, 'perplexity', '.2f')}" if lm else
             f"{_with_sd(r, 'accuracy', '.3f')} | {_with_sd(r, 'eval_loss', '.4f')}")
        lines.append(f"| {r['name']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f}% | {q} | "
                     f"{_fmt(r['seconds_per_step'], '.3f')} s | {_fmt_bytes(r['peak_rss_bytes'])} | "
                     f"{_fmt_bytes(r['artifact_bytes'])} |")
    return "\n".join(lines)


COST_COLUMNS = (("model weights (frozen)", "model_weight_bytes", _fmt_bytes),
                ("trainable", "trainable_bytes", _fmt_bytes),
                ("optimiser state", "optimizer_state_bytes", _fmt_bytes),
                ("activations / token", "activation_bytes_per_token", _fmt_bytes),
                ("training memory", "train_memory_bytes", _fmt_bytes),
                ("tokens / s", "tokens_per_second", lambda v: _fmt(v, ",.0f")),
                ("peak RSS", "peak_rss_bytes", _fmt_bytes))


def costs_markdown(rows: Sequence[dict]) -> str:
    """What each method costs, isolated from the runtime: the cost columns in Markdown."""
    lines = ["| method | " + " | ".join(c[0] for c in COST_COLUMNS) + " |",
             "|---|" + "---:|" * len(COST_COLUMNS)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(fn(r.get(key)) for _, key, fn in COST_COLUMNS) + " |")
    return "\n".join(lines)


def comparisons_markdown(comparisons: dict[str, dict], spec: TaskSpec) -> str:
    """One table row per contender: its difference from LoRA, the noise margin and the verdict."""
    lines = [f"| method | {spec.metric_label} minus LoRA's | noise (95%) | differs from LoRA? | how |",
             "|---|---:|---:|---|---|"]
    for name, c in comparisons.items():
        diff = c["mean"]
        shown = f"{100 * diff:+.1f} points" if spec.metric == "accuracy" else f"{diff:+.4f}"
        margin = ("–" if c.get("margin") is None else
                  (f"±{100 * c['margin']:.1f} points" if spec.metric == "accuracy" else f"±{c['margin']:.4f}"))
        verdict = {True: "**yes**", False: "no (within the noise)", None: "unknown"}[c.get("beyond_noise")]
        lines.append(f"| {name} | {shown} | {margin} | {verdict} | {c.get('how', '')} |")
    return "\n".join(lines)


def quality_notes(rows: Sequence[dict]) -> list[str]:
    """One line per contender that trails LoRA by more than the margin, with the likely reason."""
    lora = next((r for r in rows if r["name"] == REFERENCE), None)
    if lora is None or lora.get("accuracy") is None:
        return []
    notes = []
    for r in rows:
        if r["name"] == REFERENCE or r.get("accuracy") is None or r.get("kind", "adapter") != "adapter":
            continue  # baselines (full fine-tuning, head-only) are references, not family members
        gap = lora["accuracy"] - r["accuracy"]
        if gap > QUALITY_MARGIN:
            try:
                contender = contender_for(r["name"])
            except ValueError:
                contender = None
            why = (contender and contender.trails_because) or "no known reason: treat as a regression and investigate."
            notes.append(f"**{r['name']}** is {100 * gap:.1f} points below LoRA ({r['accuracy']:.3f} vs "
                         f"{lora['accuracy']:.3f}): {why}")
    return notes


def _family(row: dict) -> str:
    if row.get("family"):
        return row["family"]
    adapter = (row.get("settings") or {}).get("adapter") or {}
    return adapter.get("method") or row.get("kind", "adapter")


def place_labels(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], fontsize: float = 7,
                 max_rounds: int = 500) -> list:
    """Annotate points (xs, ys) with ``labels`` so that no two label boxes overlap: each label starts just
    above-right of its point, then overlapping pairs are pushed apart vertically (in pixels, with the figure's
    current layout: call it after ``tight_layout``) until none overlap; a thin line leads back to the point.
    Returns the annotations.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from matplotlib.text import Text
        >>> fig, ax = plt.subplots()
        >>> _ = ax.scatter([1, 1], [1, 1])
        >>> a, b = place_labels(ax, [1, 1], [1, 1], ["one", "two"])
        >>> fig.canvas.draw(); r = fig.canvas.get_renderer()
        >>> bool(Text.get_window_extent(a, r).overlaps(Text.get_window_extent(b, r)))
        False
    """
    from matplotlib.text import Text

    fig = ax.figure
    texts = [ax.annotate(label, (x, y), xytext=(4.0, 3.0), textcoords="offset points", fontsize=fontsize,
                         ha="left", va="bottom",
                         arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#888888", "shrinkA": 0, "shrinkB": 2})
             for x, y, label in zip(xs, ys, labels)]
    if len(texts) < 2:
        return texts
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pixels_per_point = fig.dpi / 72.0
    anchors = ax.transData.transform(list(zip(xs, ys)))
    sizes = [(b.width, b.height) for b in (Text.get_window_extent(t, renderer) for t in texts)]
    dx, gap = 4.0 * pixels_per_point, 1.0
    y0 = [a[1] + 3.0 * pixels_per_point for a in anchors]  # each box's bottom edge, in pixels
    x0 = [a[0] + dx for a in anchors]
    for _ in range(max_rounds):
        moved = False
        order = sorted(range(len(texts)), key=lambda i: y0[i])
        for n_i, i in enumerate(order):
            for j in order[n_i + 1:]:
                if y0[j] >= y0[i] + sizes[i][1] + gap:
                    break  # sorted by bottom edge: nothing further up can overlap box i
                if x0[i] + sizes[i][0] + gap <= x0[j] or x0[j] + sizes[j][0] + gap <= x0[i]:
                    continue
                push = (y0[i] + sizes[i][1] + gap - y0[j]) / 2 + 0.01
                y0[i] -= push
                y0[j] += push
                moved = True
        if not moved:
            break
    for t, a, bottom in zip(texts, anchors, y0):
        t.xyann = (dx / pixels_per_point, (bottom - a[1]) / pixels_per_point)
    return texts


def _plots(rows: Sequence[dict], out: Path, spec: TaskSpec | None = None, sweep: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = spec or TASKS["classification"]
    names = []
    ref = next((r for r in rows if r["name"] == REFERENCE), None)

    def smooth(losses: list[float]) -> list[float]:
        k = max(1, len(losses) // 15)  # moving average so curves are readable
        return [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                for i in range(len(losses))]

    # loss curves: one small panel per family, LoRA drawn in every panel as the reference
    families = list(dict.fromkeys(_family(r) for r in rows))
    ncols = min(4, len(families))
    nrows = math.ceil(len(families) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.7 * nrows + 0.6), dpi=100, sharey=True,
                             squeeze=False)
    for ax, family in zip(axes.flat, families):
        if ref is not None and ref["losses"]:
            ax.plot(range(1, len(ref["losses"]) + 1), smooth(ref["losses"]), color="#222222", linewidth=2.2,
                    alpha=0.35, label=f"{REFERENCE} (reference)")
        for r in rows:
            if _family(r) == family and r is not ref and r["losses"]:
                ax.plot(range(1, len(r["losses"]) + 1), smooth(r["losses"]), linewidth=1.3, label=r["name"])
        ax.set_title(family, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.supxlabel("optimiser step", fontsize=9)
    fig.supylabel("training loss (moving average)", fontsize=9)
    fig.suptitle(f"Training loss by family (grey: {REFERENCE}, the reference)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    plt.close(fig)
    names.append("loss_curves.png")

    # quality against trainable parameters, LoRA highlighted, labels that do not overlap
    key = spec.metric
    scatter = "accuracy_vs_params.png" if key == "accuracy" else "loss_vs_params.png"
    have = [r for r in rows if _number(r.get(key))]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    colours = {f: plt.cm.tab20(i % 20) for i, f in enumerate(families)}
    for r in have:
        x = max(r["trainable_params"], 1)
        is_ref = r is ref
        ax.errorbar(x, r[key], yerr=r.get(f"{key}_sd"), fmt="*" if is_ref else "o", ms=13 if is_ref else 6,
                    color="#d62728" if is_ref else colours[_family(r)], ecolor="#999999", elinewidth=0.8,
                    zorder=3 if is_ref else 2)
    if ref is not None and _number(ref.get(key)):
        ax.axhline(ref[key], color="#d62728", linewidth=0.8, linestyle="--", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(spec.metric_label + ("" if spec.higher_is_better else " (lower is better)"))
    ax.set_title(f"{spec.metric_label} vs trainable parameters (red star and dashed line: {REFERENCE})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if have:  # after the layout is final: the labels are placed in pixels
        place_labels(ax, [max(r["trainable_params"], 1) for r in have], [r[key] for r in have],
                     [r["name"] for r in have])
    fig.savefig(out / scatter)
    plt.close(fig)
    names.append(scatter)

    if sweep:
        field_name, _ = parse_sweep(sweep)
        bases = list(dict.fromkeys(r.get("base", r["name"]) for r in have
                                   if sweep_value(r, field_name) is not None))
        if bases:
            fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
            numeric = all(_number(sweep_value(r, field_name)) for r in have if r.get("base", r["name"]) in bases)
            for base in bases:
                points = sorted(((sweep_value(r, field_name), r) for r in have if r.get("base", r["name"]) == base
                                 and sweep_value(r, field_name) is not None),
                                key=lambda p: p[0] if numeric else str(p[0]))
                xs = [p[0] if numeric else str(p[0]) for p in points]
                ax.errorbar(xs, [p[1][key] for p in points], yerr=[p[1].get(f"{key}_sd") or 0 for p in points],
                            marker="o", capsize=3, linewidth=2.2 if base == REFERENCE else 1.3, label=base)
            if numeric and min(sweep_value(r, field_name) for r in have if sweep_value(r, field_name) is not None) > 0:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(field_name)
            ax.set_ylabel(spec.metric_label)
            ax.set_title(f"{spec.metric_label} vs {field_name}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            sweep_name = f"sweep_{field_name}.png"
            fig.savefig(out / sweep_name)
            plt.close(fig)
            names.append(sweep_name)
    return names


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write results.json, report.md, the PNG plots and report.html into ``out`` (each file atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    cfg = results["config"]
    spec = _task_of(results)
    eval_size = cfg.get("eval_size", 1)
    if "comparisons" not in results:
        results["comparisons"] = reference_comparisons(rows, spec, eval_size)
    if "recommendations" not in results:
        cap = cfg.get("memory_cap")
        results["recommendations"] = recommend(rows, spec, eval_size, parse_bytes(cap) if cap else None, cap)
    results.setdefault("schema_version", SCHEMA_VERSION)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    notes = quality_notes(rows)
    skipped = results.get("skipped", {})
    env = results.get("environment", {})
    seeds = cfg.get("seeds", 1) or 1
    budget = (f"a budget of {cfg['budget_seconds']:g} s of training each (steps set by a calibration run)"
              if cfg.get("budget_seconds") else f"{cfg['steps']} optimiser steps of batch {cfg['batch_size']} for "
                                                f"every contender")
    seed_text = f"seed {cfg['seed']}" if seeds == 1 else f"{seeds} seeds ({cfg['seed']}..{cfg['seed'] + seeds - 1})"
    tuned = ", learning rates tuned per contender" if cfg.get("tune_lr") else ""
    intro = (f"Task {cfg.get('task', 'classification')}: model `{cfg['model']}`, data `{cfg['data']}` "
             f"({cfg['eval_size']} held-out rows), {budget}, max length {cfg['max_length']}, {seed_text}{tuned}. "
             f"Run {results.get('date', '')} on {_machine(cfg, env)}, torch {env.get('torch', '?')}, "
             f"{results['total_seconds']:.0f} s in total.")
    recs = results["recommendations"]
    md = ["# lorakit compare", "", intro, "", "## Which method should I use?", "",
          "Computed from this run (not written by hand):", ""]
    md += [f"- **{r['question']}**: {r['text']}" for r in recs] + [""]
    md += ["## Results", "", table_markdown(rows, cfg.get("task", "classification")), ""]
    md += [_footnote(rows, cfg, spec), ""]
    if results["comparisons"]:
        md += ["## Differences from LoRA", "", _comparison_intro(seeds, spec), "",
               comparisons_markdown(results["comparisons"], spec), ""]
    if any(_number(r.get("train_memory_bytes")) for r in rows):
        md += ["## What each method costs", "", COSTS_NOTE, "", costs_markdown(rows), ""]
    if notes:
        md += ["## Methods more than 3 points below LoRA", ""] + [f"- {n}" for n in notes] + [""]
    answers = [r for r in rows if r.get("answers")]
    if answers:
        md += ["## Answers to held-out prompts (greedy)", ""]
        for k, first in enumerate(answers[0]["answers"]):
            md += [f"**Prompt {k + 1}:** {_one_line(first['prompt'])}  ", f"*Reference:* {_one_line(first['reference'])}",
                   "", "| method | answer |", "|---|---|"]
            md += [f"| {r['name']} | {_one_line(r['answers'][k]['answer']) if k < len(r['answers']) else ''} |"
                   for r in answers] + [""]
    if skipped:
        md += ["## Not run", ""] + [f"- {k}: {v.splitlines()[-1] if v else v}" for k, v in skipped.items()] + [""]
    plots = _plots(rows, out, spec, cfg.get("sweep")) if rows else []
    md += [f"![{p}]({p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "report.html", _html(results, rows, notes, skipped, intro, out, plots, spec))


COSTS_NOTE = ("Measured in each contender's run, so that they isolate the method from the runtime: the frozen "
              "model's weight bytes (a 4-bit base shows here), the trainable weights (their gradients take as "
              "much again), the optimiser's state after its first step, the bytes autograd saves for backward "
              "per token (one training batch, the model's own weights left out), training memory = weights + "
              "2 x trainable + optimiser state + activations of one batch (the figure `--memory-cap` compares), "
              "training tokens per second (median of the logged steps), and the worker's peak resident set "
              "(which includes the Python runtime, data and tokenizer).")


def _comparison_intro(seeds: int, spec: TaskSpec | None = None) -> str:
    if seeds <= 1 and spec is not None and spec.metric != "accuracy":
        return ("One seed: the seed-to-seed noise of the held-out loss is unknown, so no difference is called real; "
                "run with `--seeds 3` or more for a paired comparison.")
    if seeds > 1:
        return (f"A paired comparison over the {seeds} seeds: for each seed, the contender's figure minus LoRA's "
                f"(same seed, same held-out rows); a difference counts only if its mean exceeds the 95% margin of a "
                f"paired t-test (t quantile x sd / sqrt(seeds)).")
    return ("One seed: for accuracy, the margin is the binomial noise of the held-out rows (1.96 x the standard "
            "error of the difference); it ignores the seed-to-seed noise, so run with `--seeds 3` or more before "
            "trusting a small difference.")


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _footnote(rows: Sequence[dict], cfg: dict, spec: TaskSpec) -> str:
    seeds = cfg.get("seeds", 1) or 1
    parts = []
    if spec.metric == "accuracy":
        se = 100 * _accuracy_se(rows, cfg["eval_size"])
        if seeds > 1:
            parts.append(f"Held-out accuracy is the mean ± sd over {seeds} seeds on the same held-out rows (the "
                         f"held-out sample alone adds about ±{se:.1f} points of standard error).")
        else:
            parts.append(f"Held-out accuracy is from one seed on the held-out rows: its standard error is about "
                         f"±{se:.1f} points, so gaps of a point or two are noise.")
    else:
        parts.append(f"Held-out loss is the mean cross-entropy per answer token (assistant/response tokens only) on "
                     f"the held-out rows; perplexity = exp(loss){'; mean ± sd over ' + str(seeds) + ' seeds' if seeds > 1 else ''}.")
    parts.append("Time per step is the median over the run (contenders that trained side by side share the "
                 "machine's memory bandwidth); peak memory is the worker process's peak resident set (model, data "
                 "and tokenizer included); the adapter file is what `lorakit.save` writes (for full and head-only: "
                 "every trainable tensor in safetensors). Learning rates are per method (`lorakit compare --list` "
                 "shows them), chosen by a small sweep on the classification task"
                 + (f" (this task uses them x{spec.lr_scale:g})" if spec.lr_scale != 1.0 else "")
                 + ("; `--tune-lr` tried each at x1/3, x1 and x3 first." if cfg.get("tune_lr") else "."))
    return " ".join(parts)


def _accuracy_se(rows: Sequence[dict], n: int) -> float:
    """Binomial standard error of an accuracy near LoRA's on ``n`` held-out rows."""
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    p = next((r["accuracy"] for r in rows if r["name"] == REFERENCE and r.get("accuracy") is not None),
             sum(accs) / len(accs) if accs else 0.5)
    return math.sqrt(max(p * (1 - p), 1e-12) / max(1, n))


def _machine(cfg: dict, env: dict) -> str:
    jobs, threads = cfg.get("jobs", 1), cfg.get("threads", "?")
    side = f"{jobs} contenders side by side, " if jobs and jobs > 1 else ""
    return f"{env.get('cores', '?')} CPU cores ({side}{threads} torch thread(s) each)"


def _md_to_html(text: str) -> str:
    """The little Markdown the report's sentences use (**bold**, `code`), escaped."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _html(results, rows, notes, skipped, intro, out: Path, plots: list[str], spec: TaskSpec | None = None) -> str:
    spec = spec or TASKS["classification"]
    lm = spec.trainer_task == "lm"
    key = spec.metric
    values = [r[key] for r in rows if _number(r.get(key))]
    best = (max(values) if spec.higher_is_better else min(values)) if values else None
    body = []
    for r in rows:
        cls = ' class="best"' if best is not None and r.get(key) == best else ""
        ref = ' <span class="ref">reference</span>' if r["name"] == REFERENCE else ""
        quality = (f"<td>{_with_sd(r, 'eval_loss', '.4f')}</td><td>{_with_sd(r, 'perplexity', '.2f')}</td>" if lm else
                   f"<td>{_with_sd(r, 'accuracy', '.3f')}</td><td>{_with_sd(r, 'eval_loss', '.4f')}</td>")
        body.append(
            f"<tr{cls}><td>{html.escape(r['name'])}{ref}</td><td>{r['trainable_params']:,}</td>"
            f"<td>{r['trainable_pct']:.3f}%</td>{quality}<td>{_fmt(r['seconds_per_step'], '.3f')} s</td>"
            f"<td>{_fmt_bytes(r['peak_rss_bytes'])}</td><td>{_fmt_bytes(r['artifact_bytes'])}</td></tr>")
    quality_head = ("<th>held-out loss (answer tokens)</th><th>perplexity</th>" if lm else
                    "<th>held-out accuracy</th><th>eval loss</th>")
    images = "".join(
        f'<figure><img alt="{p}" src="data:image/png;base64,'
        f'{base64.b64encode((out / p).read_bytes()).decode()}"></figure>' for p in plots)
    note_html = "".join(f"<li>{_md_to_html(n)}</li>" for n in notes)
    skip_html = "".join(f"<li>{html.escape(k)}: {html.escape(v.splitlines()[-1] if v else v)}</li>"
                        for k, v in skipped.items())
    recs = "".join(
        f"<li><strong>{html.escape(r['question'])}</strong>: {html.escape(r['text'])}"
        f"{'' if r.get('beyond_noise') is None else (' <span class=yes>lead beyond the noise</span>' if r['beyond_noise'] else ' <span class=no>lead within the noise</span>')}</li>"
        for r in results.get("recommendations", []))
    comparisons = results.get("comparisons") or {}
    comp_rows = []
    for name, c in comparisons.items():
        diff = f"{100 * c['mean']:+.1f} pt" if key == "accuracy" else f"{c['mean']:+.4f}"
        margin = "–" if c.get("margin") is None else (f"±{100 * c['margin']:.1f} pt" if key == "accuracy"
                                                       else f"±{c['margin']:.4f}")
        verdict = {True: "yes", False: "no (within the noise)", None: "unknown"}[c.get("beyond_noise")]
        comp_rows.append(f"<tr><td>{html.escape(name)}</td><td>{diff}</td><td>{margin}</td><td>{verdict}</td>"
                         f"<td class=left>{html.escape(c.get('how', ''))}</td></tr>")
    comp_html = (f"<h2>Differences from LoRA</h2><p>{_md_to_html(_comparison_intro(results['config'].get('seeds', 1) or 1, spec))}</p>"
                 f"<table><thead><tr><th>method</th><th>{html.escape(spec.metric_label)} minus LoRA's</th>"
                 f"<th>noise (95%)</th><th>differs?</th><th>how</th></tr></thead><tbody>{''.join(comp_rows)}"
                 f"</tbody></table>") if comp_rows else ""
    cost_html = ""
    if any(_number(r.get("train_memory_bytes")) for r in rows):
        head = "".join(f"<th>{html.escape(c[0])}</th>" for c in COST_COLUMNS)
        cells = "".join(f"<tr><td>{html.escape(r['name'])}</td>"
                        + "".join(f"<td>{html.escape(fn(r.get(k)))}</td>" for _, k, fn in COST_COLUMNS) + "</tr>"
                        for r in rows)
        cost_html = (f"<h2>What each method costs</h2><p class=muted>{_md_to_html(COSTS_NOTE)}</p><table><thead><tr>"
                     f"<th>method</th>{head}</tr></thead><tbody>{cells}</tbody></table>")
    answers_html = ""
    with_answers = [r for r in rows if r.get("answers")]
    if with_answers:
        prompts = with_answers[0]["answers"]
        head = "".join(f"<th class=left>{html.escape(p['prompt'])}</th>" for p in prompts)
        ref_row = "<tr class=refrow><td>reference</td>" + "".join(
            f"<td class=left>{html.escape(p['reference'])}</td>" for p in prompts) + "</tr>"
        cells = "".join(f"<tr><td>{html.escape(r['name'])}</td>" + "".join(
            f"<td class=left>{html.escape(a['answer'])}</td>" for a in r["answers"]) + "</tr>" for r in with_answers)
        answers_html = (f"<h2>Answers to held-out prompts (greedy, side by side)</h2><div class=scroll><table "
                        f"class=answers><thead><tr><th>method</th>{head}</tr></thead><tbody>{ref_row}{cells}"
                        f"</tbody></table></div>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lorakit compare</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; width: 100%; font-size: 14px; margin-bottom: 1em; }}
th, td {{ padding: 6px 10px; border-bottom: 1px solid #ddd; text-align: right; vertical-align: top; }}
th:first-child, td:first-child, .left {{ text-align: left; }}
th {{ background: #f4f4f6; }}
tr.best td {{ background: #eaf7ea; font-weight: 600; }}
tr.refrow td {{ color: #555; font-style: italic; }}
.ref {{ font-size: 11px; color: #b22; border: 1px solid #b22; border-radius: 3px; padding: 0 3px; }}
.yes {{ color: #17692a; font-size: 12px; }} .no {{ color: #8a6d00; font-size: 12px; }}
.scroll {{ overflow-x: auto; }} table.answers td {{ min-width: 14em; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
.muted {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>lorakit compare</h1>
<p>{_md_to_html(intro)}</p>
<h2>Which method should I use?</h2>
<p class="muted">Computed from this run, not written by hand.</p>
<ul>{recs}</ul>
<h2>Results</h2>
<table><thead><tr><th>method</th><th>trainable params</th><th>% of model</th>{quality_head}
<th>time / step</th><th>peak memory (RSS)</th><th>adapter file</th></tr></thead>
<tbody>{''.join(body)}</tbody></table>
<p class="muted">Best {html.escape(spec.metric_label)} highlighted. {_md_to_html(_footnote(rows, results["config"], spec))}</p>
{comp_html}
{cost_html}
{f'<h2>Methods more than 3 points below LoRA</h2><ul>{note_html}</ul>' if notes else ''}
{answers_html}
{f'<h2>Not run</h2><ul>{skip_html}</ul>' if skipped else ''}
{images}
</body></html>
"""


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = CompareConfig(**spec["config"])
    row = run_contender(spec["name"], cfg, spec["workdir"], spec.get("seed"))
    Path(spec["workdir"], "result.json").write_text(json.dumps(row))


if __name__ == "__main__":  # worker entry point used by compare()
    _worker(sys.argv[1])
