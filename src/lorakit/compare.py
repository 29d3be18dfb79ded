"""Compare family members side by side on one model, one dataset and one step budget, and write a report.

Each contender (a method with its recommended settings, plus full fine-tuning and a frozen-model head-only baseline)
trains in its own subprocess so that its peak memory is its own. The report folder gets ``results.json``,
``report.md`` (the table), ``loss_curves.png``, ``accuracy_vs_params.png`` and a self-contained ``report.html``.

The contenders table, :data:`CONTENDERS`, is the one place that lists them. A contender names its settings and,
when it needs more than "attach, then train", its own steps: ``prepare`` (e.g. quantise the base for QLoRA) and
``procedure`` (e.g. LoRA-drop's two stages). :func:`register_contender` adds one from outside the package.

Example (the README's first command runs this on the embedded default, all-MiniLM-L6-v2 on movie reviews):
    >>> from lorakit.compare import CONTENDERS
    >>> "lora" in CONTENDERS and "full" in CONTENDERS
    True
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import AdapterConfig
from .io import atomic_write_text, save
from .model import attach
from .train.trainer import TrainConfig, Trainer, TrainResult

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


# ---------------------------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ContenderRun:
    """What a contender's steps work on: the loaded classifier, its head's name and everything training needs."""

    model: "nn.Module"
    head: str
    train_config: TrainConfig
    train_rows: list[dict]
    eval_rows: list[dict]
    collate: Callable[[list[dict]], dict]
    trainable_params: int | None = None

    def count_trainable(self) -> int:
        """Record the parameters that train *now*. Procedures call it when training starts, because some methods
        shrink while training (AdaLoRA prunes its ranks at the end) and the report shows what trained."""
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return self.trainable_params

    def trainer(self) -> Trainer:
        """lorakit's Trainer on this run's data, evaluating accuracy on the held-out rows."""
        return Trainer(self.model, self.train_config, self.train_rows, self.eval_rows, collate_fn=self.collate,
                       task="classification")


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
    for n, p in run.model.named_parameters():
        p.requires_grad_(n.startswith(run.head + "."))


def _train_every_weight(run: ContenderRun) -> None:
    for p in run.model.parameters():
        p.requires_grad_(True)


def _quantise_base(run: ContenderRun) -> None:
    import torch

    from .quant import quantize  # optional piece: availability() reports a build without it

    quantize(run.model, compute_dtype=torch.float32, skip=(run.head,))


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


@dataclass
class CompareConfig:
    """One comparison: model, data, budget and which contenders."""

    model: str = "minilm"  # a local transformers folder, or "minilm" (the embedded default)
    data: str = "movie_reviews"  # a JSONL/CSV/JSON classification file (text, label), or "movie_reviews"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_ORDER))
    steps: int = 50
    batch_size: int = 32
    max_length: int = 40
    eval_size: int = 500
    train_size: int | None = None  # None: all remaining rows
    warmup_steps: int = 10
    seed: int = 0
    jobs: int = 0  # contenders trained side by side; 0 = auto (2 on a 2-core machine, up to 4 on bigger ones)
    threads: int = 0  # torch threads per worker; 0 = auto (the cores divided among the workers)
    out: str = "report"
    # each contender in its own process, so that its peak memory is its own; False: one after another in this
    # process (contenders registered at run time, e.g. by a test, exist only here)
    isolate: bool = True

    def __post_init__(self) -> None:
        cores = _cores()
        if self.jobs < 0 or self.threads < 0:
            raise ValueError("jobs and threads must be >= 0 (0 = choose automatically)")
        if self.jobs == 0:
            # small models on few cores: two single-threaded workers do ~1.45x the work of one two-threaded one
            self.jobs = cores if cores <= 2 else min(4, cores // 2)
        self.jobs = max(1, min(self.jobs, len(self.methods))) if self.isolate else 1
        if self.threads == 0:
            self.threads = max(1, cores // self.jobs)
        unknown = [m for m in self.methods if m not in CONTENDERS]
        if unknown:
            raise ValueError(f"unknown contender(s) {unknown}; choose from: {', '.join(CONTENDERS)}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_size < 1:
            raise ValueError("steps, batch_size and eval_size must be >= 1")


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
        from .assets import movie_reviews

        rows = [dict(r) if isinstance(r, dict) else {"text": r[0], "label": r[1]} for r in movie_reviews()]
    else:
        from .train.data import DataError, label_names, load_records

        records = load_records(data)
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


def resolve_model(model: str) -> str:
    if model == "minilm":
        from .assets import minilm_path

        return str(minilm_path())
    if not Path(model, "config.json").exists():
        raise FileNotFoundError(f"model folder {model!r} has no config.json; pass a local transformers folder "
                                f"or 'minilm'")
    return model


def describe_contender(name: str, steps: int = 50) -> str:
    """One line: what the contender trains and with which settings.

    >>> describe_contender("lora")
    'method=lora r=8 alpha=16 | lr=0.002'
    """
    contender = CONTENDERS[name]
    adapter = contender.adapter_fields(steps)
    parts = [" ".join(f"{k}={v}" for k, v in adapter.items()) if adapter else contender.kind]
    if contender.prepare is not None:
        parts.append(contender.prepare.label)
    parts.append(" ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in contender.train.items()))
    return " | ".join(p for p in parts if p)


def availability(name: str) -> str | None:
    """None if the contender can run here, else why not."""
    contender = CONTENDERS[name]
    try:
        adapter = contender.adapter_fields(100)
        if adapter is not None:
            from .methods import get_method  # the registry's lazy table loads the method's module

            get_method(adapter["method"])
        for module in contender.needs:
            __import__(module)
    except (ImportError, AttributeError) as exc:
        return f"not available in this build ({exc})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# One contender (runs in its own process)
# ---------------------------------------------------------------------------------------------------------------
def run_contender(name: str, cfg: CompareConfig, workdir: str) -> dict[str, Any]:
    """Train one contender and measure it. Returns the row of the results table (plus curves)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # every contender starts from the same head init and data order
    _quiet_transformers()
    contender = CONTENDERS[name]
    adapter = contender.adapter_fields(cfg.steps)
    path = resolve_model(cfg.model)
    train_rows, eval_rows = load_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)
    n_labels = len({r["label"] for r in train_rows + eval_rows})
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels)
    head = _head_name(model)
    total_params = sum(p.numel() for p in model.parameters())

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=cfg.max_length,
                        return_tensors="pt")
        return {**enc, "labels": torch.tensor([r["label"] for r in rows])}

    eval_rows = sorted(eval_rows, key=lambda r: len(r["text"]))  # less padding; accuracy does not depend on order
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps,
                            schedule="linear", seed=cfg.seed, log_every=max(1, cfg.steps // 20),
                            group_by_length=True,
                            output_dir=os.path.join(workdir, "run"), progress=False, **contender.train)
    run = ContenderRun(model, head, train_cfg, train_rows, eval_rows, collate)
    if contender.prepare is not None:
        contender.prepare.run(run)
    # the new head trains with every adapter (and is saved with it), like a user's classifier fine-tune
    config = AdapterConfig(**adapter, modules_to_save=[head], seed=cfg.seed) if adapter is not None else None
    t0 = time.perf_counter()
    result = contender.procedure(run, config)
    wall = time.perf_counter() - t0
    trainable = run.trainable_params if run.trainable_params is not None else run.count_trainable()
    final = result.final_eval
    if contender.kind == "adapter":
        folder = save(model, os.path.join(workdir, "adapter"))
    else:  # what a user would have to ship: every trainable tensor
        from safetensors.torch import save_file

        folder = Path(workdir, "weights")
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(folder / "weights.safetensors"))
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    return {
        "name": name, "kind": contender.kind, "settings": {"adapter": adapter, "train": dict(contender.train),
                                                           "quantize": contender.quantizes_base},
        "trainable_params": trainable, "total_params": total_params,
        "trainable_pct": 100.0 * trainable / total_params,
        "accuracy": final.get("accuracy"), "eval_loss": final.get("eval_loss"),
        "seconds_per_step": result.seconds_per_step, "wall_seconds": wall,
        "peak_rss_bytes": result.peak_memory_bytes, "artifact_bytes": size,
        "losses": result.losses,
    }


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
def compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every contender in ``cfg.methods`` (each in a subprocess) and write the report to ``cfg.out``.

    Returns the results dictionary that is also written to ``results.json``.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resolve_model(cfg.model)  # fetch/convert the model once, before the workers start
    load_rows(cfg.data, cfg.seed, cfg.eval_size, cfg.train_size)  # a bad data file fails here once, not per worker
    _warm_imports()
    from concurrent.futures import ThreadPoolExecutor, as_completed

    by_name: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    total, done = len(cfg.methods), 0
    runnable = []
    for name in cfg.methods:  # what this build cannot run goes under "Not run"; the rest still runs
        why = availability(name)
        if why:
            skipped[name] = why
            done += 1
            log(f"[{done}/{total}] {name}: skipped, {why}")
        else:
            runnable.append(name)
    log(f"training {len(runnable)} contenders, {cfg.jobs} at a time with {cfg.threads} torch thread(s) each")
    started = time.perf_counter()

    def timed(name: str) -> tuple[dict, float]:
        t0 = time.perf_counter()
        return (_run_isolated if cfg.isolate else _run_here)(name, cfg), time.perf_counter() - t0

    # each worker is its own process; these threads only wait for them. Longest first, so that the last
    # contenders to finish are short ones and no core idles for long at the end (the report keeps the given order)
    schedule = sorted(runnable, key=lambda n: -CONTENDERS[n].cost) if cfg.jobs > 1 else runnable
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        futures = {pool.submit(timed, name): name for name in schedule}
        for fut in as_completed(futures):
            name = futures[fut]
            done += 1
            try:
                row, seconds = fut.result()
            except RuntimeError as exc:  # one contender's failure is a row of the report, not the end of it
                skipped[name] = f"failed: {exc}"
                log(f"[{done}/{total}] {name}: FAILED ({str(exc).splitlines()[-1] if str(exc) else exc})")
                continue
            by_name[name] = row
            log(f"[{done}/{total}] {name}: accuracy {row['accuracy']:.3f}, {row['trainable_params']:,} trainable, "
                f"{row['seconds_per_step']:.3f} s/step ({seconds:.0f} s)")
    rows = [by_name[n] for n in cfg.methods if n in by_name]
    skipped = {n: skipped[n] for n in cfg.methods if n in skipped}
    results = {"config": asdict(cfg), "rows": rows, "skipped": skipped,
               "total_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M"),
               "environment": _environment()}
    write_report(results, out)
    log(f"report written to {out}/ (report.md, report.html, loss_curves.png, accuracy_vs_params.png)")
    return results


