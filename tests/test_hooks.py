"""The training-hook protocol: which adapters the hooks drive, the regulariser, state for resume, the warn-once
check, and the transformers integration (callback timing, regulariser in the Trainer's loss)."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.methods.lora import LoraAdapter
from lorakit.model import adapted_layers
from lorakit.train import checkpoint as ckpt
from lorakit.train import hooks as hooks_mod


class Probe(LoraAdapter):
    """A LoRA that records every hook call (installed by swapping the class of attached adapters)."""

    needs_hooks = True
    calls: list = []

    def after_step(self, layer, step):
        Probe.calls.append(("after_step", self.path, step, self.A.grad is not None))

    def finish(self, layer):
        Probe.calls.append(("finish", self.path))

    def regularization(self):
        return self.A.pow(2).sum()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def probe_model():
    model = mlp()
    lorakit.attach(model, AdapterConfig(r=2, targets=["0", "2"]), name="a")
    lorakit.attach(model, AdapterConfig(r=2, targets=["0"]), name="b")  # attach freezes "a"
    lorakit.set_trainable(model, "a", True)
    lorakit.set_trainable(model, "b", False)
    for _, layer in adapted_layers(model):
        for name, adapter in layer.adapters.items():
            if name == "a":
                adapter.__class__ = Probe
                hooks_mod.watch_adapter(adapter)
    Probe.calls = []
    return model


@pytest.fixture(autouse=True)
def fresh_warnings():
    hooks_mod._WARNED.clear()
    yield
    hooks_mod._WARNED.clear()


def test_hooks_call_trainable_adapters_with_step_numbers_and_gradients_present():
    model = probe_model()
    lorakit.set_active(model, ["a", "b"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = lorakit.training_hooks(model)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
    hooks.finish()
    steps = [c for c in Probe.calls if c[0] == "after_step"]
    assert steps == [("after_step", p, s, True) for s in (1, 2, 3) for p in ("0", "2")]  # frozen "b" never called
    assert [c for c in Probe.calls if c[0] == "finish"] == [("finish", "0"), ("finish", "2")]
    assert hooks.step == 3


def test_regularization_loss_sums_the_trainable_adapters_terms_and_is_differentiable():
    model = probe_model()
    reg = lorakit.regularization_loss(model)
    expected = sum(layer.adapters["a"].A.detach().pow(2).sum() for _, layer in adapted_layers(model)
                   if "a" in layer.adapters)
    assert reg.dim() == 0 and torch.allclose(reg, expected)
    reg.backward()
    a0 = model[0].adapters["a"]
    assert torch.allclose(a0.A.grad, 2 * a0.A.detach())
    assert model[0].adapters["b"].A.grad is None  # frozen adapter contributes nothing


def test_regularization_loss_is_a_zero_scalar_when_nothing_contributes():
    plain = mlp()
    zero = lorakit.regularization_loss(plain)
    assert zero.shape == () and float(zero) == 0.0 and not zero.requires_grad
    lorakit.attach(plain, AdapterConfig(r=2))
    zero = lorakit.regularization_loss(plain)
    assert zero.shape == () and float(zero) == 0.0 and not zero.requires_grad
    ada = mlp()
    lorakit.attach(ada, AdapterConfig(method="adalora", r=2, target_r=1, total_steps=5, orth_reg=0.0))
    assert float(lorakit.regularization_loss(ada)) == 0.0


def _adalora_model(seed=0):
    model = mlp()
    lorakit.attach(model, AdapterConfig(method="adalora", r=3, target_r=1, total_steps=50, targets=["0", "2"],
                                        seed=seed))
    return model


def _steps(model, n, hooks=None, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        if hooks is not None:
            hooks.after_step()
        opt.zero_grad()


def test_missing_hooks_warn_once_naming_the_method_and_the_fix():
    model = _adalora_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(model, 4)
        _steps(_adalora_model(seed=1), 3)  # another model, same method: still only one warning per process
    mine = [w for w in caught if "training hooks" in str(w.message)]
    assert len(mine) == 1
    text = str(mine[0].message)
    assert "'adalora'" in text
    for line in ("hooks = lorakit.training_hooks(model)", "hooks.after_step()", "hooks.finish()"):
        assert line in text
    assert mine[0].filename == __file__  # points at the user's optimizer.step() call


def test_no_warning_when_the_hooks_run_or_the_method_does_not_need_them():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _adalora_model()
        _steps(model, 5, hooks=lorakit.training_hooks(model))
        lora = mlp()
        lorakit.attach(lora, AdapterConfig(r=2))
        _steps(lora, 5)
        frozen = _adalora_model()  # adapter frozen: an optimiser over other parameters never touches it
        lorakit.set_trainable(frozen, "default", False)
        for p in frozen[0].base.parameters():
            p.requires_grad_(True)
        _steps(frozen, 5)
        finished = _adalora_model()
        lorakit.training_hooks(finished).finish()  # consolidated adapters no longer need the hooks
        lorakit.set_trainable(finished, "default", True)
        _steps(finished, 5)
    assert not [w for w in caught if "training hooks" in str(w.message)]


def test_state_dict_round_trip_gives_an_exact_continuation():
    torch.manual_seed(0)
    first = _adalora_model()
    second = mlp()
    lorakit.attach(second, AdapterConfig(method="adalora", r=3, target_r=1, total_steps=50, targets=["0", "2"]))
    h1 = lorakit.training_hooks(first)
    _steps(first, 4, h1)
    # through the checkpoint serialiser (tensors out to safetensors, the rest to JSON)
    tensors: dict = {}
    flat = ckpt.flatten_state(h1.state_dict(), tensors)
    state = ckpt.unflatten_state(flat, tensors)
    assert state["step"] == 4 and state["adapters"]["default"]["0"]["ipt_E"].shape == (3, 1)
    second.load_state_dict(first.state_dict())  # weights (importance averages are not in the model's state)
    h2 = lorakit.training_hooks(second)
    h2.load_state_dict(state)
    _steps(first, 3, h1)
    _steps(second, 3, h2)
    for p1, p2 in zip(first.parameters(), second.parameters()):
        assert torch.equal(p1, p2)
    assert torch.equal(first[0].adapters["default"].ipt_A, second[0].adapters["default"].ipt_A)


def test_hooks_on_a_model_without_adapters_do_nothing():
    hooks = lorakit.training_hooks(mlp())
    hooks.after_step()
    hooks.finish()
    assert hooks.step == 1 and hooks.state_dict() == {"step": 1, "adapters": {}}
    with pytest.raises(TypeError, match="nn.Module"):
        lorakit.training_hooks("model")


# ------------------------------------------------------------------------------------------- transformers
def _rows(n=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (n, 8), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _args(tmp_path, steps, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_steps=1, **kw)


def test_callback_runs_after_the_optimizer_step_while_gradients_exist(tmp_path):
    from transformers import Trainer

    from lorakit.train.callbacks import LorakitCallback

    model = tiny_llama(hidden=32, layers=1)
    lorakit.attach(model, AdapterConfig(r=2, targets=["q_proj"]), name="a")
    probe_layer = model.model.layers[0].self_attn.q_proj
    probe_layer.adapters["a"].__class__ = Probe
    Probe.calls = []
    before = probe_layer.adapters["a"].B.detach().clone()
    callback = LorakitCallback()
    Trainer(model=model, args=_args(tmp_path, 3), train_dataset=_rows(), callbacks=[callback]).train()
    steps = [c for c in Probe.calls if c[0] == "after_step"]
    assert [(c[2], c[3]) for c in steps] == [(1, True), (2, True), (3, True)]  # gradients still present
    assert Probe.calls[-1][0] == "finish"
    assert not torch.equal(before, probe_layer.adapters["a"].B)  # the optimiser did step


def test_lorakit_trainer_adds_the_regulariser_to_the_loss(tmp_path):
    from lorakit.train.callbacks import LorakitCallback, LorakitTrainer

    model = tiny_llama(hidden=32, layers=1)
    lorakit.attach(model, AdapterConfig(method="adalora", r=2, target_r=1, total_steps=2, orth_reg=0.5,
                                        targets=["q_proj", "v_proj"]))
    trainer = LorakitTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_rows())
    assert sum(isinstance(c, LorakitCallback) for c in trainer.callback_handler.callbacks) == 1
    batch = {k: torch.stack([r[k] for r in _rows(2)]) for k in ("input_ids", "labels")}
    model.train()
    got = trainer.compute_loss(model, dict(batch))
    reg = lorakit.regularization_loss(model)
    assert reg.item() > 0.1
    assert torch.allclose(got, model(**batch).loss + reg, atol=1e-6)
    model.eval()
    assert torch.allclose(trainer.compute_loss(model, dict(batch)), model(**batch).loss, atol=1e-6)
