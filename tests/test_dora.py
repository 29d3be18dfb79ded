"""DoRA against its definition (methods.md §6), PEFT on identical weights, and the engine's verbs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ConvNet, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.layers import AdaptedLayer, UnsupportedLayer
from lorakit.methods.dora import DoraAdapter
from lorakit.model import adapted_layers

ATOL = 1e-5


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def randomise(model, name="default", seed=3, scale=0.3):
    """Non-zero B (A is already random) and magnitudes moved away from ‖W‖, so every term of DoRA matters."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        ad = layer.adapters[name]
        with torch.no_grad():
            ad.B.copy_(torch.randn(ad.B.shape, generator=g) * scale)
            if hasattr(ad, "magnitude"):
                ad.magnitude.mul_(1 + 0.3 * torch.randn(ad.magnitude.shape, generator=g))


def dense_dora(w, a, b, s, m, detach=True):
    """The definition, written plainly: W' = m ⊙ V / ‖V‖_row, V = W + s·B A."""
    v = w + s * b @ a
    norm = v.norm(dim=1, keepdim=True)
    if detach:
        norm = norm.detach()
    return m[:, None] * v / norm


def reference_linear(layer, x, detach=True):
    ad = layer.adapters["default"]
    w = dense_dora(layer.base.weight, ad.A, ad.B, ad.scaling, ad.magnitude, detach)
    return F.linear(x, w, layer.base.bias)


# ------------------------------------------------------------------------------------------------ definition
def test_forward_equals_reference_formula_linear():
    net = mlp()
    x = torch.randn(5, 12)
    y0 = net(x)
    lorakit.attach(net, AdapterConfig(method="dora", r=3, alpha=6, targets=["0", "2"]))
    ad = net[0].adapters["default"]
    assert torch.allclose(ad.magnitude, net[0].base.weight.norm(dim=1))  # m starts at ‖W‖_row
    assert torch.allclose(net(x), y0, atol=ATOL)  # B = 0: unchanged at attach
    randomise(net)
    ref = reference_linear(net[0], x)
    assert (ref - F.linear(x, net[0].base.weight, net[0].base.bias)).abs().max() > 1e-2
    assert torch.allclose(net[0](x), ref, atol=ATOL)
    with torch.no_grad():  # eval/no-grad path (in-place arithmetic, cached norm) gives the same numbers
        assert torch.allclose(net[0](x), ref, atol=ATOL)
        assert torch.allclose(net[0](x), ref, atol=ATOL)


def test_conv1d_forward_and_merge_follow_the_transposed_weight():
    gpt = tiny_gpt2()
    lorakit.attach(gpt, AdapterConfig(method="dora", r=2, alpha=4, targets=["c_attn"]))
    randomise(gpt, scale=0.1)
    layer = gpt.transformer.h[0].attn.c_attn
    ad = layer.adapters["default"]
    w = layer.base.weight.t()  # Conv1D stores [in, out]
    x = torch.randn(2, 5, 32)
    ref = F.linear(x, dense_dora(w, ad.A, ad.B, ad.scaling, ad.magnitude), layer.base.bias)
    assert torch.allclose(layer(x), ref, atol=ATOL)
    lorakit.merge(gpt)
    assert torch.allclose(layer(x), ref, atol=ATOL)
    lorakit.unmerge(gpt)
    assert torch.allclose(layer.base.weight, w.t(), atol=1e-6)


def test_conv2d_forward_reference_and_magnitude_per_output_channel():
    net = ConvNet()
    lorakit.attach(net, AdapterConfig(method="dora", r=2, alpha=4, targets=["conv"]))
    randomise(net, scale=0.2)
    layer = net.conv
    ad = layer.adapters["default"]
    w = layer.base.weight  # [6, 3, 3, 3]: one norm per output channel over (in, kh, kw)
    w2 = dense_dora(w.reshape(6, -1), ad.A, ad.B, ad.scaling, ad.magnitude).reshape(w.shape)
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(layer(x), F.conv2d(x, w2, layer.base.bias, padding=1), atol=ATOL)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.conv2d(x, w2, layer.base.bias, padding=1), atol=ATOL)