def _run_isolated(name: str, cfg: CompareConfig) -> dict[str, Any]:
    """Run one contender in a fresh process: forked where possible (imports and data already loaded, so it
    starts in well under a second), else a new interpreter. Either way its peak memory is its own."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return _run_in_subprocess(name, cfg)
    # forkserver, not fork: a plain fork of a process that already ran torch ops can deadlock in OpenMP; the
    # fork server is a fresh interpreter that only imported the heavy modules, so its forks start fast and safe
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_preload_modules(cfg))
    with tempfile.TemporaryDirectory(prefix=f"lorakit-{name}-") as work:
        proc = ctx.Process(target=_forked_worker, args=(name, cfg, work), daemon=False)
        proc.start()
        proc.join()
        result, error = Path(work, "result.json"), Path(work, "error.txt")
        if proc.exitcode != 0 or not result.exists():
            raise RuntimeError(error.read_text()[-2000:] if error.exists() else f"worker exit code {proc.exitcode}")
        return json.loads(result.read_text())


def _run_here(name: str, cfg: CompareConfig) -> dict[str, Any]:
    """Run one contender in this process (``CompareConfig(isolate=False)``). Failures come back as RuntimeError
    with the traceback, as from a worker process, so that compare() reports them the same way."""
    import traceback

    import torch

    threads = torch.get_num_threads()  # run_contender sets the worker's count; this process keeps its own
    try:
        with tempfile.TemporaryDirectory(prefix=f"lorakit-{name}-") as work:
            return run_contender(name, cfg, work)
    except Exception:
        raise RuntimeError(traceback.format_exc()[-2000:]) from None
    finally:
        torch.set_num_threads(threads)


def _preload_modules(cfg: CompareConfig) -> list[str]:
    """What the fork server imports once so that each worker starts with it (~5 s per worker otherwise: loading
    a transformers model pulls in ~1500 modules). Names that fail to import are skipped by multiprocessing."""
    mods = ["torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
            "transformers.models.auto.tokenization_auto", "safetensors.torch", "lorakit.compare",
            "lorakit.train.trainer", "lorakit.model", "lorakit.io", "lorakit.methods.lora"]
    try:
        model_type = json.loads(Path(resolve_model(cfg.model), "config.json").read_text()).get("model_type", "")
        if model_type.replace("_", "").isalnum():
            mods.append(f"transformers.models.{model_type}.modeling_{model_type}")
    except (OSError, ValueError):
        pass
    for name in cfg.methods:
        contender = CONTENDERS[name]
        adapter = contender.adapter_fields(cfg.steps)
        if adapter:
            mods.append(f"lorakit.methods.{adapter['method']}")
        mods += contender.needs
    return list(dict.fromkeys(mods))


def _forked_worker(name: str, cfg: CompareConfig, work: str) -> None:
    import traceback

    try:
        row = run_contender(name, cfg, work)
        Path(work, "result.json").write_text(json.dumps(row))
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        Path(work, "error.txt").write_text(traceback.format_exc())
        raise SystemExit(1)


def _warm_imports() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run_in_subprocess(name: str, cfg: CompareConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"lorakit-{name}-") as work:
        spec = Path(work, "spec.json")
        spec.write_text(json.dumps({"name": name, "config": asdict(cfg), "workdir": work}))
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


def table_markdown(rows: Sequence[dict]) -> str:
    """The results table in Markdown."""
    head = ("| method | trainable params | % of model | held-out accuracy | eval loss | time / step | "
            "peak memory (RSS) | adapter file |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f}% | "
                     f"{_fmt(r['accuracy'], '.3f')} | {_fmt(r['eval_loss'], '.4f')} | "
                     f"{_fmt(r['seconds_per_step'], '.3f')} s | {_fmt_bytes(r['peak_rss_bytes'])} | "
                     f"{_fmt_bytes(r['artifact_bytes'])} |")
    return "\n".join(lines)


def quality_notes(rows: Sequence[dict]) -> list[str]:
    """One line per contender that trails LoRA by more than the margin, with the likely reason."""
    lora = next((r for r in rows if r["name"] == REFERENCE), None)
    if lora is None or lora["accuracy"] is None:
        return []
    notes = []
    for r in rows:
        if r["name"] == REFERENCE or r["accuracy"] is None or r.get("kind", "adapter") != "adapter":
            continue  # baselines (full fine-tuning, head-only) are references, not family members
        gap = lora["accuracy"] - r["accuracy"]
        if gap > QUALITY_MARGIN:
            contender = CONTENDERS.get(r["name"])
            why = (contender and contender.trails_because) or "no known reason: treat as a regression and investigate."
            notes.append(f"**{r['name']}** is {100 * gap:.1f} points below LoRA ({r['accuracy']:.3f} vs "
                         f"{lora['accuracy']:.3f}): {why}")
    return notes


def _plots(rows: Sequence[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in rows:
        losses = r["losses"]
        k = max(1, len(losses) // 15)  # moving average so curves are readable
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=r["name"], linewidth=1.4)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"training loss (moving average)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    plt.close(fig)
    names.append("loss_curves.png")

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in rows:
        if r["accuracy"] is None:
            continue
        ax.scatter(max(r["trainable_params"], 1), r["accuracy"], s=40)
        ax.annotate(r["name"], (max(r["trainable_params"], 1), r["accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_params.png")
    plt.close(fig)
    names.append("accuracy_vs_params.png")
    return names


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write results.json, report.md, the PNG plots and report.html into ``out`` (each file atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    cfg = results["config"]
    notes = quality_notes(rows)
    skipped = results.get("skipped", {})
    env = results.get("environment", {})
    intro = (f"Model `{cfg['model']}`, data `{cfg['data']}` ({cfg['eval_size']} held-out rows), "
             f"{cfg['steps']} optimiser steps of batch {cfg['batch_size']} for every contender, max length "
             f"{cfg['max_length']}, seed {cfg['seed']}. Run {results.get('date', '')} on {_machine(cfg, env)}, "
             f"torch {env.get('torch', '?')}, {results['total_seconds']:.0f} s in total.")
    md = ["# lorakit compare", "", intro, "", table_markdown(rows), ""]
    md += [_FOOTNOTE.format(se=100 * _accuracy_se(rows, cfg["eval_size"])), ""]
    if notes:
        md += ["## Methods more than 3 points below LoRA", ""] + [f"- {n}" for n in notes] + [""]
    if skipped:
        md += ["## Not run", ""] + [f"- {k}: {v.splitlines()[-1] if v else v}" for k, v in skipped.items()] + [""]
    plots = _plots(rows, out) if rows else []
    md += [f"![{p}]({p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "report.html", _html(results, rows, notes, skipped, intro, out, plots))


_FOOTNOTE = ("Held-out accuracy is from one seed on the held-out rows: its standard error is about ±{se:.1f} points, "
             "so gaps of a point or two are noise. Time per step is the median over the run (contenders that "
             "trained side by side share the machine's memory bandwidth); peak memory is the worker process's peak "
             "resident set (model, data and tokenizer included); the adapter file is what `lorakit.save` writes "
             "(for full and head-only: every trainable tensor in safetensors). Learning rates are per method "
             "(`lorakit compare --list` shows them), chosen by a small sweep on this task.")


def _accuracy_se(rows: Sequence[dict], n: int) -> float:
    """Binomial standard error of an accuracy near LoRA's on ``n`` held-out rows."""
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    p = next((r["accuracy"] for r in rows if r["name"] == REFERENCE and r["accuracy"] is not None),
             sum(accs) / len(accs) if accs else 0.5)
    return math.sqrt(max(p * (1 - p), 1e-12) / max(1, n))


