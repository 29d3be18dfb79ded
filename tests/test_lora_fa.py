"""LoRA-FA against its definition (methods.md §5), PEFT (LoRA with A frozen + LoraFAOptimizer), and its memory claim."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ConvNet, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.methods import lora_fa as lora_fa_module
from lorakit.methods.lora_fa import LoraFAAdapter, LoraFAOptimizer, frozen_a, lora_fa_optimizer
from lorakit.model import adapted_layers

ATOL = 1e-5
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def randomise_b(model, name="default", seed=3, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                b = layer.adapters[name].B
                b.copy_(torch.randn(b.shape, generator=g) * scale)


def lora_reference(x, layer, ad):
    """Plain LoRA formula: x Wᵀ + bias + s·(x Aᵀ) Bᵀ."""
    return F.linear(x, layer.base.weight, layer.base.bias) + ad.scaling * (x @ ad.A.t()) @ ad.B.t()


# ------------------------------------------------------------------------------------------------ init
def test_a_is_random_frozen_and_regenerable_b_is_zero():
    net = mlp()
    x = torch.randn(4, 12)
    before = net(x)
    lorakit.attach(net, AdapterConfig(method="lora_fa", r=3, alpha=6, targets=["0", "2"], seed=1))
    for _, layer in adapted_layers(net):
        ad = layer.adapters["default"]
        assert not ad.A.requires_grad and ad.B.requires_grad
        assert ad.A.abs().min() > 0 and torch.equal(ad.B, torch.zeros_like(ad.B))
        bound = 1 / math.sqrt(ad.in_features)  # Kaiming-uniform a=sqrt(5): U(±1/sqrt(in))
        assert ad.A.abs().max() <= bound
        assert torch.equal(ad.A, frozen_a(3, ad.in_features, int(ad.A_seed)))
    assert torch.equal(net(x), before)
    assert lorakit.trainable_parameters(net)[0] == 10 * 3 + 6 * 3  # Σ r·out: B only
    assert net[0].adapters["default"].A_seed != net[2].adapters["default"].A_seed
    lorakit.set_trainable(net, "default")  # re-enabling training never unfreezes A
    assert not net[0].adapters["default"].A.requires_grad and net[0].adapters["default"].B.requires_grad


def test_gaussian_init_and_embedding_put_randomness_in_a():
    net = ConvNet()
    lorakit.attach(net, AdapterConfig(method="lora_fa", r=4, targets=["emb", "conv", "fc"], init="gaussian", seed=0))
    emb = net.emb.adapters["default"]
    assert emb.A.abs().min() > 0 and torch.equal(emb.B, torch.zeros_like(emb.B))  # not LoRA's embedding A = 0
    fc = net.fc.adapters["default"]
    assert torch.equal(fc.A, torch.randn(4, fc.in_features, generator=torch.Generator().manual_seed(
        int(fc.A_seed))) / 4)


# ------------------------------------------------------------------------------------------------ forward
def test_forward_and_gradients_equal_the_formula():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="lora_fa", r=3, alpha=6, targets=["0", "2"]))
    randomise_b(net)
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = net(x)
    l0, l2 = net[0], net[2]
    a0, a2 = l0.adapters["default"], l2.adapters["default"]
    ref = lora_reference(torch.relu(lora_reference(x, l0, a0)), l2, a2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, a0.B, a2.B], g)
    want = torch.autograd.grad(ref, [x, a0.B, a2.B], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # B's gradient is s·gᵀz with z = x Aᵀ (written out for the last layer)
    h = torch.relu(lora_reference(x, l0, a0)).detach()
    torch.testing.assert_close(got[2], a2.scaling * g.reshape(-1, 6).t() @ (h @ a2.A.t()).reshape(-1, 3),
                               atol=ATOL, rtol=0)


def test_dropout_mask_is_regenerated_not_stored(monkeypatch):
    masks = []
    real = lora_fa_module._mask

    def recording(like, p, seed):
        m = real(like, p, seed)
        masks.append(m.clone())
        return m

    monkeypatch.setattr(lora_fa_module, "_mask", recording)
    layer_net = nn.Sequential(nn.Linear(40, 8))
    lorakit.attach(layer_net, AdapterConfig(method="lora_fa", r=4, dropout=0.5, targets=["0"]))
    layer_net.train()
    randomise_b(layer_net)
    layer, ad = layer_net[0], layer_net[0].adapters["default"]
    x = torch.randn(3, 40, requires_grad=True)
    out = layer_net(x)
    assert len(masks) == 1
    m = masks[0]
    assert set(m.unique().tolist()) == {0.0, 2.0} and 0.3 < (m == 0).float().mean() < 0.7
    ref = F.linear(x, layer.base.weight, layer.base.bias) + ad.scaling * ((x * m) @ ad.A.t()) @ ad.B.t()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, ad.B], g)
    assert len(masks) == 2 and torch.equal(masks[1], m)  # backward redrew the same mask
    want = torch.autograd.grad(ref, [x, ad.B], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    layer_net.eval()
    with torch.no_grad():  # eval: no dropout at all
        torch.testing.assert_close(layer_net(x), lora_reference(x, layer, ad), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ memory
def _saved_activation_bytes(model, ids):
    """Bytes of distinct storages autograd keeps for backward, leaving out the model's own weights."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned and s.data_ptr() != 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bytes_saved_for_backward_are_the_floor_plus_z(dropout):
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))

    def build(method):
        m = copy.deepcopy(base)
        if method is None:
            for p in m.parameters():
                p.requires_grad_(False)
        else:
            lorakit.attach(m, AdapterConfig(method=method, r=4, dropout=dropout))
        # every variant back-propagates to the embedding output, so all do the same base work
        m.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        return m.train()

    floor = _saved_activation_bytes(build(None), ids)
    fa = _saved_activation_bytes(build("lora_fa"), ids)
    lora = _saved_activation_bytes(build("lora"), ids)
    tokens, n_layers, r = ids.numel(), 14, 4
    assert fa == floor + n_layers * tokens * r * 4  # exactly one fp32 z (tokens x r) per adapted layer, no x, no mask
    assert lora > fa * 1.05
    assert fa <= 1.05 * floor


# ------------------------------------------------------------------------------------------------ PEFT parity
def _peft_lora(base, r, alpha):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                                        lora_dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)  # PEFT's LoRA-FA: plain LoRA with A frozen (create_lorafa_optimizer)
    return pm


def _copy_into_peft(ours, pm):
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for path, layer in adapted_layers(ours):
            ad = layer.adapters["default"]
            peft_params[f"base_model.model.{path}.lora_A.default.weight"].copy_(ad.A)
            peft_params[f"base_model.model.{path}.lora_B.default.weight"].copy_(ad.B)
    return peft_params


def test_logits_and_gradients_equal_peft_lora_with_frozen_a():
    pytest.importorskip("peft")
    base = tiny_llama(seed=2)
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(method="lora_fa", r=4, alpha=8))
    randomise_b(ours, scale=0.05)
    pm = _peft_lora(base, 4, 8)
    peft_params = _copy_into_peft(ours, pm)
    ref, got = pm(IDS).logits, ours(IDS).logits
    with torch.no_grad():
        assert (ref - base(IDS).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    ref.square().mean().backward()
    got.square().mean().backward()
    for path, layer in adapted_layers(ours):
        ad = layer.adapters["default"]
        assert ad.A.grad is None
        torch.testing.assert_close(ad.B.grad, peft_params[f"base_model.model.{path}.lora_B.default.weight"].grad,
                                   atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        merged_ref = pm.merge_and_unload()(IDS).logits
        lorakit.merge(ours)
        torch.testing.assert_close(ours(IDS).logits, merged_ref, atol=ATOL, rtol=0)


def test_optimizer_equals_peft_lorafa_optimizer(monkeypatch):
    pytest.importorskip("peft")
    from peft.optimizers import create_lorafa_optimizer

    # PEFT projects under bf16 autocast when bf16 is available; compare the exact fp32 update
    monkeypatch.setattr("peft.optimizers.lorafa.is_bf16_available", lambda: False)
    base = tiny_llama(seed=3)
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(method="lora_fa", r=4, alpha=8))
    pm = _peft_lora(base, 4, 8)
    peft_params = _copy_into_peft(ours, pm)
    opt_ours = LoraFAOptimizer(ours, lr=1e-2, weight_decay=0.1)
    opt_peft = create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    ours.train(), pm.train()
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (pm, opt_peft)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for path, layer in adapted_layers(ours):
        ad = layer.adapters["default"]
        pb = peft_params[f"base_model.model.{path}.lora_B.default.weight"]
        assert ad.B.abs().max() > 0
        torch.testing.assert_close(ad.B, pb, atol=1e-6, rtol=1e-4)
        assert torch.equal(ad.A, frozen_a(4, ad.in_features, int(ad.A_seed)))  # A never moved


def test_optimizer_follows_the_written_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    lorakit.attach(net, AdapterConfig(method="lora_fa", r=2, alpha=6, targets=["0"], modules_to_save=["1"]))
    ad = net[0].adapters["default"]
    s, lr, wd, eps, (b1, b2), delta = ad.scaling, 0.05, 0.1, 1e-6, (0.9, 0.999), 1e-8
    opt = LoraFAOptimizer(net, lr=lr, weight_decay=wd)
    a = ad.A.detach().clone()
    pinv = torch.linalg.pinv(a @ a.t() + delta * torch.eye(2))
    b_ref, w_ref = ad.B.detach().clone(), net[1].weight.detach().clone()
    state = {"B": [torch.zeros_like(b_ref)] * 2, "W": [torch.zeros_like(w_ref)] * 2}
    for t in (1, 2):
        gb, gw = torch.randn(5, 2), torch.randn(3, 5)
        ad.B.grad, net[1].weight.grad = gb.clone(), gw.clone()
        net[1].bias.grad = None
        opt.step()
        for key, grad in (("B", gb @ pinv / s**2), ("W", gw)):  # LoRA-FA projection for B only
            m, v = state[key]
            m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad * grad
            state[key] = [m, v]
            step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            p = (b_ref if key == "B" else w_ref)
            p = p - step * m / (v.sqrt() + eps)
            p = p - lr * wd * p
            if key == "B":
                b_ref = p
            else:
                w_ref = p
        torch.testing.assert_close(ad.B.detach(), b_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(net[1].weight.detach(), w_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(ad.A, a)


def test_optimizer_bad_inputs():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="lora", r=2, targets=["0"]))
    with pytest.raises(ValueError, match="LoRA-FA adapter"):
        LoraFAOptimizer(net)
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="lora_fa", r=2, targets=["0"]))
    with pytest.raises(ValueError, match="lr=-1"):
        lora_fa_optimizer(net, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        LoraFAOptimizer(net, betas=(0.9, 1.0))


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip(tmp_path, save_projection):
    base = tiny_llama(seed=1)
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(method="lora_fa", r=4, alpha=8, save_projection=save_projection))
    randomise_b(model, scale=0.05)
    folder = lorakit.save(model, tmp_path / "ad")
    names = {k.rsplit("|", 1)[1] for k in load_file(str(folder / "lorakit_weights.safetensors"))}
    assert names == ({"A", "B", "A_seed"} if save_projection else {"B", "A_seed"})
    loaded = lorakit.load(copy.deepcopy(base), folder, trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    for (_, l1), (_, l2) in zip(adapted_layers(model), adapted_layers(loaded)):
        a1, a2 = l1.adapters["default"], l2.adapters["default"]
        assert torch.equal(a1.A, a2.A) and not a2.A.requires_grad and a2.B.requires_grad


def test_load_of_wrong_shapes_leaves_model_unchanged(tmp_path):
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="lora_fa", r=2, targets=["0", "2"]))
    folder = lorakit.save(net, tmp_path / "ad")
    other = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(lorakit.AdapterLoadError, match="shape"):
        lorakit.load(other, folder)
    assert lorakit.adapter_names(other) == [] and isinstance(other[2], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


# ------------------------------------------------------------------------------------------------ merge & co
def test_merge_unmerge_unload_route_disabled_and_combine():
    model = tiny_llama(seed=2)
    with torch.no_grad():
        base_logits = model(IDS).logits
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.attach(model, AdapterConfig(method="lora_fa", r=4, alpha=8, seed=1), name="a")
    lorakit.attach(model, AdapterConfig(method="lora_fa", r=2, alpha=2, seed=2), name="b")
    randomise_b(model, "a", seed=1, scale=0.1)
    randomise_b(model, "b", seed=2, scale=0.1)
    with torch.no_grad():
        lorakit.set_active(model, "a")
        la = model(IDS).logits
        lorakit.set_active(model, "b")
        lb = model(IDS).logits
        assert (la - lb).abs().max() > 1e-3
        with lorakit.disabled(model):
            torch.testing.assert_close(model(IDS).logits, base_logits, atol=0, rtol=0)
        with lorakit.route(model, ["a", "b"]):
            routed = model(IDS).logits
        torch.testing.assert_close(routed[0], la[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(routed[1], lb[1], atol=ATOL, rtol=0)
        lorakit.combine(model, {"a": 1.0, "b": 1.0}, name="ab", how="cat")
        lorakit.set_active(model, "ab")
        both = model(IDS).logits
        lorakit.set_active(model, ["a", "b"])
        torch.testing.assert_close(both, model(IDS).logits, atol=ATOL, rtol=0)
        lorakit.set_active(model, "a")
        lorakit.merge(model)
        torch.testing.assert_close(model(IDS).logits, la, atol=ATOL, rtol=0)
        lorakit.unmerge(model)
        for path, layer in adapted_layers(model):
            torch.testing.assert_close(layer.base.weight, w0[path + ".weight"], atol=1e-6, rtol=0)
        plain = lorakit.unload(model, merge=True)
        assert not any(isinstance(m, lorakit.AdaptedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(IDS).logits, la, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(init="init_b"), "incompatible with method='lora_fa'"),
    (dict(init="pissa"), "init='pissa' is not available"),
    (dict(init="orthogonal"), "init='orthogonal' is not available"),
    (dict(save_projection=1), "save_projection"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config_raises_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(method="lora_fa", **kwargs)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("optimizer", ["adamw", "lora_fa"])
def test_tiny_llama_trains_and_loss_goes_down(optimizer):
    model = tiny_llama(seed=0)
    lorakit.attach(model, AdapterConfig(method="lora_fa", r=8, alpha=16, dropout=0.05, seed=0))
    model.train()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    if optimizer == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    else:
        opt = LoraFAOptimizer(model, lr=1e-2)
    a0 = {p: l.adapters["default"].A.clone() for p, l in adapted_layers(model)}
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(layer.adapters["default"].A, a0[p]) for p, layer in adapted_layers(model))
    assert isinstance(next(iter(adapted_layers(model)))[1].adapters["default"], LoraFAAdapter)