def test_dropout_enters_the_branch_and_the_rescaled_base_term():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=3, dropout=0.5, targets=["0"]))
    randomise(net)
    layer, x = net[0], torch.randn(6, 12)
    ad = layer.adapters["default"]
    net.train()
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    xd = F.dropout(x, 0.5, training=True)  # the same mask the adapter drew
    w, b = layer.base.weight, layer.base.bias
    c = ad.magnitude / (w + ad.scaling * ad.B @ ad.A).norm(dim=1)
    # methods.md §6: y = x Wᵀ + (c − 1) ⊙ (x̃ Wᵀ) + c ⊙ s·(x̃ Aᵀ Bᵀ) + b
    ref = F.linear(x, w, b) + (c - 1) * F.linear(xd, w) + c * ad.scaling * (xd @ ad.A.t() @ ad.B.t())
    assert torch.allclose(got, ref, atol=ATOL)
    net.eval()
    assert torch.allclose(layer(x), reference_linear(layer, x), atol=ATOL)  # eval: no dropout


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("detach", [True, False])
def test_gradients_match_reference_autograd(detach):
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=3, alpha=6, targets=["0"], dora_detach_norm=detach))
    randomise(net)
    layer, x = net[0], torch.randn(7, 12)
    ad = layer.adapters["default"]
    net.train()
    target = torch.randn(7, 10)
    ((layer(x) - target) ** 2).sum().backward()
    got = {k: getattr(ad, k).grad.clone() for k in ("magnitude", "A", "B")}
    for p in ad.parameters():
        p.grad = None
    ((reference_linear(layer, x, detach=detach) - target) ** 2).sum().backward()
    for k, g in got.items():
        assert g.abs().sum() > 0, k
        assert torch.allclose(g, getattr(ad, k).grad, atol=1e-4, rtol=1e-4), k
    if detach:  # the norm's gradient really is cut: the non-detached reference differs for A and B
        for p in ad.parameters():
            p.grad = None
        ((reference_linear(layer, x, detach=False) - target) ** 2).sum().backward()
        assert not torch.allclose(got["B"], ad.B.grad, atol=1e-4)


def test_norm_matches_direct_norm_even_when_v_nearly_cancels_w():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=2, targets=["0"]))
    layer = net[0]
    ad = layer.adapters["default"]
    w = layer.base.weight.detach()
    with torch.no_grad():
        ad.B.normal_()
        # row 0: s·B A = −0.999·W_0 + small, so ‖V_0‖ ≈ 0.001‖W_0‖ (the Gram form alone would lose digits)
        u, sv, vh = torch.linalg.svd(w[:1])
        ad.A[0].copy_(vh[0])
        ad.B[0].zero_()
        ad.B[0, 0] = -0.999 * sv[0] / ad.scaling
    with torch.no_grad():
        direct = (w + ad.scaling * ad.B @ ad.A).norm(dim=1)  # the definition, in fp32 like the forward
        gram = (w.norm(dim=1) ** 2 + 2 * ad.scaling * (ad.B * (w @ ad.A.t())).sum(1)
                + ad.scaling ** 2 * ((ad.B @ ad.A @ ad.A.t()) * ad.B).sum(1)).clamp_min(0).sqrt()
        got = ad.weight_norm(layer)
    assert direct[0] < 1e-2 * w[0].norm()
    assert not torch.allclose(gram[0], direct[0], rtol=1e-3)  # the Gram form alone is wrong on row 0 ...
    assert torch.allclose(got, direct, rtol=1e-5, atol=0)  # ... so that row is computed directly


