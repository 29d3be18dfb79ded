"""lorakit's training hooks inside the transformers ``Trainer``.

* :class:`LorakitCallback` calls ``hooks.after_step()`` in ``on_optimizer_step`` — in transformers' loop that event
  fires right after ``optimizer.step()`` and before ``model.zero_grad()``, so gradients are still there — and
  ``hooks.finish()`` in ``on_train_end``.
* :class:`LorakitTrainer` is a ``transformers.Trainer`` that adds the callback itself and adds
  :func:`lorakit.regularization_loss` to the training loss (AdaLoRA's orthogonal regulariser).

Usage::

    trainer = LorakitTrainer(model=model, args=args, train_dataset=ds)          # everything wired
    # or, with a plain / custom Trainer (no regulariser unless its compute_loss adds it):
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[LorakitCallback()])

Resuming a transformers run (``resume_from_checkpoint``) continues the step count from ``state.global_step``;
methods' running statistics (AdaLoRA's importance averages) restart from zero then. lorakit's own Trainer
checkpoints them exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .hooks import TrainingHooks, regularization_loss, training_hooks

__all__ = ["LorakitCallback", "LorakitTrainer"]


class LorakitCallback(TrainerCallback):
    """Drive lorakit's training hooks from a ``transformers.Trainer``.

    Example:
        >>> import transformers
        >>> cb = LorakitCallback()
        >>> isinstance(cb, transformers.TrainerCallback)
        True
    """

    def __init__(self) -> None:
        self.hooks: TrainingHooks | None = None

    def _hooks(self, model: torch.nn.Module | None, state: Any) -> TrainingHooks:
        if self.hooks is None or (model is not None and self.hooks.model is not model):
            if model is None:
                raise ValueError("LorakitCallback needs the model; the Trainer passes it to every callback event")
            self.hooks = training_hooks(model)
            self.hooks.step = int(state.global_step)
        return self.hooks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hooks = None  # a new run (or a resumed one): start from the trainer's step count
        self._hooks(model, state)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        hooks = self._hooks(model, state)
        hooks.step = int(state.global_step)  # global_step is incremented after this event: after_step makes it +1
        hooks.after_step()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._hooks(model, state).finish()


class LorakitTrainer(Trainer):
    """A ``transformers.Trainer`` with lorakit's hooks: adds :class:`LorakitCallback` (unless one was given) and
    :func:`lorakit.regularization_loss` to the loss.

    The regulariser is scaled like the task loss under gradient accumulation, so each optimiser step adds it once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, LorakitCallback) or c is LorakitCallback for c in callbacks):
            callbacks.append(LorakitCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if model.training:
            reg = regularization_loss(self.accelerator.unwrap_model(model))
            if reg.requires_grad:
                # training_step divides the loss by the accumulation steps unless it is already scaled for them;
                # the regulariser is a per-step term, so divide it here in that case to add it once per step
                scaled = getattr(self, "loss_is_scaled_for_ga", None)
                if scaled is None:
                    scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                        or getattr(self, "compute_loss_func", None) is not None
                if scaled:
                    reg = reg / max(1, int(getattr(self, "current_gradient_accumulation_steps", 1)))
                loss = loss + reg.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss
