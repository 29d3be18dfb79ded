"""AdaLoRA against plain formulas and against PEFT's implementation (identical weights, fp32)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ConvNet, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.methods.adalora import AdaLoraAdapter, budget_schedule, rank_report
from lorakit.model import adapted_layers, registry

ATOL = 1e-5


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))


def ada(**kw):
    base = dict(method="adalora", r=4, target_r=2, total_steps=10, targets=["0", "2", "4"])
    base.update(kw)
    return AdapterConfig(**base)


def adapters(model, name="default"):
    return {p: layer.adapters[name] for p, layer in adapted_layers(model) if name in layer.adapters}


def train_plain(model, steps, data, lr=1e-2, hooks=True):
    """The documented plain loop; returns the task losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    h = lorakit.training_hooks(model) if hooks else None
    losses = []
    for step in range(steps):
        x, y = data(step)
        task = nn.functional.mse_loss(model(x), y)
        (task + lorakit.regularization_loss(model)).backward()
        opt.step()
        if h is not None:
            h.after_step()
        opt.zero_grad()
        losses.append(task.item())
    return losses, h


def fixed_data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 12, generator=g), torch.randn(n, 6, generator=g)
    return lambda step: (x, y)


# ------------------------------------------------------------------------------------------- schedule
def plain_budget(t, b0, bT, t_init, t_final, T):
    """methods.md §8 step 3, written out."""
    if t <= t_init:
        return b0
    if t > T - t_final:
        return bT
    return math.floor(bT + (b0 - bT) * (1 - (t - t_init) / (T - t_final - t_init)) ** 3)


def test_budget_schedule_matches_the_cubic_formula():
    b0, bT, t_init, t_final, T, dt = 48, 16, 10, 20, 100, 5
    # hand-computed anchors: t=45 is half-way through the decrease: 16 + 32 * 0.5^3 = 20
    assert budget_schedule(45, b0, bT, t_init, t_final, T, dt) == (20, True)
    assert budget_schedule(10, b0, bT, t_init, t_final, T, dt) == (48, False)  # warm-up: no masking
    assert budget_schedule(11, b0, bT, t_init, t_final, T, dt) == (46, False)  # 16 + 32*(69/70)^3 = 46.65
    assert budget_schedule(80, b0, bT, t_init, t_final, T, dt) == (16, True)  # end of the decrease
    assert budget_schedule(81, b0, bT, t_init, t_final, T, dt) == (16, True)  # final phase masks every step
    for t in range(0, 120):
        budget, mask = budget_schedule(t, b0, bT, t_init, t_final, T, dt)
        assert budget == plain_budget(t, b0, bT, t_init, t_final, T)
        assert mask == (t > T - t_final or (t > t_init and t % dt == 0))