# ------------------------------------------------------------------------------------------------ eval cache
def test_eval_norm_is_computed_once_and_refreshed_when_weights_change(monkeypatch):
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=2, targets=["0"]))
    randomise(net)
    layer, x = net[0], torch.randn(3, 12)
    ad = layer.adapters["default"]
    calls = []
    real = DoraAdapter._compute_norm
    monkeypatch.setattr(DoraAdapter, "_compute_norm", lambda self, *a: calls.append(1) or real(self, *a))
    net.eval()
    with torch.no_grad():
        y1 = layer(x)
        layer(x)
        layer(x)
    layer(x)  # eval mode with grad enabled also reuses it
    assert len(calls) == 1
    # an optimiser step changes B in place: the next eval forward sees it
    net.train()
    opt = torch.optim.AdamW(ad.parameters(), lr=0.1)
    layer(x).sum().backward()
    opt.step()
    net.eval()
    n_before = len(calls)
    with torch.no_grad():
        y2 = layer(x)
        assert torch.allclose(y2, reference_linear(layer, x), atol=ATOL)
    assert len(calls) == n_before + 1 and not torch.allclose(y1, y2)
    # the base weight changed in place
    with torch.no_grad():
        layer.base.weight.mul_(1.5)
        assert torch.allclose(layer(x), reference_linear(layer, x), atol=ATOL)
    # load_state_dict copies into the parameters in place
    state = {k: v * 0.5 for k, v in ad.state_dict().items()}
    ad.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference_linear(layer, x), atol=ATOL)
    # inference_mode caches are not reused where autograd needs real tensors
    with torch.inference_mode():
        layer(x)
    net.train()
    layer(x).sum().backward()
    assert ad.magnitude.grad is not None


def test_training_mode_recomputes_the_norm_each_forward(monkeypatch):
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=2, targets=["0"]))
    calls = []
    real = DoraAdapter._compute_norm
    monkeypatch.setattr(DoraAdapter, "_compute_norm", lambda self, *a: calls.append(1) or real(self, *a))
    net.train()
    x = torch.randn(3, 12)
    net[0](x)
    net[0](x)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------------ merge family
def test_merge_is_exact_and_unmerge_uses_the_cached_norm(llama, token_batch):
    lorakit.attach(llama, AdapterConfig(method="dora", r=4, alpha=8))
    randomise(llama, scale=0.05)
    w_before = {p: l.base.weight.clone() for p, l in adapted_layers(llama)}
    y = llama(token_batch).logits
    lorakit.merge(llama)
    assert torch.allclose(llama(token_batch).logits, y, atol=ATOL)
    # m changing while merged does not matter: unmerge divides by the c cached at merge time
    for _, layer in adapted_layers(llama):
        with torch.no_grad():
            layer.adapters["default"].magnitude.mul_(2.0)
    lorakit.unmerge(llama)
    for p, layer in adapted_layers(llama):
        assert torch.allclose(layer.base.weight, w_before[p], atol=1e-6)


def test_merge_keeps_rows_whose_magnitude_is_zero():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=2, targets=["0"]))
    randomise(net)
    w = net[0].base.weight.clone()
    with torch.no_grad():
        net[0].adapters["default"].magnitude[3] = 0.0  # W'/c cannot recover row 3
    x = torch.randn(4, 12)
    y = net(x)
    lorakit.merge(net)
    assert torch.allclose(net(x), y, atol=ATOL)
    lorakit.unmerge(net)
    assert torch.allclose(net[0].base.weight, w, atol=1e-6)


def test_stacked_with_lora_adds_dense_changes_and_merges_exactly_in_any_order():
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=2, targets=["0"]), name="lo")
    lorakit.attach(net, AdapterConfig(method="dora", r=2, targets=["0"]), name="do")
    randomise(net, "lo", seed=1)
    randomise(net, "do", seed=2)
    layer, x = net[0], torch.randn(4, 12)
    lo, do = layer.adapters["lo"], layer.adapters["do"]
    w = layer.base.weight.detach().clone()
    d_do = dense_dora(w, do.A, do.B, do.scaling, do.magnitude) - w
    ref = F.linear(x, w + lo.delta_weight(layer) + d_do, layer.base.bias)
    assert torch.allclose(do.delta_weight(layer), d_do, atol=ATOL)
    for order in (["lo", "do"], ["do", "lo"]):
        lorakit.set_active(net, order)
        assert torch.allclose(layer(x), ref, atol=ATOL), order
        lorakit.merge(net)
        assert torch.allclose(layer(x), ref, atol=ATOL), order
        lorakit.unmerge(net)
        assert torch.allclose(layer.base.weight, w, atol=1e-6)
    lorakit.merge(net, "lo")  # merged separately: DoRA then normalises the weight it runs on
    lorakit.set_active(net, ["lo", "do"])
    y = layer(x)
    lorakit.merge(net, "do")
    assert torch.allclose(layer(x), y, atol=ATOL)
    lorakit.unmerge(net)
    assert torch.allclose(layer.base.weight, w, atol=1e-6)


