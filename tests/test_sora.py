"""SoRA (methods.md §9, §17) against plain formulas: gated forward, the proximal step, pruning, save/load/merge."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.methods.lora import LoraAdapter
from lorakit.methods.sora import SoraAdapter, kept_ranks, rank_report, soft_threshold, xi_at
from lorakit.model import adapted_layers, registry

ATOL = 1e-6


def randomise(model, name="default", seed=3):
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        for p in layer.adapters[name].parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def gate_groups(model, lr, weight_decay=0.01, name="default"):
    """Optimiser groups as a user builds them from ``optimizer_options`` (gates: own group, no decay)."""
    config = registry(model).configs[name]
    plain, special = [], {}
    for _, layer in adapted_layers(model):
        adapter = layer.adapters[name]
        for pname, p in adapter.named_parameters():
            opts = adapter.optimizer_options(pname, config)
            if opts is None:
                plain.append(p)
            else:
                special.setdefault(tuple(sorted(opts.items())), []).append(p)
    groups = [{"params": plain, "lr": lr, "weight_decay": weight_decay}]
    for opts, params in special.items():
        groups.append({"params": params, "lr": lr, "weight_decay": weight_decay, **dict(opts)})
    return groups


# ------------------------------------------------------------------------------------------------ formulas
def test_soft_threshold_is_the_l1_proximal_operator():
    g = torch.tensor([0.5, -0.05, -2.0, 0.1, 0.0, 0.3])
    t = 0.1
    expected = torch.tensor([0.4, 0.0, -1.9, 0.0, 0.0, 0.2])  # subtract t above t, add t below -t, else 0
    assert torch.allclose(soft_threshold(g, t), expected, atol=1e-7)
    # and it is the argmin of 1/2 (v - g)^2 + t|v| (checked on a grid)
    grid = torch.linspace(-3, 3, 60001)
    for gi in g:
        best = grid[torch.argmin(0.5 * (grid - gi) ** 2 + t * grid.abs())]
        assert abs(float(best) - float(soft_threshold(gi, t))) < 1e-3


def test_xi_schedule_values():
    plain = AdapterConfig(method="sora", sora_xi=3e-4)
    assert xi_at(plain, 1) == xi_at(plain, 10_000) == 3e-4
    spread = AdapterConfig(method="sora", sora_schedule=[0.0, 1e-4, 2e-4, 7e-4], total_steps=8)
    assert [xi_at(spread, s) for s in range(1, 11)] == [0.0, 0.0, 1e-4, 1e-4, 2e-4, 2e-4, 7e-4, 7e-4, 7e-4, 7e-4]
    pairs = AdapterConfig(method="sora", sora_xi=5e-5, sora_schedule=[[3, 1e-4], [6, 2e-4]])
    assert [xi_at(pairs, s) for s in (1, 2, 3, 5, 6, 100)] == [5e-5, 5e-5, 1e-4, 1e-4, 2e-4, 2e-4]
    assert AdapterConfig.from_json(pairs.to_json()) == pairs


def test_forward_delta_and_merge_match_the_gated_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10))
    base = copy.deepcopy(net)
    lorakit.attach(net, AdapterConfig(method="sora", r=4, alpha=8))
    randomise(net)
    ad = net[0].adapters["default"]
    x = torch.randn(5, 12)
    s = 8 / 4
    expected = base(x) + s * (((x @ ad.A.T) * ad.gate) @ ad.B.T)  # y + s·B(g ⊙ A x)
    assert torch.allclose(net(x), expected, atol=ATOL)
    assert torch.allclose(ad.delta_weight(), s * ad.B @ torch.diag(ad.gate) @ ad.A, atol=ATOL)
    y = net(x)
    lorakit.merge(net)
    assert torch.allclose(net(x), y, atol=1e-5)
    lorakit.unmerge(net)
    assert torch.allclose(net[0].base.weight, base[0].weight, atol=1e-6)


def test_initial_state_is_plain_lora_with_unit_gates():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    base = copy.deepcopy(net)
    lorakit.attach(net, AdapterConfig(method="sora", r=3, seed=1))
    ad = net[0].adapters["default"]
    assert torch.equal(ad.gate.detach(), torch.ones(3)) and torch.count_nonzero(ad.B) == 0
    x = torch.randn(2, 6)
    assert torch.equal(net(x), base(x))
    assert lorakit.trainable_parameters(net)[0] == 3 * (6 + 5) + 3


# ------------------------------------------------------------------------------------------------ the prox step
def test_prox_step_after_sgd_step_uses_the_gate_groups_lr():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4))
    cfg = AdapterConfig(method="sora", r=5, sora_xi=2.0, sora_lr=0.05)
    lorakit.attach(net, cfg)
    randomise(net)
    ad = net[0].adapters["default"]
    with torch.no_grad():
        ad.gate.copy_(torch.tensor([0.5, -0.3, 0.06, -0.02, 1.0]))
    opt = torch.optim.SGD(gate_groups(net, lr=0.01, weight_decay=0.0))
    hooks = lorakit.training_hooks(net)
    x = torch.randn(3, 6) * 0.05  # small gradient: the prox step decides which entries vanish
    net(x).pow(2).sum().backward()
    g_before, grad = ad.gate.detach().clone(), ad.gate.grad.clone()
    opt.step()
    hooks.after_step()
    opt.zero_grad()
    lr_gate, xi = 0.05, 2.0  # the gate group's lr (sora_lr), not the main lr 0.01
    v = g_before - lr_gate * grad
    expected = torch.sign(v) * torch.clamp(v.abs() - lr_gate * xi, min=0)
    assert torch.allclose(ad.gate.detach(), expected, atol=1e-7)
    assert (ad.gate == 0).sum() >= 2  # the small entries were cut


def test_prox_threshold_follows_the_lr_schedule_and_xi_schedule():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4))
    lorakit.attach(net, AdapterConfig(method="sora", r=2, sora_schedule=[[1, 0.0], [3, 1.0]]))
    ad = net[0].adapters["default"]
    opt = torch.optim.SGD([{"params": [ad.A, ad.B]}, {"params": [ad.gate], "weight_decay": 0.0}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)  # lr 0.1, 0.05, 0.025, ...
    hooks = lorakit.training_hooks(net)
    values = []
    for step in range(1, 5):
        with torch.no_grad():
            ad.gate.fill_(1.0)
        ad.gate.grad = torch.zeros(2)  # no gradient: the change is the prox step alone
        lr = opt.param_groups[1]["lr"]
        opt.step()
        hooks.after_step()
        sched.step()
        values.append((lr, float(ad.gate.detach()[0])))
    # steps 1, 2: xi = 0 -> unchanged; steps 3, 4: g = 1 - lr_t·1 with the scheduled lr of that step
    assert values[0][1] == 1.0 and values[1][1] == 1.0
    assert values[2][1] == pytest.approx(1 - values[2][0]) and values[3][1] == pytest.approx(1 - values[3][0])
    assert values[2][0] == pytest.approx(0.025) and values[3][0] == pytest.approx(0.0125)


def test_gate_options_and_weight_decay_warning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4))
    cfg = AdapterConfig(method="sora", r=2, sora_lr=0.3)
    lorakit.attach(net, cfg)
    ad = net[0].adapters["default"]
    assert ad.optimizer_options("gate", cfg) == {"weight_decay": 0.0, "lr": 0.3}
    assert ad.optimizer_options("A", cfg) is None and ad.optimizer_options("B", cfg) is None
    assert ad.param_role("gate") == "vector"  # LoRA+ leaves the gate at the base lr (§17)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    net(torch.randn(2, 4)).sum().backward()
    import lorakit.methods.sora as sora_module

    sora_module._WARNED_DECAY.clear()
    with pytest.warns(UserWarning, match="weight_decay"):
        opt.step()


def test_after_step_without_a_seen_optimizer_step_needs_sora_lr():
    net = nn.Sequential(nn.Linear(4, 4))
    lorakit.attach(net, AdapterConfig(method="sora", r=2))
    layer = net[0]
    with pytest.raises(RuntimeError, match="sora_lr"):
        layer.adapters["default"].after_step(layer, 1)
    net2 = nn.Sequential(nn.Linear(4, 4))
    lorakit.attach(net2, AdapterConfig(method="sora", r=2, sora_lr=0.5, sora_xi=1.0))
    layer2 = net2[0]
    layer2.adapters["default"].after_step(layer2, 1)  # falls back to sora_lr: g = 1 - 0.5
    assert torch.allclose(layer2.adapters["default"].gate.detach(), torch.full((2,), 0.5))


def test_deepcopied_model_still_sees_its_gate_lr():
    net = nn.Sequential(nn.Linear(4, 4))
    lorakit.attach(net, AdapterConfig(method="sora", r=2, sora_xi=1.0))
    twin = copy.deepcopy(net)
    ad = twin[0].adapters["default"]
    opt = torch.optim.SGD([ad.gate], lr=0.25)
    ad.gate.grad = torch.zeros(2)
    opt.step()
    lorakit.training_hooks(twin).after_step()
    assert torch.allclose(ad.gate.detach(), torch.full((2,), 0.75))


# ------------------------------------------------------------------------------------------------ pruning
def test_finish_prunes_to_plain_lora_of_rank_nnz_with_identical_outputs(llama, token_batch):
    lorakit.attach(llama, AdapterConfig(method="sora", r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomise(llama)
    paths = [p for p, _ in adapted_layers(llama)]
    zeros = {paths[0]: [1, 3], paths[1]: [0, 1, 2, 3], paths[2]: []}  # paths[1] ends with rank 0
    for path, layer in adapted_layers(llama):
        with torch.no_grad():
            layer.adapters["default"].gate[zeros.get(path, [2])] = 0.0
    expected_ranks = {p: 4 - len(zeros.get(p, [2])) for p in paths}
    assert kept_ranks(llama) == expected_ranks
    before = llama(token_batch).logits
    deltas = {p: layer.adapters["default"].delta_weight().clone() for p, layer in adapted_layers(llama)}

    lorakit.training_hooks(llama).finish()

    after = llama(token_batch).logits
    assert torch.allclose(before, after, atol=ATOL)
    for path, layer in adapted_layers(llama):
        ad = layer.adapters["default"]
        assert isinstance(ad, LoraAdapter) and type(ad) is LoraAdapter
        assert ad.r == max(expected_ranks[path], 1) and ad.A.shape[0] == ad.r
        assert torch.allclose(ad.delta_weight(), deltas[path], atol=ATOL)
    assert torch.count_nonzero(llama.get_submodule(paths[1]).adapters["default"].delta_weight()) == 0
    cfg = registry(llama).configs["default"]
    assert cfg.method == "lora" and cfg.rank_pattern == {p: max(k, 1) for p, k in expected_ranks.items()}
    assert kept_ranks(llama) == expected_ranks
    report = rank_report(llama)
    assert paths[1] in report and report.splitlines()[-1].split() == ["total", "16", str(sum(expected_ranks.values()))]
    assert lorakit.trainable_parameters(llama)[0] == sum(
        max(k, 1) * (64 + 64) for k in expected_ranks.values())


def test_save_load_merge_before_and_after_finish(llama, token_batch, tmp_path):
    fresh = copy.deepcopy(llama)
    lorakit.attach(llama, AdapterConfig(method="sora", r=4, targets=["q_proj", "down_proj"]))
    randomise(llama)
    for _, layer in adapted_layers(llama):
        with torch.no_grad():
            layer.adapters["default"].gate[1] = 0.0
    y = llama(token_batch).logits

    # before finish: a SoRA adapter (gates saved)
    lorakit.save(llama, tmp_path / "dense")
    m1 = copy.deepcopy(fresh)
    lorakit.load(m1, tmp_path / "dense")
    assert isinstance(m1.model.layers[0].self_attn.q_proj.adapters["default"], SoraAdapter)
    assert torch.allclose(m1(token_batch).logits, y, atol=ATOL)
    lorakit.merge(m1)
    assert torch.allclose(m1(token_batch).logits, y, atol=1e-5)

    # after finish: a plain LoRA of the kept ranks
    lorakit.training_hooks(llama).finish()
    lorakit.save(llama, tmp_path / "pruned")
    meta = json.loads((tmp_path / "pruned" / "lorakit_config.json").read_text())["adapters"]["default"]
    assert meta["config"]["method"] == "lora" and set(meta["config"]["rank_pattern"].values()) == {3}
    assert meta["extra"]["sora"]["kept_ranks"] == kept_ranks(llama)
    m2 = copy.deepcopy(fresh)
    lorakit.load(m2, tmp_path / "pruned")
    assert torch.allclose(m2(token_batch).logits, y, atol=ATOL)
    assert kept_ranks(m2) == kept_ranks(llama)
    plain = lorakit.unload(m2)
    assert torch.allclose(plain(token_batch).logits, y, atol=1e-5)


def test_finish_refuses_a_merged_adapter():
    net = nn.Sequential(nn.Linear(4, 4))
    lorakit.attach(net, AdapterConfig(method="sora", r=2))
    lorakit.merge(net)
    with pytest.raises(ValueError, match="unmerge"):
        lorakit.training_hooks(net).finish()
    assert isinstance(net[0].adapters["default"], SoraAdapter)


@pytest.mark.parametrize("field, value, match", [
    ("sora_xi", -1.0, "sora_xi"),
    ("sora_lr", 0.0, "sora_lr"),
    ("sora_schedule", [3e-4, 1e-4], "sora_schedule"),  # decreasing
    ("sora_schedule", [1e-4, 2e-4], "total_steps"),  # spread over total_steps, which is unset
    ("sora_schedule", [[5, 1e-4], [2, 2e-4]], "sora_schedule"),
    ("sora_schedule", "linear", "sora_schedule"),
    ("init", "pissa", "init"),
])
def test_bad_config_is_refused_before_the_model_changes(field, value, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(method="sora", **{field: value})


# ------------------------------------------------------------------------------------------------ training
def test_tiny_llama_trains_through_plain_loop_hooks_and_prunes():
    model = tiny_llama(hidden=32)
    lorakit.attach(model, AdapterConfig(method="sora", r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj"],
                                        sora_xi=1.0, sora_lr=0.05, seed=0))
    opt = torch.optim.AdamW(gate_groups(model, lr=1e-2))
    data = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    hooks = lorakit.training_hooks(model)
    model.train()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gates have no decay and the hooks run: no warning at all
        for step in range(40):
            batch = data[(step % 4) * 2:(step % 4) * 2 + 2]
            loss = model(input_ids=batch, labels=batch).loss + lorakit.regularization_loss(model)
            loss.backward()
            opt.step()
            hooks.after_step()
            opt.zero_grad()
            losses.append(loss.item())
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.1
    ranks = kept_ranks(model)
    assert sum(ranks.values()) < 4 * len(ranks)  # the prox step cut some gates to exactly 0
    model.eval()
    y = model(data).logits
    hooks.finish()
    assert torch.allclose(model(data).logits, y, atol=ATOL)
    assert kept_ranks(model) == ranks


def test_tiny_llama_trains_with_the_transformers_trainer_callback(tmp_path):
    from transformers import TrainingArguments

    from lorakit.train.callbacks import LorakitTrainer

    model = tiny_llama(hidden=32)
    lorakit.attach(model, AdapterConfig(method="sora", r=4, alpha=8, targets=["q_proj", "v_proj"], sora_xi=2.0,
                                        seed=0))
    seqs = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True)
    trainer = LorakitTrainer(model=model, args=args, train_dataset=[{"input_ids": s, "labels": s} for s in seqs])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) < sum(losses[:4])
    info = registry(model).extra["default"]["sora"]  # on_train_end ran finish(): pruned to plain LoRA
    assert info["finished"] and registry(model).configs["default"].method == "lora"
    assert set(info["kept_ranks"]) == {p for p, _ in adapted_layers(model)}


def test_pruned_adapter_is_a_plain_lora_that_peft_loads(llama, token_batch, tmp_path):
    from peft import PeftModel

    base = copy.deepcopy(llama)
    lorakit.attach(llama, AdapterConfig(method="sora", r=4, targets=["q_proj", "v_proj"]))
    randomise(llama)
    for i, (_, layer) in enumerate(adapted_layers(llama)):
        with torch.no_grad():
            layer.adapters["default"].gate[: i % 4] = 0.0  # kept ranks 4, 3, 2, 1
    y = llama(token_batch).logits
    lorakit.training_hooks(llama).finish()
    lorakit.save(llama, tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    assert torch.allclose(peft_model(token_batch).logits, y, atol=ATOL)