def _machine(cfg: dict, env: dict) -> str:
    jobs, threads = cfg.get("jobs", 1), cfg.get("threads", "?")
    side = f"{jobs} contenders side by side, " if jobs and jobs > 1 else ""
    return f"{env.get('cores', '?')} CPU cores ({side}{threads} torch thread(s) each)"


def _html(results, rows, notes, skipped, intro, out: Path, plots: list[str]) -> str:
    best = max((r["accuracy"] for r in rows if r["accuracy"] is not None), default=None)
    body = []
    for r in rows:
        cls = ' class="best"' if best is not None and r["accuracy"] == best else ""
        body.append(
            f"<tr{cls}><td>{html.escape(r['name'])}</td><td>{r['trainable_params']:,}</td>"
            f"<td>{r['trainable_pct']:.3f}%</td><td>{_fmt(r['accuracy'], '.3f')}</td>"
            f"<td>{_fmt(r['eval_loss'], '.4f')}</td><td>{_fmt(r['seconds_per_step'], '.3f')} s</td>"
            f"<td>{_fmt_bytes(r['peak_rss_bytes'])}</td><td>{_fmt_bytes(r['artifact_bytes'])}</td></tr>")
    images = "".join(
        f'<figure><img alt="{p}" src="data:image/png;base64,'
        f'{base64.b64encode((out / p).read_bytes()).decode()}"></figure>' for p in plots)
    note_html = "".join(f"<li>{html.escape(n.replace('**', ''))}</li>" for n in notes)
    skip_html = "".join(f"<li>{html.escape(k)}: {html.escape(v.splitlines()[-1] if v else v)}</li>"
                        for k, v in skipped.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lorakit compare</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; width: 100%; font-size: 14px; }}
th, td {{ padding: 6px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f4f4f6; }}
tr.best td {{ background: #eaf7ea; font-weight: 600; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
.muted {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>lorakit compare</h1>
<p>{html.escape(intro)}</p>
<table><thead><tr><th>method</th><th>trainable params</th><th>% of model</th><th>held-out accuracy</th>
<th>eval loss</th><th>time / step</th><th>peak memory (RSS)</th><th>adapter file</th></tr></thead>
<tbody>{''.join(body)}</tbody></table>
<p class="muted">Best accuracy highlighted. {html.escape(_FOOTNOTE.format(
    se=100 * _accuracy_se(rows, results["config"]["eval_size"])).replace("`", ""))}</p>
{f'<h2>Methods more than 3 points below LoRA</h2><ul>{note_html}</ul>' if notes else ''}
{f'<h2>Not run</h2><ul>{skip_html}</ul>' if skipped else ''}
{images}
</body></html>
"""


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = CompareConfig(**spec["config"])
    row = run_contender(spec["name"], cfg, spec["workdir"])
    Path(spec["workdir"], "result.json").write_text(json.dumps(row))


if __name__ == "__main__":  # worker entry point used by compare()
    _worker(sys.argv[1])