def test_unload_disabled_and_delete(llama, token_batch):
    base = copy.deepcopy(llama)
    y0 = llama(token_batch).logits
    lorakit.attach(llama, AdapterConfig(method="dora", r=4, alpha=8, targets=["q_proj", "up_proj"]))
    randomise(llama, scale=0.05)
    y1 = llama(token_batch).logits
    assert (y1 - y0).abs().max() > 1e-3
    with lorakit.disabled(llama):
        assert torch.allclose(llama(token_batch).logits, y0, atol=ATOL)
    merged = lorakit.unload(copy.deepcopy(llama), merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert torch.allclose(merged(token_batch).logits, y1, atol=ATOL)
    lorakit.merge(llama)
    with lorakit.disabled(llama):
        assert torch.allclose(llama(token_batch).logits, y0, atol=ATOL)
    lorakit.delete(llama, "default")
    assert torch.allclose(llama(token_batch).logits, y0, atol=ATOL)
    assert llama.state_dict().keys() == base.state_dict().keys()


def test_bf16_base_adapters_train_in_fp32_and_merge_in_fp32():
    net = mlp().to(torch.bfloat16)
    lorakit.attach(net, AdapterConfig(method="dora", r=2, targets=["0"]))
    layer = net[0]
    ad = layer.adapters["default"]
    assert ad.A.dtype == ad.magnitude.dtype == torch.float32
    randomise(net)
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), dense_dora(layer.base.weight.float(), ad.A, ad.B, ad.scaling, ad.magnitude),
                   layer.base.bias.float())
    assert torch.allclose(y.float(), ref, atol=3e-2, rtol=2e-2)
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    y.float().sum().backward()
    assert ad.magnitude.grad is not None and ad.magnitude.grad.dtype == torch.float32
    expected = dense_dora(layer.base.weight.float(), ad.A, ad.B, ad.scaling, ad.magnitude).to(torch.bfloat16)
    lorakit.merge(net)
    assert torch.equal(layer.base.weight, expected)  # merged in fp32, rounded once


# ------------------------------------------------------------------------------------------------ route
@pytest.mark.parametrize("train", [False, True])
def test_route_mixes_dora_lora_and_base_per_example(llama, token_batch, train):
    base = copy.deepcopy(llama)
    lorakit.attach(llama, AdapterConfig(method="dora", r=2, targets=["q_proj", "v_proj", "down_proj"]), name="d")
    lorakit.attach(llama, AdapterConfig(r=2, targets=["q_proj", "down_proj"]), name="l")
    lorakit.attach(llama, AdapterConfig(method="dora", r=3, targets=["q_proj"]), name="e")
    for n, seed in (("d", 1), ("l", 2), ("e", 3)):
        randomise(llama, n, seed=seed, scale=0.05)
    lorakit.set_trainable(llama, ["d", "l", "e"])
    llama.train(train)
    names = ["d", None, "l", "e"]
    batch = torch.cat([token_batch, token_batch[:1]])
    with lorakit.route(llama, names):
        routed = llama(batch).logits
    for i, n in enumerate(names):
        if n is None:
            ref = base.train(train)(batch[i:i + 1]).logits
        else:
            lorakit.set_active(llama, n)
            ref = llama(batch[i:i + 1]).logits
        assert torch.allclose(routed[i:i + 1], ref, atol=ATOL), n
    if train:
        for p in llama.parameters():
            p.grad = None
        with lorakit.route(llama, names):
            llama(batch).logits[0].sum().backward()
        q = llama.model.layers[0].self_attn.q_proj
        assert q.adapters["d"].magnitude.grad.abs().sum() > 0
        assert q.adapters["e"].magnitude.grad is None or q.adapters["e"].magnitude.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------------ combine
def _two_doras():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=2, alpha=4, targets=["0", "2"]), name="a")
    lorakit.attach(net, AdapterConfig(method="dora", r=3, alpha=3, targets=["0"]), name="b")
    randomise(net, "a", seed=1)
    randomise(net, "b", seed=2)
    return net


