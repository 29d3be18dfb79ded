"""Delta-LoRA (methods.md §11, §17): the base update rule, fp32 accumulation, save/load/merge/unload, training."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.model import adapted_layers

ATOL = 1e-5


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).to(dtype)


def run_steps(net, k, lr=1e-2, dtype=torch.float32, seed=1):
    """k plain-loop steps; returns the (B A) product of layer 0 after each step (index 0 = before training)."""
    ad = net[0].adapters["default"]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    hooks = lorakit.training_hooks(net)
    g = torch.Generator().manual_seed(seed)
    products = [(ad.B.detach().double() @ ad.A.detach().double())]
    for _ in range(k):
        x = torch.randn(8, 12, generator=g).to(dtype)
        loss = (net(x).float() - 1.0).pow(2).mean() + lorakit.regularization_loss(net)
        loss.backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
        products.append(ad.B.detach().double() @ ad.A.detach().double())
    return products


def test_base_after_k_steps_is_w0_plus_lambda_s_sum_of_product_changes():
    net = mlp()
    w0 = net[0].weight.detach().double().clone()
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=3, alpha=6, delta_lambda=2.0, delta_start=2, seed=0))
    ad = net[0].adapters["default"]
    s, lam, K, k = 6 / 3, 2.0, 2, 7
    products = run_steps(net, k)
    # W_{t+1} = W_t + λ·s·(B_{t+1}A_{t+1} − B_t A_t) for every step t+1 > K, written out plainly
    expected = w0.clone()
    for t in range(1, k + 1):
        if t > K:
            expected += lam * s * (products[t] - products[t - 1])
    assert not torch.allclose(expected, w0)
    assert torch.allclose(net[0].base.weight.double(), expected, atol=1e-6)
    assert torch.allclose(ad.base_shift().double(), expected - w0, atol=1e-6)
    assert ad.base_shift().dtype == torch.float32


def test_before_the_start_step_it_is_plain_lora():
    net = mlp()
    w0 = net[0].weight.detach().clone()
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, delta_start=5))
    run_steps(net, 5)
    assert torch.equal(net[0].base.weight, w0)
    assert torch.count_nonzero(net[0].adapters["default"].base_shift()) == 0
    run_steps(net, 1)  # a new hooks object counts from 1 again: still plain LoRA
    assert torch.equal(net[0].base.weight, w0)


def test_bf16_base_accumulates_in_fp32():
    net = mlp(torch.bfloat16)
    w0 = net[0].weight.detach().clone()
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, alpha=2, delta_lambda=2.0, delta_start=0, seed=0))
    ad = net[0].adapters["default"]
    k = 30
    products = run_steps(net, k, lr=2e-4, dtype=torch.bfloat16)  # per-step changes far below bf16 resolution
    steps = [2.0 * (products[t] - products[t - 1]) for t in range(1, k + 1)]
    total = sum(steps)
    assert torch.allclose(ad.base_shift().double(), total, atol=1e-7)
    # the base is exactly the bf16 rounding of W0 + (fp32 accumulated change) ...
    expected = (w0.double() + ad.base_shift().double()).to(torch.bfloat16)
    assert torch.equal(net[0].base.weight, expected)
    assert not torch.equal(net[0].base.weight, w0)
    # ... whereas adding each step in bf16 loses most of it
    naive = w0.clone()
    for d in steps:
        naive = (naive.double() + d).to(torch.bfloat16)
    err_fp32 = (net[0].base.weight.double() - (w0.double() + total)).abs().sum()
    err_naive = (naive.double() - (w0.double() + total)).abs().sum()
    assert err_fp32 < 0.5 * err_naive


def test_dropout_and_bad_values_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match=r"dropout=0.1 .*delta_lora.*dropout=0.0"):
        AdapterConfig(method="delta_lora", dropout=0.1)
    with pytest.raises(ValueError, match="delta_lambda"):
        AdapterConfig(method="delta_lora", delta_lambda=-1.0)
    with pytest.raises(ValueError, match="delta_start"):
        AdapterConfig(method="delta_lora", delta_start=1.5)
    with pytest.raises(ValueError, match="init"):
        AdapterConfig(method="delta_lora", init="pissa")
    cfg = AdapterConfig(method="delta_lora")
    assert (cfg.delta_lambda, cfg.delta_start) == (2.0, 500)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_on_original_base_merge_unload(dtype, tmp_path):
    net = mlp(dtype)
    original = copy.deepcopy(net)
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, delta_start=1, seed=0))
    run_steps(net, 6, lr=1e-2, dtype=dtype)
    x = torch.randn(5, 12).to(dtype)
    y = net(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    folder = lorakit.save(net, tmp_path / "delta")
    saved = load_file(str(folder / "lorakit_weights.safetensors"))
    shift_key = "default|layer|0|shift"
    assert saved[shift_key].dtype == torch.float32  # the full-rank change W_T − W0, in fp32
    assert torch.allclose(saved[shift_key].double(),
                          net[0].base.weight.double() - original[0].weight.double(), atol=1e-2 if tol > 1e-4 else 1e-6)
    assert not any("prev" in k for k in saved)

    loaded = copy.deepcopy(original)
    lorakit.load(loaded, folder)  # onto the ORIGINAL base: the shift is re-applied
    if dtype == torch.bfloat16:  # both are round(W0 + shift)
        assert torch.equal(loaded[0].base.weight, net[0].base.weight)
    assert torch.allclose(loaded[0].base.weight, net[0].base.weight, atol=1e-6)
    assert torch.allclose(loaded(x).float(), y.float(), atol=tol)

    lorakit.merge(loaded)
    assert torch.allclose(loaded(x).float(), y.float(), atol=tol)
    plain = lorakit.unload(loaded)
    assert type(plain[0]) is nn.Linear
    assert torch.allclose(plain(x).float(), y.float(), atol=tol)

    with lorakit.disabled(net):  # the base model: original weights
        assert torch.allclose(net(x).float(), original(x).float(), atol=tol)
    base = lorakit.unload(net, merge=False)
    assert torch.allclose(base[0].weight.float(), original[0].weight.float(), atol=1e-6 if tol < 1e-4 else 1e-2)


def test_load_for_training_then_resume_continues_the_update(tmp_path):
    net = mlp()
    original = copy.deepcopy(net)
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, delta_start=0, seed=0))
    run_steps(net, 3)
    lorakit.save(net, tmp_path / "a")
    cont = copy.deepcopy(original)
    lorakit.load(cont, tmp_path / "a", trainable=True)
    w_loaded = cont[0].base.weight.detach().double().clone()
    products = run_steps(cont, 2, seed=5)
    expected = w_loaded + 2.0 * cont[0].adapters["default"].scaling * (products[2] - products[0])
    assert torch.allclose(cont[0].base.weight.double(), expected, atol=1e-6)


def test_restore_moves_the_base_to_the_saved_shift(tmp_path):
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, delta_start=0, seed=0))
    run_steps(net, 2)
    lorakit.save(net, tmp_path / "early")
    w_early = net[0].base.weight.detach().clone()
    run_steps(net, 3)
    assert not torch.allclose(net[0].base.weight, w_early)
    from lorakit.io import restore

    restore(net, tmp_path / "early")
    assert torch.allclose(net[0].base.weight, w_early, atol=1e-6)


def test_combine_is_refused():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2), name="a")
    with pytest.raises(ValueError, match="merge"):
        lorakit.combine(net, {"a": 1.0}, name="mix")


def test_tiny_llama_trains_through_plain_loop_hooks(tmp_path):
    model = tiny_llama(hidden=32)
    original = copy.deepcopy(model)
    lorakit.attach(model, AdapterConfig(method="delta_lora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                                        delta_start=5, seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    hooks = lorakit.training_hooks(model)
    model.train()
    losses = []
    for step in range(20):
        batch = data[(step % 4) * 2:(step % 4) * 2 + 2]
        loss = model(input_ids=batch, labels=batch).loss + lorakit.regularization_loss(model)
        loss.backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
        losses.append(loss.item())
    hooks.finish()
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.1
    moved = [p for p, layer in adapted_layers(model)
             if not torch.equal(layer.base.weight, original.get_submodule(p).weight)]
    assert len(moved) == 6  # every adapted weight moved (full rank), the rest did not
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)
    model.eval()
    y = model(data).logits
    lorakit.save(model, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "lorakit_config.json").read_text())
    assert meta["adapters"]["default"]["config"]["method"] == "delta_lora"
    fresh = copy.deepcopy(original)
    lorakit.load(fresh, tmp_path / "run")
    assert torch.allclose(fresh(data).logits, y, atol=ATOL)


def test_tiny_llama_trains_with_the_transformers_trainer_callback(tmp_path):
    from transformers import TrainingArguments

    from lorakit.train.callbacks import LorakitTrainer

    model = tiny_llama(hidden=32)
    original = copy.deepcopy(model)
    lorakit.attach(model, AdapterConfig(method="delta_lora", r=4, alpha=8, targets=["q_proj", "v_proj"],
                                        delta_start=3, seed=0))
    seqs = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True)
    trainer = LorakitTrainer(model=model, args=args, train_dataset=[{"input_ids": s, "labels": s} for s in seqs])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) < sum(losses[:4])
    for path, layer in adapted_layers(model):  # the callback drove the base updates
        shift = layer.adapters["default"].base_shift()
        assert shift.abs().sum() > 0
        assert torch.allclose(layer.base.weight, original.get_submodule(path).weight + shift, atol=1e-6)
    model.eval()
    y = model(seqs).logits
    lorakit.save(model, tmp_path / "adapter")
    fresh = copy.deepcopy(original)
    lorakit.load(fresh, tmp_path / "adapter")
    assert torch.allclose(fresh(seqs).logits, y, atol=ATOL)