def test_training_follows_the_budget_at_masking_steps():
    model = mlp()
    cfg = ada(total_steps=12, t_init=2, t_final=3, delta_t=2)
    lorakit.attach(model, cfg)
    data = fixed_data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = lorakit.training_hooks(model)
    for step in range(1, 13):
        x, y = data(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
        budget, mask = budget_schedule(step, 12, 6, 2, 3, 12, 2)
        kept = sum(rank_report(model).values())
        if mask:
            assert kept == plain_budget(step, 12, 6, 2, 3, 12)
            zero = sum(int((a.E.view(-1) == 0).sum()) for a in adapters(model).values())
            assert zero == 12 - kept  # the masked triplets have λ = 0 right after the mask
        if step <= 2:
            assert kept == 12
    assert hooks.step == 12


# ------------------------------------------------------------------------------------------- importance
def test_importance_emas_and_triplet_score_on_a_toy_layer():
    net = nn.Sequential(nn.Linear(3, 2))
    lorakit.attach(net, AdapterConfig(method="adalora", r=2, target_r=1, total_steps=10, t_init=9, beta1=0.5,
                                      beta2=0.25))
    a = adapters(net)["0"]
    hooks = lorakit.training_hooks(net)
    b1, b2 = 0.5, 0.25
    g = torch.Generator().manual_seed(0)
    ema = {}
    for step in range(2):
        for name in ("A", "E", "B"):
            p = getattr(a, name)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
            p.grad = torch.randn(p.shape, generator=g)
        # the reference: plain element-wise loops over the formulas of methods.md §8
        for name in ("A", "E", "B"):
            w, grad = getattr(a, name).detach().tolist(), getattr(a, name).grad.tolist()
            prev_i, prev_u = ema.get(name, ([[0.0] * len(w[0]) for _ in w], [[0.0] * len(w[0]) for _ in w]))
            new_i, new_u = [], []
            for r in range(len(w)):
                row_i, row_u = [], []
                for c in range(len(w[0])):
                    sens = abs(w[r][c] * grad[r][c])
                    i_bar = b1 * prev_i[r][c] + (1 - b1) * sens
                    u_bar = b2 * prev_u[r][c] + (1 - b2) * abs(sens - i_bar)
                    row_i.append(i_bar)
                    row_u.append(u_bar)
                new_i.append(row_i)
                new_u.append(row_u)
            ema[name] = (new_i, new_u)
        hooks.after_step()
    s = {n: [[i * u for i, u in zip(ri, ru)] for ri, ru in zip(*ema[n])] for n in ema}
    expected = []
    for i in range(2):  # S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)
        expected.append(s["E"][i][0] + sum(s["A"][i]) / 3 + sum(s["B"][k][i] for k in range(2)) / 2)
    assert torch.allclose(a.triplet_scores(), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(a.ipt_A, torch.tensor(ema["A"][0]), atol=1e-6)
    assert torch.allclose(a.unc_B, torch.tensor(ema["B"][1]), atol=1e-6)


def test_known_answer_scalar_importance():
    # w = 2, g = 3: I = 6; Ī = 0.5*6 = 3; Ū = 0.5*|6 - 3| = 1.5; s = 4.5
    net = nn.Sequential(nn.Linear(1, 1))
    lorakit.attach(net, AdapterConfig(method="adalora", r=1, target_r=1, total_steps=10, t_init=9, beta1=0.5,
                                      beta2=0.5))
    a = adapters(net)["0"]
    for name in ("A", "E", "B"):
        p = getattr(a, name)
        with torch.no_grad():
            p.fill_(2.0)
        p.grad = torch.full_like(p, 3.0)
    lorakit.training_hooks(net).after_step()
    assert a.triplet_scores().tolist() == [4.5 + 4.5 + 4.5]


def test_masking_drops_exactly_the_lowest_scores_across_layers():
    model = mlp()
    lorakit.attach(model, ada(r=3, target_r=1, total_steps=10))
    ads = list(adapters(model).values())
    scores = [torch.tensor([5.0, 0.1, 3.0]), torch.tensor([0.2, 4.0, 0.3]), torch.tensor([1.0, 2.0, 0.05])]
    for a, s in zip(ads, scores):
        a.ipt_E, a.unc_E = s.view(-1, 1), torch.ones(3, 1)
        with torch.no_grad():
            a.E.fill_(1.0)
    keeps = AdaLoraAdapter._top(ads, 5)  # keep 5 of 9: drop 0.05, 0.1, 0.2, 0.3
    assert [k.tolist() for k in keeps] == [[True, False, True], [False, True, False], [True, True, False]]


# ------------------------------------------------------------------------------------------- end of training
def test_finish_keeps_exactly_the_target_budget_and_the_function():
    model = mlp()
    lorakit.attach(model, ada(total_steps=12, t_init=2, t_final=3, delta_t=2))
    losses, hooks = train_plain(model, 12, fixed_data())
    assert losses[-1] < losses[0]
    x = torch.randn(5, 12)
    model.eval()
    before = model(x)
    hooks.finish()
    after = model(x)
    ranks = rank_report(model)
    assert sum(ranks.values()) == 2 * 3  # target_r × layers, exactly
    for path, a in adapters(model).items():
        assert a.A.shape == (ranks[path], a.in_features) and a.B.shape == (a.out_features, ranks[path])
        assert a.E.shape == (ranks[path], 1)
    assert torch.allclose(before, after, atol=ATOL)  # pruned triplets had λ = 0 since T - t_final
    cfg = registry(model).configs["default"]
    assert cfg.final_ranks == ranks and registry(model).extra["default"]["final_ranks"] == ranks
    assert lorakit.trainable_parameters(model)[0] == sum(r * (a.in_features + a.out_features + 1)
                                                         for r, a in zip(ranks.values(), adapters(model).values()))
    hooks.finish()  # idempotent
    assert rank_report(model) == ranks


def test_finish_before_the_schedule_ends_still_meets_the_budget():
    model = mlp()
    lorakit.attach(model, ada(total_steps=100))
    train_plain(model, 3, fixed_data())
    lorakit.training_hooks(model).finish()
    assert sum(rank_report(model).values()) == 6


def _rank_zero_model():
    """Two layers, budget 4 = r of one layer; scores make layer '0' win every triplet, so layer '2' keeps 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    lorakit.attach(model, AdapterConfig(method="adalora", r=4, target_r=2, total_steps=10, targets=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    for path, a in adapters(model).items():
        for p in a.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
        level = 1.0 if path == "0" else 1e-3
        a.ipt_E, a.unc_E = torch.full((4, 1), level), torch.ones(4, 1)
    return model


def test_save_after_finish_writes_kept_triplets_and_loads_identically(tmp_path):
    model = _rank_zero_model()
    pristine = copy.deepcopy(lorakit.unload(copy.deepcopy(model), merge=False))
    lorakit.training_hooks(model).finish()
    assert rank_report(model) == {"0": 4, "2": 0}
    folder = lorakit.save(model, tmp_path / "ada")
    tensors = load_file(str(folder / "lorakit_weights.safetensors"))
    assert tensors["default|layer|2|A"].shape == (0, 5) and tensors["default|layer|2|B"].shape == (4, 0)
    assert tensors["default|layer|0|E"].shape == (4, 1)
    x = torch.randn(3, 6)
    fresh = copy.deepcopy(pristine)
    lorakit.load(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        assert not torch.allclose(fresh(x), pristine(x))  # the adapter does something
    assert rank_report(fresh) == {"0": 4, "2": 0}
    # merge / unmerge of a pruned adapter, including the rank-0 layer
    with torch.no_grad():
        ref = fresh(x)
        lorakit.merge(fresh)
        assert torch.allclose(fresh(x), ref, atol=ATOL)
        lorakit.unmerge(fresh)
        assert torch.allclose(fresh[2].base.weight, pristine[2].weight, atol=ATOL)


def test_delta_weight_matches_forward_and_reference_formula():
    model = mlp()
    lorakit.attach(model, ada())
    g = torch.Generator().manual_seed(2)
    for a in adapters(model).values():
        for p in a.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
    layer = model[0]
    a = layer.adapters["default"]
    # ΔW = alpha / (r_init + 1e-5) · B diag(E) A, alpha = r = 4 by default
    ref = 4 / (4 + 1e-5) * a.B.detach() @ torch.diag(a.E.detach().view(-1)) @ a.A.detach()
    assert torch.allclose(a.delta_weight(layer), ref, atol=ATOL)
    x = torch.randn(7, 12)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ (layer.base.weight + ref).t() + layer.base.bias, atol=ATOL)


@pytest.mark.parametrize("kind", ["gpt2", "conv"])
def test_other_layer_kinds_forward_equals_merged_weights(kind):
    model = tiny_gpt2() if kind == "gpt2" else ConvNet()
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["conv", "conv2", "emb", "fc"]
    lorakit.attach(model, AdapterConfig(method="adalora", r=3, target_r=1, total_steps=5, targets=targets))
    g = torch.Generator().manual_seed(0)
    for a in adapters(model).values():
        for p in a.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    inputs = ((torch.randint(0, 96, (2, 7), generator=g),) if kind == "gpt2"
              else (torch.randn(2, 3, 5, 5, generator=g), torch.randint(0, 20, (2, 4), generator=g)))
    model.eval()
    with torch.no_grad():
        out = lambda: model(*inputs)[0] if kind == "gpt2" else model(*inputs)  # noqa: E731
        adapted = out()
        lorakit.merge(model)
        assert torch.allclose(out(), adapted, atol=ATOL)
        with lorakit.disabled(model):
            assert not torch.allclose(out(), adapted, atol=1e-3)


# ------------------------------------------------------------------------------------------- PEFT parity
peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_pair(orth=0.5, **peft_kw):
    from peft import AdaLoraConfig, get_peft_model

    base = tiny_llama(seed=3, hidden=32)
    kw = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, total_step=10,
              orth_reg_weight=orth)
    kw.update(peft_kw)
    pm = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**kw))
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(method="adalora", r=kw["init_r"], target_r=kw["target_r"], alpha=8,
                                       targets=TARGETS, total_steps=kw["total_step"], t_init=kw.get("tinit", 0),
                                       t_final=kw.get("tfinal", 0), delta_t=kw.get("deltaT", 1), orth_reg=orth))
    return base, pm, ours


def _peft_param(pm, path, name):
    return dict(pm.named_parameters())[f"base_model.model.{path}.lora_{name}.default"]


def _copy_peft_to_ours(pm, ours):
    n = 0
    for path, a in adapters(ours).items():
        for name in ("A", "E", "B"):
            with torch.no_grad():
                getattr(a, name).copy_(_peft_param(pm, path, name))
        n += 1
    return n


def test_outputs_equal_peft_with_identical_weights_and_rank_masks():
    base, pm, ours = _peft_pair()
    g = torch.Generator().manual_seed(4)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if "lora_E" in name:  # a rank mask: two of four triplets off, differently per layer
                    off = torch.randperm(4, generator=g)[:2]
                    p[off] = 0.0
    assert _copy_peft_to_ours(pm, ours) == 2 * len(TARGETS)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    pm.eval(), ours.eval()
    with torch.no_grad():
        ref, got, plain = pm(ids).logits, ours(ids).logits, base(ids).logits
    assert (ref - plain).abs().max() > 1e-3
    assert torch.allclose(got, ref, atol=ATOL)
    with torch.no_grad():
        lorakit.merge(ours)
        assert torch.allclose(ours(ids).logits, pm.merge_and_unload()(ids).logits, atol=ATOL)


def test_orthogonal_regulariser_equals_peft():
    _, pm, ours = _peft_pair(orth=0.5)
    g = torch.Generator().manual_seed(5)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    _copy_peft_to_ours(pm, ours)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    with torch.no_grad():
        # AdaLoraModel.forward adds the term to outputs.loss; its inner model is the same network without it
        peft_reg = pm.base_model(input_ids=ids, labels=ids).loss - pm.base_model.model(input_ids=ids, labels=ids).loss
    assert float(peft_reg) > 0.1
    ours_reg = lorakit.regularization_loss(ours)
    assert ours_reg.requires_grad and ours_reg.dim() == 0
    assert abs(ours_reg.item() - peft_reg.item()) < ATOL
    # and the plain formula: 0.5 · mean over the 12 matrices of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F
    terms = []
    for a in adapters(ours).values():
        A, B = a.A.detach(), a.B.detach()
        terms.append(torch.sqrt(((A @ A.t() - torch.eye(4)) ** 2).sum()))
        terms.append(torch.sqrt(((B.t() @ B - torch.eye(4)) ** 2).sum()))
    assert abs(ours_reg.item() - 0.5 * float(sum(terms)) / len(terms)) < ATOL


def test_rank_allocation_equals_peft_step_by_step():
    T = 8
    _, pm, ours = _peft_pair(tinit=1, tfinal=2, deltaT=1, total_step=T)
    hooks = lorakit.training_hooks(ours)
    g = torch.Generator().manual_seed(6)
    peft_params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    for step in range(1, T + 3):
        # identical weights and gradients on both sides, then one allocation step each
        for n, p in peft_params.items():
            w, grad = torch.randn(p.shape, generator=g), torch.randn(p.shape, generator=g)
            with torch.no_grad():
                p.copy_(w)
            p.grad = grad.clone()
        for path, a in adapters(ours).items():
            for name in ("A", "E", "B"):
                src = _peft_param(pm, path, name)
                with torch.no_grad():
                    getattr(a, name).copy_(src)
                getattr(a, name).grad = src.grad.clone()
        pm.base_model.update_and_allocate(step)
        hooks.after_step()
        kept = 0
        for path, a in adapters(ours).items():
            peft_e = _peft_param(pm, path, "E").detach()
            assert torch.equal(a.E.detach() == 0, peft_e == 0), f"step {step}, {path}"
            assert torch.equal(a.E.detach(), peft_e)
            kept += int((a.E != 0).sum())
        budget, mask = budget_schedule(step, 4 * 6, 2 * 6, 1, 2, T, 1)
        if mask:
            assert kept == budget
    pattern = pm.peft_config["default"].rank_pattern
    for path, a in adapters(ours).items():
        key = next(k for k in pattern if k.startswith(f"{path}.lora_E"))
        assert a.final_keep.tolist() == pattern[key]


# ------------------------------------------------------------------------------------------- training
def _lm_batches(seed=0, n=8, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def test_tiny_llama_trains_in_a_plain_loop():
    model = tiny_llama(seed=0, hidden=32).train()
    lorakit.attach(model, AdapterConfig(method="adalora", r=4, target_r=2, total_steps=15, t_init=3, t_final=4,
                                        alpha=16, targets=["q_proj", "v_proj", "up_proj", "down_proj"]))
    rows = _lm_batches()
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    hooks = lorakit.training_hooks(model)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        (loss + lorakit.regularization_loss(model)).backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
        losses.append(loss.item())
    hooks.finish()
    assert losses[-1] < losses[0] - 0.05
    assert sum(rank_report(model).values()) == 2 * 8


def test_tiny_llama_trains_with_transformers_trainer_and_callback(tmp_path):
    from transformers import TrainingArguments

    from lorakit.train.callbacks import LorakitCallback, LorakitTrainer

    model = tiny_llama(seed=0, hidden=32)
    lorakit.attach(model, AdapterConfig(method="adalora", r=4, target_r=2, total_steps=15, t_init=3, t_final=4,
                                        alpha=16, targets=["q_proj", "v_proj", "up_proj", "down_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=15, per_device_train_batch_size=8,
                             learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = LorakitTrainer(model=model, args=args, train_dataset=_lm_batches())
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LorakitCallback))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 15 and losses[-1] < losses[0] - 0.05
    assert callback.hooks.step == 15
    ranks = rank_report(model)
    assert sum(ranks.values()) == 2 * 8 and len(set(ranks.values())) > 1  # re-allocated, not uniform
    assert registry(model).configs["default"].final_ranks == ranks


def test_lorakit_trainer_drives_the_hooks(tmp_path):
    from lorakit.train.trainer import TrainConfig, Trainer

    model = mlp()
    lorakit.attach(model, ada(total_steps=6, t_init=1, t_final=2))
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(12, generator=g), "y": torch.randn(6, generator=g)} for _ in range(16)]
    loss = lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"])  # noqa: E731
    Trainer(model, TrainConfig(steps=6, batch_size=4, progress=False, output_dir=str(tmp_path)), data,
            loss_fn=loss).train()
    assert sum(rank_report(model).values()) == 6
    fresh = mlp()
    lorakit.load(fresh, tmp_path / "adapter")
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_lorakit_trainer_resume_is_exact_with_importance_state(tmp_path):
    from lorakit.train.trainer import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(12, generator=g), "y": torch.randn(6, generator=g)} for _ in range(16)]
    loss = lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"])  # noqa: E731

    def run(out, **kw):
        model = mlp()
        lorakit.attach(model, ada(total_steps=16, t_init=2, t_final=4, seed=0))
        Trainer(model, TrainConfig(steps=16, batch_size=4, lr=1e-2, progress=False, output_dir=str(out), **kw),
                data, loss_fn=loss).train()
        return model

    # (without the importance averages in the checkpoint, the resumed parameters differ from the full run's)
    full = run(tmp_path / "full", save_every=6, keep_last=5)
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "ckpt-6"))
    assert rank_report(full) == rank_report(resumed)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw, field", [
    (dict(target_r=None), "target_r"),
    (dict(total_steps=None), "total_steps"),
    (dict(t_init=6, t_final=4), "t_init"),
    (dict(target_r=5), "target_r"),
    (dict(scaling="rslora"), "scaling"),
    (dict(beta1=1.0), "beta1"),
    (dict(orth_reg=-1.0), "orth_reg"),
    (dict(delta_t=0), "delta_t"),
    (dict(init="gaussian"), "init"),
    (dict(final_ranks={"0": -1}), "final_ranks"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}="):
        ada(**kw)


def test_budget_above_initial_ranks_is_refused_before_any_change():
    model = mlp()
    cfg = ada(r=4, target_r=3, rank_pattern={"0": 1, "2": 1})  # initial 1+1+4 = 6 < 3·3 = 9
    with pytest.raises(ValueError, match="target_r"):
        lorakit.attach(model, cfg)
    assert lorakit.adapter_names(model) == [] and isinstance(model[0], nn.Linear)


def test_config_json_round_trip_with_final_ranks():
    cfg = ada(final_ranks={"0": 3, "2": 0})
    assert AdapterConfig.from_json(cfg.to_json()) == cfg