def test_combine_cat_is_exactly_the_weighted_sum_of_dense_changes_with_its_magnitudes():
    net = _two_doras()
    layer = net[0]
    a, b = layer.adapters["a"], layer.adapters["b"]
    w = layer.base.weight.detach().clone()
    da = dense_dora(w, a.A, a.B, a.scaling, a.magnitude) - w
    db = dense_dora(w, b.A, b.B, b.scaling, b.magnitude) - w
    mixed = w + 0.7 * da - 0.4 * db
    lorakit.combine(net, {"a": 0.7, "b": -0.4}, name="mix", how="cat")
    mix = layer.adapters["mix"]
    assert isinstance(mix, DoraAdapter) and mix.r == 5
    # the magnitude of the mix is the row norm of the mixed weight (not an average of m_a, m_b)
    assert torch.allclose(mix.magnitude, mixed.norm(dim=1), atol=1e-5)
    assert torch.allclose(mix.delta_weight(layer), mixed - w, atol=ATOL)
    lorakit.set_active(net, "mix")
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), F.linear(x, mixed, layer.base.bias), atol=ATOL)
    # a layer only "a" adapts gets 0.7·ΔW_a
    l2 = net[2]
    w2 = l2.base.weight.detach()
    d2 = dense_dora(w2, l2.adapters["a"].A, l2.adapters["a"].B, l2.adapters["a"].scaling,
                    l2.adapters["a"].magnitude) - w2
    assert torch.allclose(l2.adapters["mix"].delta_weight(l2), 0.7 * d2, atol=ATOL)


def test_combine_svd_keeps_exact_magnitudes_and_truncates_the_direction(tmp_path):
    net = _two_doras()
    layer = net[0]
    w = layer.base.weight.detach().clone()
    a, b = layer.adapters["a"], layer.adapters["b"]
    mixed = w + 0.5 * (dense_dora(w, a.A, a.B, a.scaling, a.magnitude) - w) \
        + 0.5 * (dense_dora(w, b.A, b.B, b.scaling, b.magnitude) - w)
    lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="svd", how="svd", rank=2)
    mix = layer.adapters["svd"]
    assert mix.r == 2 and mix.A.shape == (2, 12)
    assert torch.allclose(mix.magnitude, mixed.norm(dim=1), atol=1e-5)
    # the merged weight's row norms equal the exact mixture's row norms
    got = mix.delta_weight(layer) + w
    assert torch.allclose(got.norm(dim=1), mixed.norm(dim=1), atol=1e-5)
    assert (got - mixed).abs().max() < (w - mixed).abs().max()  # and it approximates the mix
    lorakit.set_active(net, "svd")
    x = torch.randn(3, 12)
    y = net(x)
    lorakit.save(net, tmp_path / "svd", names="svd")
    fresh = mlp()
    lorakit.load(fresh, tmp_path / "svd")
    assert isinstance(fresh[0].adapters["svd"], DoraAdapter)
    assert torch.allclose(fresh(x), y, atol=ATOL)


def test_combine_linear_is_refused_and_nothing_changes():
    net = _two_doras()
    with pytest.raises(ValueError, match="linear.*DoRA"):
        lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="lin", how="linear")
    assert lorakit.adapter_names(net) == ["a", "b"]
    assert list(net[0].adapters) == ["a", "b"]


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(llama, token_batch, tmp_path):
    base = copy.deepcopy(llama)
    lorakit.attach(llama, AdapterConfig(method="dora", r=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj"],
                                        dora_detach_norm=False), name="x")
    randomise(llama, "x", scale=0.05)
    y = llama(token_batch).logits
    folder = lorakit.save(llama, tmp_path / "ad")
    meta = json.loads((folder / "lorakit_config.json").read_text())
    assert meta["adapters"]["x"]["config"]["method"] == "dora"
    assert meta["adapters"]["x"]["config"]["dora_detach_norm"] is False
    fresh = copy.deepcopy(base)
    lorakit.load(fresh, folder, trainable=True)
    ad = fresh.model.layers[0].self_attn.q_proj.adapters["x"]
    assert isinstance(ad, DoraAdapter) and ad.detach_norm is False and ad.magnitude.requires_grad
    assert torch.allclose(fresh(token_batch).logits, y, atol=ATOL)


