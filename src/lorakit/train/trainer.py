"""lorakit's trainer: one loop for every family member, resumable bit-for-bit, single- or multi-process.

Example:
    >>> import torch, lorakit
    >>> from lorakit.train.trainer import Trainer, TrainConfig
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = lorakit.attach(net, lorakit.AdapterConfig(r=2))
    >>> data = [{"x": torch.randn(4), "y": torch.randn(4)} for _ in range(16)]
    >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"])
    >>> result = Trainer(net, TrainConfig(steps=3, batch_size=4, progress=False), data, loss_fn=loss).train()
    >>> len(result.losses)
    3
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import resource
import signal
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import coerce_field
from ..io import atomic_folder, atomic_write_text, full_tensor, restore, save as save_adapters
from ..io.files import refuse_non_finite
from ..optim import OPTIMIZERS, canonical_optimizer_name, make_optimizer
from ..registry import adapted_layers, registry_or_none
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .hooks import regularization_loss, training_hooks

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything the trainer needs besides model and data. All fields are JSON values."""

    steps: int = 100  # optimiser steps
    batch_size: int = 8  # global batch per micro-step (split across processes)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw, adamw8bit, paged_adamw, paged_adamw8bit
    loraplus_ratio: float | None = None  # LoRA+: B matrices get lr·ratio
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # bf16 autocast
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (and on Ctrl-C, SIGTERM or an exception)
    keep_last: int = 2
    output_dir: str | None = None
    resume: str | None = None  # a checkpoint folder or a run folder (its newest checkpoint)
    progress: bool = True
    tensorboard: bool = False
    distributed: str = "ddp"  # under torchrun: ddp or fsdp
    group_by_length: bool = False  # batches of similar lengths (less padding); still seeded and resumable

    def __post_init__(self) -> None:
        # Every field is checked against its declared type (fields added later are covered too), then its range;
        # numbers written as strings (YAML 1.1 reads 2e-4 as a string) become numbers, nothing else is guessed.
        def optimizer_known(name: str) -> bool:
            return canonical_optimizer_name(name) in OPTIMIZERS

        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "steps": (lambda v: v >= 1, "an integer >= 1"),
            "batch_size": (lambda v: v >= 1, "an integer >= 1"),
            "grad_accum": (lambda v: v >= 1, "an integer >= 1"),
            "lr": (lambda v: v > 0, "a positive number"),
            "weight_decay": (lambda v: v >= 0, "a number >= 0"),
            "optimizer": (optimizer_known, ", ".join(OPTIMIZERS)),
            "loraplus_ratio": (lambda v: v is None or v > 0, "None (plain learning rates) or a positive number"),
            "schedule": (lambda v: v in SCHEDULES, ", ".join(SCHEDULES)),
            "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
            # a negative norm makes clip_grad_norm_ flip the gradients (gradient ascent); 0 would silently not clip
            "max_grad_norm": (lambda v: v is None or v > 0, "None (no clipping) or a positive number"),
            "seed": (lambda v: abs(v) < 2**53, "an integer with |seed| < 2**53"),
            "eval_every": (lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
            "log_every": (lambda v: v >= 0, "an integer >= 0"),
            "save_every": (lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
            "keep_last": (lambda v: v >= 1, "an integer >= 1"),
            "output_dir": (lambda v: v is None or v.strip() != "", "None or a folder path"),
            "resume": (lambda v: v is None or v.strip() != "", "None or a run or checkpoint folder"),
            "distributed": (lambda v: v in ("ddp", "fsdp", "none"), "ddp, fsdp, none"),
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in checks:  # the type is all there is to check
                setattr(self, f.name, coerce_field("TrainConfig", f.name, value, f.type))
                continue
            ok, allowed = checks[f.name]
            try:
                coerced = coerce_field("TrainConfig", f.name, value, f.type)
            except ValueError:
                coerced, ok = None, None  # the wrong type: the message says what is allowed, range included
            if ok is None or not ok(coerced):
                raise ValueError(f"TrainConfig.{f.name}={value!r} is invalid; allowed: {allowed}")
            setattr(self, f.name, coerced)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimiser step (mean over micro-batches)
    evals: list[dict[str, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    interrupted: bool = False
    output_dir: str | None = None
    stop_signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped an interrupted run; None otherwise

    @property
    def seconds_per_step(self) -> float:
        times = self.step_times[2:] or self.step_times
        return statistics.median(times) if times else float("nan")

    @property
    def final_eval(self) -> dict[str, float]:
        return self.evals[-1] if self.evals else {}


def default_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """transformers-style models compute their own loss from ``labels``."""
    return model(**batch).loss


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base lr at each step: linear warm-up then linear/cosine decay to 0, or constant."""
    total, warm = config.steps, config.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class NonFiniteLossError(ValueError):
    """Training met a NaN/inf loss or gradient norm and stopped before the optimiser step that would have used it."""


class Trainer:
    """Train the trainable parameters of ``model`` (adapters, modules_to_save) on ``train_data``.

    ``train_data``/``eval_data`` are sequences of examples; ``collate_fn`` turns a list of examples into a batch
    (default: stack tensors by key). ``loss_fn(model, batch)`` defaults to transformers' ``model(**batch).loss``.
    ``task`` picks the eval metric: "classification" (accuracy), "lm" (perplexity) or "none".

    What a run promises (with ``output_dir`` set):

    - **Ctrl-C and SIGTERM** (schedulers; torchrun on the surviving ranks) finish the current step, write
      ``ckpt-<step>``, return with ``result.interrupted`` and print how to resume. A second signal stops at once.
      Handlers are installed in the main thread only and the previous ones are restored when ``train`` returns.
    - **An exception** (out of memory, a failing ``loss_fn``, ...) writes a checkpoint of the last *completed*
      step, then re-raises. It does so only when that state is provably intact: the exception came before
      ``optimizer.step()`` of the next step began (forward, loss, backward, clipping: parameters, optimiser,
      scheduler and hook state are untouched, the checkpoint records the RNG as snapshotted at the step boundary,
      and no buffer of a trained module, e.g. a BatchNorm in ``modules_to_save``, changed: the tensors' version
      counters say so), or after a step completed (logging, evaluation, which never moves the training RNG,
      saving). An exception
      inside the update (``optimizer.step()``, ``scheduler.step()``, the methods' ``after_step`` hooks, ``finish``)
      may leave parameters half-updated: then no checkpoint is written and the newest one stays the newest. Under
      torch.distributed only rank 0 writes it, without collectives (the other ranks may be stuck or gone), so a
      sharded (FSDP) model writes none: gathering its shards needs every rank.
    - **NaN policy**: the first non-finite loss or gradient norm raises :class:`NonFiniteLossError` (a
      ValueError, so ``lorakit train`` prints one line and exits non-zero) naming the step and the fixes. No
      optimiser step is taken with it and no final adapter is written; the last completed step is checkpointed
      as for any exception.
    - **Resume** (``config.resume``) uses the newest intact checkpoint: corrupt newer ones are skipped with a
      warning naming them (and never deleted: when their step is written again they are renamed
      ``ckpt-<step>.corrupt``). Log rows after the resumed step are dropped from ``log.jsonl``/``log.csv`` (each file
      rewritten atomically), so the logs equal those of an uninterrupted run. A checkpoint written with another
      optimiser or LoRA+ ratio is refused before anything changes. The last step's checkpoint holds the state
      before the end-of-training consolidation (``finish``: AdaLoRA's pruning, SoRA's plain LoRA), so a run killed
      during its final save resumes into the same consolidation, final eval (logged once) and ``adapter/``.
    - Training with merged adapters is refused up front (call :func:`lorakit.unmerge` first).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: Sequence[Any],
                 eval_data: Sequence[Any] | None = None, collate_fn: Callable | None = None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] = default_loss, task: str = "none",
                 adapter_names: Sequence[str] | None = None):
        if len(train_data) == 0:
            raise ValueError("train_data is empty")
        self.model = model
        self.config = config
        self.train_data = train_data
        self.eval_data = eval_data
        self.collate_fn = collate_fn or stack_collate
        self.loss_fn = loss_fn
        self.task = task
        self.adapter_names = adapter_names
        self.info = dist_utils.setup()
        self.device = _model_device(model)
        self.result = TrainResult(output_dir=config.output_dir)
        self._stop_requested = False
        self._stop_signal = "Ctrl-C"
        self._resumable: ckpt.Resumable | None = None  # read and checked once, by resumable()
        self._bad_checkpoints: set[str] = set()  # corrupt checkpoints skipped on resume (renamed if re-written)
        self._length_cache: list[int] | None = None
        self._log_files: dict[str, Any] = {}

    # -- data order: a seeded permutation per epoch, so a resumed run sees the same batches ----------------------
    def _batch_indices(self, start_step: int):
        cfg, n = self.config, len(self.train_data)
        per_epoch = max(1, n // cfg.batch_size)
        micro = start_step * cfg.grad_accum
        epoch, pos = divmod(micro, per_epoch)
        while True:
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            order = torch.randperm(n, generator=gen).tolist()
            if cfg.group_by_length:
                order = self._grouped(order, gen)
            while pos < per_epoch:
                idx = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
                yield idx[self.info.rank::self.info.world_size]
                pos += 1
            epoch, pos = epoch + 1, 0

    def _grouped(self, order: list[int], gen: torch.Generator) -> list[int]:
        """Sort windows of 50 batches by example length, then shuffle the batches (as transformers does)."""
        bs = self.config.batch_size
        lengths = self._lengths()
        window = bs * 50
        batches = []
        for i in range(0, len(order), window):
            chunk = sorted(order[i:i + window], key=lambda k: -lengths[k])
            batches.extend(chunk[j:j + bs] for j in range(0, len(chunk), bs))
        full = [b for b in batches if len(b) == bs]  # a short batch only at the very end, as before
        perm = torch.randperm(len(full), generator=gen).tolist()
        return [k for i in perm for k in full[i]] + [k for b in batches if len(b) != bs for k in b]

    def _lengths(self) -> list[int]:
        if self._length_cache is None:
            self._length_cache = [_example_length(ex) for ex in self.train_data]
        return self._length_cache

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    # -- optimiser ---------------------------------------------------------------------------------------------
    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; attach an adapter (or load with trainable=True)")
        return make_optimizer(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              loraplus_ratio=cfg.loraplus_ratio)

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, info = self.config, self.info
        user_model = self.model
        _refuse_merged(user_model)  # before anything changes
        found = self.resumable()  # reads and checks only: the model is untouched
        torch.manual_seed(cfg.seed)  # dropout masks repeat run to run (the batch order has its own generator)
        if cfg.gradient_checkpointing and hasattr(user_model, "gradient_checkpointing_enable"):
            user_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        user_model.train()
        hooks = training_hooks(user_model)  # the methods' work around each step (AdaLoRA, SoRA, Delta-LoRA)
        state = self._restore_adapters(user_model, found) if found is not None else None  # before sharding
        model = dist_utils.wrap(user_model, cfg.distributed, info)
        optimizer = self._make_optimizer(user_model)  # after wrapping: FSDP2 replaces parameters by DTensors
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        start = 0
        if state is not None:
            start = self._resume(state, user_model, optimizer, scheduler, hooks)
        out = Path(cfg.output_dir) if cfg.output_dir else None
        if out is not None and info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.resume:
                ckpt.remove_stale_temporaries(out)  # a killed run's half-written checkpoint
                # rows of steps after the checkpoint would be logged twice (and the final eval, when the
                # checkpoint is the last step's: it runs again)
                _trim_logs(out, start, final_eval=start >= cfg.steps)
            atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        batches = self._batch_indices(start)
        bar = self._progress(start)
        previous_handlers = self._install_stop_handlers()
        watched = _watched_buffers(user_model)
        step = start
        # phase: where an exception can come from. "step" (before the update) and "boundary"/"final" (after a
        # completed step) leave the state of the last completed step intact; "update"/"finish" do not.
        phase = "boundary"
        boundary_rng, boundary_buffers = ckpt.rng_state(), [b._version for b in watched]
        try:
            while step < cfg.steps:
                if dist_utils.any_rank(self._stop_requested, info):  # every rank stops at the same step
                    self._interrupt(step, user_model, optimizer, scheduler, hooks)
                    break
                phase = "step"
                t0 = time.perf_counter()
                loss_sum, tokens = 0.0, 0
                for _ in range(cfg.grad_accum):
                    batch = self._to_device(self.collate_fn([self.train_data[i] for i in next(batches)]))
                    tokens += _count_tokens(batch)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        loss = self.loss_fn(model, batch)
                        reg = _regularization(user_model)  # per micro-batch, scaled like the task loss
                        total = (loss + reg) if reg is not None else loss
                    (total / cfg.grad_accum).backward()  # the mean over micro-batches, as one big batch gives
                    loss_sum += loss.detach().float().item() / cfg.grad_accum
                grad_norm = _grad_norm([p for p in user_model.parameters() if p.requires_grad], cfg.max_grad_norm)
                if dist_utils.any_rank(not (math.isfinite(loss_sum) and math.isfinite(grad_norm)), info):
                    raise NonFiniteLossError(self._non_finite_message(step + 1, loss_sum, grad_norm))
                phase = "update"
                optimizer.step()
                scheduler.step()
                hooks.after_step()  # gradients are still there (AdaLoRA reads them)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                phase = "boundary"
                boundary_rng, boundary_buffers = ckpt.rng_state(), [b._version for b in watched]
                loss_value = dist_utils.all_reduce_mean(loss_sum, info)  # every rank logs the same number
                elapsed = time.perf_counter() - t0
                self.result.losses.append(loss_value)
                self.result.step_times.append(elapsed)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens * info.world_size / elapsed:.0f}")
                if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                    self._log({"kind": "train", "step": step, "loss": loss_value,
                               "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens * info.world_size / elapsed,
                               "seconds_per_step": elapsed})
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    self._evaluate(model, step)
                if out is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    self._save(step, user_model, optimizer, scheduler, hooks)
            else:  # every step ran (a stop request breaks out): checkpoint, consolidate, evaluate, save the adapter
                # The last step's checkpoint is written before the consolidation (AdaLoRA's pruning, SoRA's plain
                # LoRA), like every other one: a resume from it (after a kill during the final save) repeats the
                # consolidation and the final eval exactly; a consolidated state would not fit a fresh adapter.
                if out is not None and step != start:
                    self._save(step, user_model, optimizer, scheduler, hooks)
                phase = "finish"
                hooks.finish()
                phase = "final"
                boundary_rng = ckpt.rng_state()
                self._evaluate(model, step)
                if out is not None:
                    self._save_adapter(user_model)
        except Exception as err:
            if out is not None:
                buffers_changed = [b._version for b in watched] != boundary_buffers
                self._checkpoint_on_error(err, phase, step, start, buffers_changed, boundary_rng, user_model,
                                          optimizer, scheduler, hooks)
            raise
        finally:
            self._restore_handlers(previous_handlers)
            if bar is not None:
                bar.close()
            for fh in self._log_files.values():
                fh.close()
            self._log_files.clear()
        self.result.peak_memory_bytes = peak_memory_bytes(self.device)
        return self.result

    def _non_finite_message(self, step: int, loss: float, grad_norm: float) -> str:
        cfg = self.config
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        return (f"step {step}: the {what} is not finite (loss {loss}, gradient norm {grad_norm}); training stopped "
                f"before the optimizer step, so no update used it and no adapter was written from it. Fixes: lower "
                f"train.lr (now {cfg.lr}); keep train.max_grad_norm set (now {cfg.max_grad_norm}); with bf16/fp16 "
                f"overflow try train.bf16=false or a float32 base model; check this step's data")

    def _non_finite_state_message(self, step: int, name: str | None) -> str:
        return (f"step {step}: the trained parameters hold non-finite values (NaN or inf) after the update "
                f"({name or 'on another rank'}), although the loss and gradient norm were finite; no checkpoint or "
                f"adapter was written from this state. Fixes: lower train.lr (now {self.config.lr}); resume from an "
                f"earlier checkpoint; check the optimizer state of the checkpoint this run resumed from")

    def _checkpoint_on_error(self, err: BaseException, phase: str, step: int, start: int, buffers_changed: bool,
                             rng: dict[str, Any], model: nn.Module, optimizer, scheduler, hooks) -> None:
        """After an exception: checkpoint the last completed step if that state is provably intact (see class doc)."""
        if not self.info.is_main:
            return
        out = Path(self.config.output_dir)
        newest = ckpt.list_checkpoints(out)
        keep = (f"the newest checkpoint is {newest[-1]}" if newest else "there is no checkpoint")
        what = f"training failed at step {step + 1 if phase in ('step', 'update') else step} ({type(err).__name__})"
        if phase in ("update", "finish"):
            why = "inside the optimizer update; the parameters may be half-updated"
        elif phase == "step" and buffers_changed:
            why = "after a trained module's buffers (e.g. BatchNorm statistics) changed in this step"
        elif self.info.enabled and dist_utils.is_sharded(model):
            why = "under FSDP (gathering the shards needs every rank)"
        elif step == start or (out / f"ckpt-{step}").is_dir() and f"ckpt-{step}" not in self._bad_checkpoints:
            print(f"{what}; {keep}", file=sys.stderr)  # nothing newer to save
            return
        elif _non_finite_parameter(model) is not None:  # a finite loss can still be followed by a NaN update
            why = f"and the state after step {step} already holds NaN/inf parameters"
        else:
            try:
                folder = self._save(step, model, optimizer, scheduler, hooks, rng=rng, collective=False)
            except Exception as save_err:  # never hide the original error
                print(f"{what}; writing a checkpoint of step {step} failed too ({type(save_err).__name__}: "
                      f"{save_err}); {keep}", file=sys.stderr)
                return
            print(f"{what}; saved checkpoint {folder} (the state after step {step}, the last completed one). "
                  f"Resume with the same command plus --resume {self.config.output_dir}", file=sys.stderr)
            return
        print(f"{what} {why}, so no checkpoint was written; {keep}", file=sys.stderr)

    # -- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Eval loss plus accuracy (classification) or perplexity (lm) on ``eval_data``."""
        model = model or self.model
        if not self.eval_data:
            return {}
        was_training = model.training
        model.eval()
        total_loss, total_weight, correct, count = 0.0, 0, 0, 0
        bs = max(self.config.batch_size, 16)
        for i in range(0, len(self.eval_data), bs):
            batch = self._to_device(self.collate_fn(list(self.eval_data[i:i + bs])))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                out = model(**batch) if isinstance(batch, dict) and self.loss_fn is default_loss else None
                loss = out.loss if out is not None else self.loss_fn(model, batch)
            if self.task == "classification" and out is not None:
                labels = batch["labels"]
                correct += (out.logits.argmax(-1) == labels).sum().item()
                count += labels.numel()
                weight = labels.numel()
            elif self.task == "lm" and isinstance(batch, dict) and "labels" in batch:
                weight = int((batch["labels"][..., 1:] != -100).sum().item())
            else:
                weight = 1
            total_loss += float(loss) * weight
            total_weight += weight
        model.train(was_training)
        metrics = {"eval_loss": total_loss / max(total_weight, 1)}
        if self.task == "classification" and count:
            metrics["accuracy"] = correct / count
        if self.task == "lm":
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        return metrics

    def _evaluate(self, model: nn.Module, step: int) -> None:
        # evaluation never moves the training RNG, so a checkpoint's RNG is the same whether or not eval ran since
        rng = ckpt.rng_state()
        try:
            metrics = self.evaluate(model)
        finally:
            ckpt.set_rng_state(rng)
        if metrics:
            metrics = {"step": step, **metrics}
            self.result.evals.append(metrics)
            self._log({"kind": "eval", **metrics})

    # -- logging -----------------------------------------------------------------------------------------------
    CSV_FIELDS = ("kind", "step", "loss", "lr", "tokens_per_s", "seconds_per_step", "eval_loss", "accuracy",
                  "perplexity")

    def _log(self, record: dict[str, Any]) -> None:
        if not self.info.is_main or not self.config.output_dir:
            return
        out = Path(self.config.output_dir)
        if not self._log_files:
            resume = bool(self.config.resume)
            self._log_files["jsonl"] = open(out / "log.jsonl", "a" if resume else "w")
            csv_path = out / "log.csv"
            new_csv = not (resume and csv_path.exists())
            self._log_files["csv"] = open(csv_path, "w" if new_csv else "a", newline="")
            self._csv = csv.DictWriter(self._log_files["csv"], fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            if new_csv:
                self._csv.writeheader()
            if self.config.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(out / "tensorboard"))
                except ImportError:
                    print("tensorboard is not installed; pip install tensorboard (logging to JSONL/CSV only)",
                          file=sys.stderr)
                    self._tb = None
        self._log_files["jsonl"].write(json.dumps(record) + "\n")
        self._log_files["jsonl"].flush()
        self._csv.writerow(record)
        self._log_files["csv"].flush()
        tb = getattr(self, "_tb", None)
        if tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def _progress(self, start: int):
        if not self.config.progress or not self.info.is_main:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _save(self, step: int, model: nn.Module, optimizer, scheduler, hooks,
              rng: dict[str, Any] | None = None, collective: bool = True) -> Path | None:
        """Write ``ckpt-<step>``. ``collective=False``: rank 0 alone, no gathers or barriers (after an exception; the
        model must not be sharded). ``rng``: the RNG state to record."""
        save = _adapter_writer(model)
        out = Path(self.config.output_dir)
        folder = out / f"ckpt-{step}"
        bad = _non_finite_parameter(model)
        if dist_utils.any_rank(bad is not None, self.info) if collective else bad is not None:
            raise NonFiniteLossError(self._non_finite_state_message(step, bad))
        # Under FSDP every rank takes part in gathering the shards (same order everywhere); only rank 0 writes.
        sharded = collective and dist_utils.is_sharded(model)
        if not collective and not self.info.is_main:
            return None
        optimizer_state = optimizer.state_dict()
        # the methods' training state: under FSDP gathering it is a collective too (AdaLoRA's sharded averages)
        hooks_state = hooks.state_dict() if (self.info.is_main or sharded) else None
        if sharded:
            optimizer_state = dist_utils.gather_full(optimizer_state)
        if self.info.is_main:
            parts = {
                "trainer": {"step": step, "losses": self.result.losses, "evals": self.result.evals,
                            "config": dataclasses.asdict(self.config),
                            "optimizer": _optimizer_key(self.config.optimizer),
                            "loraplus_ratio": self.config.loraplus_ratio},
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng if rng is not None else ckpt.rng_state(),
                "hooks": hooks_state,
            }
            if folder.name in self._bad_checkpoints and folder.is_dir():  # keep the corrupt one, under a new name
                moved = ckpt.set_aside(folder)
                self._bad_checkpoints.discard(folder.name)
                print(f"moved the corrupt checkpoint {folder} to {moved} to write a new one", file=sys.stderr)
            ckpt.write_checkpoint(folder, parts, lambda p: save(model, p))
            ckpt.prune_checkpoints(out, self.config.keep_last, spare=sorted(self._bad_checkpoints))
        elif sharded:
            save(model, folder / "adapter", write_files=False)
        if collective:
            dist_utils.barrier(self.info)
        return folder

    def _save_adapter(self, model: nn.Module) -> None:
        """Write the finished run's ``adapter/`` (under FSDP every rank gathers, rank 0 writes)."""
        _adapter_writer(model)(model, Path(self.config.output_dir) / "adapter", write_files=self.info.is_main)
        dist_utils.barrier(self.info)

    def resumable(self) -> ckpt.Resumable | None:
        """The checkpoint :meth:`train` resumes from (None without ``config.resume``), read and checked against this
        run's settings once; a caller can ask first, to refuse a resume before it writes anything of its own.

        Example:
            >>> import torch, lorakit
            >>> Trainer(torch.nn.Linear(2, 2), TrainConfig(steps=1), [{"x": torch.ones(2)}]).resumable() is None
            True
        """
        if self.config.resume and self._resumable is None:
            self._resumable = self._find_checkpoint()
        return self._resumable

    def _find_checkpoint(self) -> ckpt.Resumable:
        """The checkpoint to resume from (newest intact one), checked against this run's optimiser settings."""
        found = ckpt.find_resumable(Path(self.config.resume))
        for bad, reason in found.skipped:
            self._bad_checkpoints.add(bad.name)
            if self.info.is_main:
                warnings.warn(f"{reason}; skipping it (left in place) and resuming from {found.folder}",
                              UserWarning, stacklevel=3)
        trainer = found.state["trainer"]
        saved_cfg = trainer.get("config") or {}
        had = _optimizer_key(trainer.get("optimizer", saved_cfg.get("optimizer", "adamw")))
        want = _optimizer_key(self.config.optimizer)
        if had != want:
            raise ValueError(f"checkpoint {found.folder} was written with optimizer {had}, this run uses {want}; "
                             f"resume with the same --set train.optimizer={had} (or start a new run without "
                             f"--resume)")
        had_ratio = trainer.get("loraplus_ratio", saved_cfg.get("loraplus_ratio"))
        if float(had_ratio or 1.0) != float(self.config.loraplus_ratio or 1.0):
            raise ValueError(f"checkpoint {found.folder} was written with loraplus_ratio={had_ratio}, this run uses "
                             f"{self.config.loraplus_ratio}; resume with the same --set train.loraplus_ratio="
                             f"{had_ratio} (or start a new run without --resume)")
        return found

    def _restore_adapters(self, model: nn.Module, found: ckpt.Resumable) -> tuple[Path, dict[str, Any]]:
        folder, state = found.folder, found.state
        if (folder / "adapter" / TRAINABLE_FILE).exists():
            from safetensors.torch import load_file

            saved = load_file(str(folder / "adapter" / TRAINABLE_FILE))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in saved:
                        p.copy_(saved[n])
        else:
            restore(model, folder / "adapter")
        return folder, state

    def _resume(self, restored: tuple[Path, dict[str, Any]], model: nn.Module, optimizer, scheduler, hooks) -> int:
        _, state = restored
        optimizer.load_state_dict(state["optimizer"])
        if dist_utils.is_sharded(model):
            dist_utils.reshard_optimizer_state(optimizer)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        if state.get("hooks"):
            hooks.load_state_dict(state["hooks"])
        trainer = state["trainer"]
        self.result.losses = list(trainer["losses"])
        self.result.evals = list(trainer["evals"])
        return int(trainer["step"])

    # -- Ctrl-C / SIGTERM: finish the current step, checkpoint, say how to resume ----------------------------------
    def _install_stop_handlers(self) -> dict[int, Any]:
        """Handle SIGINT and SIGTERM during training (main thread only); returns the previous handlers."""
        def handler(signum, frame):
            if self._stop_requested:  # a second signal: stop now
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self._stop_requested = True
            self.result.stop_signal = int(signum)
            self._stop_signal = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{self._stop_signal}: finishing this step and saving a checkpoint (send it again to stop "
                  "at once)", file=sys.stderr)

        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):  # e.g. an embedded interpreter that owns its signals
                pass
        return previous

    @staticmethod
    def _restore_handlers(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            if old is not None:  # None: installed outside Python, cannot be re-installed from here
                signal.signal(sig, old)

    def _interrupt(self, step: int, model, optimizer, scheduler, hooks) -> None:
        self.result.interrupted = True
        if self.config.output_dir:
            folder = self._save(step, model, optimizer, scheduler, hooks)
            if self.info.is_main:
                print(f"{self._stop_signal}: saved checkpoint {folder} at step {step}. Resume with the same command "
                      f"plus --resume {self.config.output_dir}", file=sys.stderr)


TRAINABLE_FILE = "trainable.safetensors"


def _adapter_writer(model: nn.Module):
    """``lorakit.save`` for a model with adapters; a model without (full fine-tuning, head-only baselines) saves
    its trainable tensors instead."""
    return save_adapters if registry_or_none(model) is not None else _save_trainable


def _save_trainable(model: nn.Module, path: Path, write_files: bool = True) -> Path:
    """Every trainable tensor of a model without adapters, in one safetensors file (atomic folder)."""
    from safetensors.torch import save_file

    tensors = {n: full_tensor(p).detach().cpu().contiguous().clone() for n, p in model.named_parameters()
               if p.requires_grad}
    refuse_non_finite(tensors, f"save({str(path)!r})")
    if write_files:
        atomic_folder(Path(path), lambda folder: save_file(tensors, str(folder / TRAINABLE_FILE)))
    return Path(path)


def _optimizer_key(name: Any) -> str:
    """The canonical optimiser name (aliases such as ``adamw_8bit`` resolved), as recorded in checkpoints."""
    return canonical_optimizer_name(name)


def _refuse_merged(model: nn.Module) -> None:
    """Training through merged adapters would update factors whose delta is already inside the base weights."""
    if registry_or_none(model) is None:
        return
    merged = sorted({n for _, layer in adapted_layers(model) for n in layer.merged})
    if merged:
        names = ", ".join(repr(n) for n in merged)
        raise ValueError(f"adapter {names} is merged into the base weights; call lorakit.unmerge(model) before "
                         "training")


def _non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first trainable parameter (this rank's part) holding NaN/inf, or None."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point():
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard
            if not bool(torch.isfinite(local.detach()).all()):
                return name
    return None


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The total gradient norm (clipping to ``max_norm`` if set); NaN/inf if any gradient is not finite."""
    if max_norm:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # FSDP2: a DTensor
        total = total.full_tensor()
    return float(total)


def _watched_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Buffers of modules that own a trainable parameter (saved with them, e.g. a trained head's BatchNorm)."""
    return [b for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
            for b in m.buffers(recurse=False)]


def _trim_logs(out: Path, step: int, final_eval: bool = False) -> None:
    """Drop log rows of steps after ``step`` (and a half-written last line), and with ``final_eval`` the eval rows
    of ``step`` itself (the final eval, which runs again); each file is rewritten atomically."""
    def kept_row(kind: str | None, row_step: float) -> bool:
        return row_step < step or row_step == step and not (final_eval and kind == "eval")

    jsonl, csv_path = out / "log.jsonl", out / "log.csv"
    if jsonl.exists():
        text = jsonl.read_text()
        lines = text.split("\n")[:-1]  # the part after the last newline is empty or half-written
        kept = [line for line in lines if kept_row(_row_kind(line), _row_step(line))]
        if len(kept) != len(lines) or text.split("\n")[-1]:
            atomic_write_text(jsonl, "".join(line + "\n" for line in kept))
    if csv_path.exists():
        text = csv_path.read_text()
        lines = text.split("\n")[:-1]
        if lines:
            header = next(csv.reader([lines[0]]))
            col = header.index("step") if "step" in header else None
            kind_col = header.index("kind") if "kind" in header else None
            kept = lines[:1] + [line for line in lines[1:]
                                if col is None or kept_row(_csv_field(line, kind_col), _csv_step(line, col))]
            if len(kept) != len(lines) or text.split("\n")[-1]:
                atomic_write_text(csv_path, "".join(line + "\n" for line in kept))


def _row_step(line: str) -> float:
    """The step of a JSONL log row; rows that are not ours (no integer step) are kept (step -inf)."""
    try:
        value = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return -math.inf
    return value if isinstance(value, int) else -math.inf


def _row_kind(line: str) -> str | None:
    """The ``kind`` of a JSONL log row ("train", "eval"), or None."""
    try:
        kind = json.loads(line).get("kind")
    except (ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _csv_field(line: str, col: int | None) -> str | None:
    if col is None:
        return None
    try:
        return next(csv.reader([line]))[col]
    except (IndexError, StopIteration):
        return None


def _csv_step(line: str, col: int) -> float:
    try:
        return int(next(csv.reader([line]))[col])
    except (ValueError, IndexError, StopIteration):
        return -math.inf


def _example_length(example: Any) -> int:
    """Length used by group_by_length: tokens if the example holds input_ids, else characters of its text."""
    if isinstance(example, dict):
        if "input_ids" in example:
            return len(example["input_ids"])
        if isinstance(example.get("text"), str):
            return len(example["text"])
    return 0


def stack_collate(examples: list[Any]) -> Any:
    """Default collate: stack tensors key by key (dict examples) or element-wise (tuples)."""
    first = examples[0]
    if isinstance(first, dict):
        return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(torch.stack([torch.as_tensor(e[i]) for e in examples]) for i in range(len(first)))
    return torch.stack([torch.as_tensor(e) for e in examples])


def _count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum().item())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _regularization(model: nn.Module) -> torch.Tensor | None:
    """The methods' extra loss term, or None when none contributes (the backward pass then skips it)."""
    reg = regularization_loss(model)
    return reg if isinstance(reg, torch.Tensor) and reg.requires_grad else None