def test_pissa_init_keeps_output_and_magnitude_matches_original_weight():
    net = mlp()
    x = torch.randn(5, 12)
    y0 = net(x)
    w = net[0].weight.detach().clone()
    lorakit.attach(net, AdapterConfig(method="dora", r=3, alpha=6, init="pissa", targets=["0"]))
    layer = net[0]
    ad = layer.adapters["default"]
    assert not torch.allclose(layer.base.weight, w, atol=1e-3)  # the base now holds the residual
    assert torch.allclose(ad.magnitude, w.norm(dim=1), atol=1e-5)  # = ‖W_res + s·B0A0‖ = ‖W‖
    assert torch.allclose(net(x), y0, atol=ATOL)
    randomise(net)
    ref = F.linear(x, dense_dora(layer.base.weight, ad.A, ad.B, ad.scaling, ad.magnitude), layer.base.bias)
    assert torch.allclose(layer(x), ref, atol=ATOL)
    with lorakit.disabled(net):
        assert torch.allclose(net(x), y0, atol=ATOL)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_option_and_embedding_are_refused_before_any_change(llama, token_batch):
    with pytest.raises(ValueError, match="dora_detach_norm"):
        AdapterConfig(method="dora", dora_detach_norm="yes")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(UnsupportedLayer, match="Embedding.*exclude"):
        lorakit.attach(llama, AdapterConfig(method="dora", targets=["q_proj", "embed_tokens"]))
    assert not any(isinstance(m, AdaptedLayer) for m in llama.modules())
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    with pytest.raises(ValueError, match="init"):
        AdapterConfig(method="dora", init="nope")


def test_dora_has_no_exact_lora_form_mixed_combine_uses_dense_svd():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="dora", r=2, targets=["0"]), name="d")
    lorakit.attach(net, AdapterConfig(r=2, targets=["0"]), name="l")
    randomise(net, "d", seed=1)
    randomise(net, "l", seed=2)
    with pytest.raises(ValueError, match="no exact low-rank"):
        lorakit.combine(net, {"d": 1.0, "l": 1.0}, name="m", how="cat")
    assert lorakit.adapter_names(net) == ["d", "l"]
    layer = net[0]
    full = layer.adapters["d"].delta_weight(layer) + layer.adapters["l"].delta_weight(layer)
    lorakit.combine(net, {"d": 1.0, "l": 1.0}, name="m", how="svd", rank=10)  # full rank: exact
    assert torch.allclose(layer.adapters["m"].delta_weight(layer), full, atol=1e-4)


def test_merged_dora_refuses_dense_change_and_combine():
    net = _two_doras()
    lorakit.merge(net, "a")
    with pytest.raises(ValueError, match="merged"):
        net[0].adapters["a"].delta_weight(net[0])
    with pytest.raises(ValueError, match="unmerge"):
        lorakit.combine(net, {"a": 1.0, "b": 1.0}, name="mix")
    assert lorakit.adapter_names(net) == ["a", "b"]


# ------------------------------------------------------------------------------------------------ PEFT parity
peft = pytest.importorskip("peft")


def _copy_from_peft(pm, ours, conv_shapes=False):
    params = dict(pm.named_parameters())
    n = 0
    for path, layer in adapted_layers(ours):
        ad = layer.adapters["default"]
        with torch.no_grad():
            ad.A.copy_(params[f"base_model.model.{path}.lora_A.default.weight"].reshape(ad.A.shape))
            ad.B.copy_(params[f"base_model.model.{path}.lora_B.default.weight"].reshape(ad.B.shape))
            ad.magnitude.copy_(params[f"base_model.model.{path}.lora_magnitude_vector.default.weight"].reshape(-1))
        n += 1
    return n


def _peft_dora(base, **kw):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, lora_dropout=0.0, **kw))
    g = torch.Generator().manual_seed(5)
    for name, p in pm.named_parameters():
        with torch.no_grad():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return pm.eval()


def test_logits_equal_peft_dora_on_identical_weights_and_after_merge():
    base = tiny_llama(seed=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    pm = _peft_dora(base, r=4, lora_alpha=8, target_modules="all-linear")
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(method="dora", r=4, alpha=8))
    assert _copy_from_peft(pm, ours) == 14
    with torch.no_grad():
        ref = pm(ids).logits
        got = ours(ids).logits
        assert (ref - base(ids).logits).abs().max() > 1e-3
    assert torch.allclose(got, ref, atol=ATOL)
    pm_merged = pm.merge_and_unload()
    lorakit.merge(ours)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, pm_merged(ids).logits, atol=ATOL)
        assert torch.allclose(ours(ids).logits, ref, atol=ATOL)


def test_conv1d_and_conv2d_equal_peft_dora():
    gpt = tiny_gpt2()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    pm = _peft_dora(gpt, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ours = copy.deepcopy(gpt)
    lorakit.attach(ours, AdapterConfig(method="dora", r=4, alpha=8, targets=["c_attn", "c_fc"]))
    assert _copy_from_peft(pm, ours) == 4
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, pm(ids).logits, atol=ATOL)
    net = ConvNet().eval()
    pm = _peft_dora(net, r=2, lora_alpha=4, target_modules=["conv", "conv2"])
    ours = copy.deepcopy(net)
    lorakit.attach(ours, AdapterConfig(method="dora", r=2, alpha=4, targets=["conv", "conv2"]))
    assert _copy_from_peft(pm, ours) == 2
    img, tok = torch.randn(2, 3, 5, 5), torch.randint(0, 20, (2, 4))
    with torch.no_grad():
        ref = pm(img, tok)
        assert (ref - net(img, tok)).abs().max() > 1e-4
        assert torch.allclose(ours(img, tok), ref, atol=ATOL)


def test_gradients_equal_peft_dora():
    base = tiny_llama(seed=4, layers=1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    pm = _peft_dora(base, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(method="dora", r=4, alpha=8, targets=["q_proj", "up_proj"]))
    _copy_from_peft(pm, ours)
    pm.train()
    ours.train()
    pm(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    theirs = dict(pm.named_parameters())
    for path, layer in adapted_layers(ours):
        ad = layer.adapters["default"]
        pre = f"base_model.model.{path}"
        assert torch.allclose(ad.magnitude.grad, theirs[f"{pre}.lora_magnitude_vector.default.weight"].grad,
                              atol=1e-6)
        assert torch.allclose(ad.B.grad, theirs[f"{pre}.lora_B.default.weight"].grad, atol=1e-6)
        assert torch.allclose(ad.A.grad, theirs[f"{pre}.lora_A.default.weight"].grad, atol=1e-6)


# ------------------------------------------------------------------------------------------------ training
def test_tiny_llama_trains_with_dora():
    torch.manual_seed(0)
    model = tiny_llama(seed=0, hidden=32, layers=2)
    lorakit.attach(model, AdapterConfig(method="dora", r=4, alpha=8, seed=0))
    model.train()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m0 = model.model.layers[0].self_attn.q_proj.adapters["default"].magnitude.detach().clone()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.adapters["default"].magnitude, m0)


@pytest.mark.parametrize("bias,tokens", [(True, 4), (False, 4), (True, 9)])  # 2·9 tokens > 12 inputs: other branch
def test_fused_linear_path_equals_the_generic_path_in_values_and_gradients(bias, tokens):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10, bias=bias))
    lorakit.attach(net, AdapterConfig(method="dora", r=3, alpha=6, targets=["0"]))
    randomise(net)
    layer, ad = net[0], net[0].adapters["default"]
    net.train()
    x = torch.randn(2, tokens, 12, requires_grad=True)
    target = torch.randn(2, tokens, 10)
    results = []
    for run in ("fused", "generic"):
        for p in list(ad.parameters()) + [x]:
            p.grad = None
        out = ad.fused_forward(layer, x) if run == "fused" else ad.apply(layer, x, layer.base(x))
        assert out is not None
        ((out - target) ** 2).sum().backward()
        results.append((out.detach(), x.grad.clone(), *(p.grad.clone() for p in (ad.magnitude, ad.A, ad.B))))
    ref = F.linear(x, dense_dora(layer.base.weight, ad.A, ad.B, ad.scaling, ad.magnitude), layer.base.bias)
    assert torch.allclose(results[0][0], ref, atol=ATOL)
    for f, g in zip(*results):
        assert torch.allclose(f, g, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(ad.fused_forward(layer, x), ref, atol=ATOL)
    # not applicable: dropout in training, or a norm that keeps its gradient
    ad.detach_norm = False
    assert ad.fused_forward(layer, x) is None
