"""VeRA against its definition (methods.md §7) and against PEFT on identical weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ConvNet, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.methods.vera import VeraAdapter, VeraProjection, projection_pair
from lorakit.model import adapted_layers, registry

ATOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def randomise(model, name="default", seed=3, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def vera_reference(x, layer, adapter):
    """Plain VeRA formula: base(x) + b ⊙ (((x A_sh[:, :in]ᵀ) ⊙ d) B_sh[:out]ᵀ)."""
    a_sh, b_sh = adapter.shared.vera_A, adapter.shared.vera_B
    a, bm = a_sh[:, : adapter.in_features], b_sh[: adapter.out_features, :]
    z = x @ a.t()
    return layer.base(x) + adapter.lambda_b * ((z * adapter.lambda_d) @ bm.t())


# ------------------------------------------------------------------------------------------------ shared pair
def test_shared_pair_is_kaiming_uniform_drawn_a_then_b():
    a, b = projection_pair(8, 30, 20, key=5)
    gen = torch.Generator().manual_seed(5)
    bound_a, bound_b = (6 / 30) ** 0.5, (6 / 8) ** 0.5  # gain sqrt(2): U(±sqrt(6/fan)), fan = size(1)
    ref_a = torch.rand(8, 30, generator=gen) * 2 * bound_a - bound_a
    ref_b = torch.rand(20, 8, generator=gen) * 2 * bound_b - bound_b
    torch.testing.assert_close(a, ref_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(b, ref_b, atol=1e-6, rtol=0)
    assert not torch.equal(projection_pair(8, 30, 20, key=6)[0], a)


def test_pair_sized_for_largest_layer_and_sliced():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["0", "2"], seed=1))
    shared = registry(net).shared["default"]
    assert tuple(shared.vera_A.shape) == (4, 12) and tuple(shared.vera_B.shape) == (10, 4)
    assert not shared.vera_A.requires_grad and not shared.vera_B.requires_grad
    ad = net[2].adapters["default"]
    assert ad.shared is shared and net[0].adapters["default"].shared is shared  # one pair, not copies


# ------------------------------------------------------------------------------------------------ forward
def test_init_is_identity_and_vectors_start_at_d_initial_and_zero():
    net = mlp()
    x = torch.randn(5, 12)
    before = net(x)
    lorakit.attach(net, AdapterConfig(method="vera", r=6, targets=["0", "2"], d_initial=0.3))
    ad = net[0].adapters["default"]
    assert torch.equal(ad.lambda_d, torch.full((6,), 0.3)) and torch.equal(ad.lambda_b, torch.zeros(10))
    assert torch.equal(net(x), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_equal_the_formula(dtype):
    net = mlp().to(dtype)
    lorakit.attach(net, AdapterConfig(method="vera", r=5, targets=["0", "2"], seed=2))
    randomise(net)
    x = torch.randn(3, 4, 12, dtype=dtype, requires_grad=True)
    out = net(x)
    l0, l2 = net[0], net[2]
    h = vera_reference(x, l0, l0.adapters["default"])
    ref = vera_reference(torch.relu(h), l2, l2.adapters["default"])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # the lean backward gives the gradients of the plain formula (x, d and b of both layers)
    g = torch.randn_like(out)
    params = [x] + [p for _, lay in adapted_layers(net) for p in lay.adapters["default"].parameters()]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_conv1d_embedding_and_conv2d_follow_delta_weight():
    gpt = tiny_gpt2()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    lorakit.attach(gpt, AdapterConfig(method="vera", r=8, targets=["c_attn", "c_fc"]))
    randomise(gpt, scale=0.3)
    layer = gpt.transformer.h[0].attn.c_attn
    ad = layer.adapters["default"]
    x = torch.randn(2, 3, 32)
    want = layer.base(x) + x @ ad.delta_weight().t()
    torch.testing.assert_close(layer(x), want, atol=ATOL, rtol=0)
    # delta is diag(b) B diag(d) A, written out
    a, bm = ad.shared.vera_A[:, :32], ad.shared.vera_B[:96]
    dw = torch.diag(ad.lambda_b) @ bm @ torch.diag(ad.lambda_d) @ a
    torch.testing.assert_close(ad.delta_weight(), dw.detach(), atol=1e-6, rtol=0)
    with torch.no_grad():
        unmerged = gpt(ids).logits
        lorakit.merge(gpt)
        torch.testing.assert_close(gpt(ids).logits, unmerged, atol=ATOL, rtol=0)

    net = ConvNet()
    img, tok = torch.randn(2, 3, 5, 5), torch.randint(0, 20, (2, 4))
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["emb", "conv", "conv2"]))
    randomise(net, scale=0.3)
    assert tuple(registry(net).shared["default"].vera_A.shape) == (4, 27)  # max(in) = 3*3*3 conv patches
    with torch.no_grad():
        unmerged = net(img, tok)
        with lorakit.disabled(net):
            assert not torch.allclose(unmerged, net(img, tok), atol=1e-4)  # the adapters change the output
        lorakit.merge(net)
        torch.testing.assert_close(net(img, tok), unmerged, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ PEFT parity
def _peft_vera(base, r=16, key=3, save_projection=True):
    from peft import VeraConfig, get_peft_model

    cfg = VeraConfig(r=r, target_modules=LLAMA_TARGETS, projection_prng_key=key, save_projection=save_projection,
                     vera_dropout=0.0, d_initial=0.1)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def test_logits_gradients_and_shared_pair_equal_peft():
    pytest.importorskip("peft")
    base = tiny_llama(seed=4)
    pm = _peft_vera(base, r=16, key=3)
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(method="vera", r=16, targets=LLAMA_TARGETS, seed=3))
    shared = registry(ours).shared["default"]
    # same key -> bit-identical matrices
    assert torch.equal(shared.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, pm.base_model.vera_B["default"])
    peft_params = dict(pm.named_parameters())
    n = 0
    for path, layer in adapted_layers(ours):
        ad = layer.adapters["default"]
        with torch.no_grad():
            ad.lambda_d.copy_(peft_params[f"base_model.model.{path}.vera_lambda_d.default"])
            ad.lambda_b.copy_(peft_params[f"base_model.model.{path}.vera_lambda_b.default"])
        n += 1
    assert n == 14
    ref, got = pm(IDS).logits, ours(IDS).logits
    with torch.no_grad():
        assert (ref - base(IDS).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # gradients of every vector agree as well
    ref.square().mean().backward()
    got.square().mean().backward()
    for path, layer in adapted_layers(ours):
        ad = layer.adapters["default"]
        torch.testing.assert_close(ad.lambda_d.grad, peft_params[f"base_model.model.{path}.vera_lambda_d.default"].grad,
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ad.lambda_b.grad, peft_params[f"base_model.model.{path}.vera_lambda_b.default"].grad,
                                   atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        merged_ref = pm.merge_and_unload()(IDS).logits
        lorakit.merge(ours)
        torch.testing.assert_close(ours(IDS).logits, merged_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_format_both_ways(tmp_path, save_projection):
    pytest.importorskip("peft")
    from peft import PeftModel

    base = tiny_llama(seed=4)
    pm = _peft_vera(base, r=8, key=9, save_projection=save_projection)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(IDS).logits
        ours = lorakit.load(copy.deepcopy(base), tmp_path / "peft")
        torch.testing.assert_close(ours(IDS).logits, ref, atol=ATOL, rtol=0)
        lorakit.save(ours, tmp_path / "back", format="peft")
        again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
        torch.testing.assert_close(again(IDS).logits, ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip(tmp_path, save_projection):
    base = tiny_llama(seed=1)
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(method="vera", r=32, seed=7, save_projection=save_projection))
    randomise(model, scale=0.2)
    folder = lorakit.save(model, tmp_path / "ad")
    keys = load_file(str(folder / "lorakit_weights.safetensors")).keys()
    shared_keys = sorted(k for k in keys if "|shared|" in k)
    assert shared_keys == (["default|shared||vera_A", "default|shared||vera_B"] if save_projection else [])
    assert all(k.rsplit("|", 1)[1] in ("lambda_b", "lambda_d") for k in keys if "|layer|" in k)
    loaded = lorakit.load(copy.deepcopy(base), folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert torch.equal(registry(loaded).shared["default"].vera_A, registry(model).shared["default"].vera_A)


def test_saved_projection_is_used_not_regenerated(tmp_path):
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["0", "2"], seed=1))
    randomise(net)
    with torch.no_grad():
        registry(net).shared["default"].vera_A.mul_(2.0)  # no longer what the seed gives
    x = torch.randn(3, 12)
    folder = lorakit.save(net, tmp_path / "ad")
    loaded = lorakit.load(mlp(), folder)
    torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)


def test_bad_saved_shared_pair_fails_and_leaves_model_unchanged(tmp_path):
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["0", "2"]))
    folder = lorakit.save(net, tmp_path / "ad")
    wfile = folder / "lorakit_weights.safetensors"
    tensors = load_file(str(wfile))
    tensors["default|shared||vera_A"] = tensors["default|shared||vera_A"][:, :8].contiguous()  # too narrow
    save_file(tensors, str(wfile), metadata={"format": "lorakit"})
    fresh = mlp()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(lorakit.AdapterLoadError, match="vera_A"):
        lorakit.load(fresh, folder)
    assert lorakit.adapter_names(fresh) == [] and isinstance(fresh[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


# ------------------------------------------------------------------------------------------------ merge & co
def test_merge_unmerge_unload_exact():
    model = tiny_llama(seed=2)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.attach(model, AdapterConfig(method="vera", r=64))
    randomise(model, scale=0.2)
    with torch.no_grad():
        unmerged = model(IDS).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=ATOL, rtol=0)
        lorakit.unmerge(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=ATOL, rtol=0)
        for path, layer in adapted_layers(model):
            torch.testing.assert_close(layer.base.weight, w0[path + ".weight"], atol=1e-6, rtol=0)
        plain = lorakit.unload(model, merge=True)
        assert not any(isinstance(m, lorakit.AdaptedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(IDS).logits, unmerged, atol=ATOL, rtol=0)


def test_disabled_and_route():
    model = tiny_llama(seed=2)
    with torch.no_grad():
        base_logits = model(IDS).logits
    lorakit.attach(model, AdapterConfig(method="vera", r=16, seed=1), name="a")
    lorakit.attach(model, AdapterConfig(method="vera", r=8, seed=2), name="b")
    randomise(model, "a", seed=1, scale=0.3)
    randomise(model, "b", seed=2, scale=0.3)
    with torch.no_grad():
        lorakit.set_active(model, "a")
        la = model(IDS).logits
        lorakit.set_active(model, "b")
        lb = model(IDS).logits
        with lorakit.disabled(model):
            torch.testing.assert_close(model(IDS).logits, base_logits, atol=0, rtol=0)
        with lorakit.route(model, ["b", "a"]):
            routed = model(IDS).logits
    assert (la - lb).abs().max() > 1e-3
    torch.testing.assert_close(routed[0], lb[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(routed[1], la[1], atol=ATOL, rtol=0)


def test_later_adapter_with_larger_layers_gets_its_own_pair():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["2"]), name="small")  # 10 -> 6
    lorakit.attach(net, AdapterConfig(method="vera", r=6, targets=["0", "2"]), name="big")  # up to 12 -> 10
    reg = registry(net)
    assert tuple(reg.shared["small"].vera_A.shape) == (4, 10)
    assert tuple(reg.shared["big"].vera_A.shape) == (6, 12) and tuple(reg.shared["big"].vera_B.shape) == (10, 6)
    randomise(net, "small")
    randomise(net, "big", seed=4)
    lorakit.set_active(net, ["small", "big"])
    x = torch.randn(4, 12)
    l0, l2 = net[0], net[2]
    h = torch.relu(vera_reference(x, l0, l0.adapters["big"]))
    ref = vera_reference(h, l2, l2.adapters["big"]) + (vera_reference(h, l2, l2.adapters["small"]) - l2.base(h))
    torch.testing.assert_close(net(x), ref, atol=ATOL, rtol=0)


def test_a_pair_that_does_not_cover_the_layer_is_refused():
    from lorakit.layers import ops_for

    cfg = AdapterConfig(method="vera", r=4)
    small = VeraProjection(4, 8, 8, key=0, save_projection=True)
    with pytest.raises(ValueError, match="covers layers up to 8x8"):
        VeraAdapter(ops_for(nn.Linear(12, 8)), cfg, "x", small)
    with pytest.raises(ValueError, match="rank 4"):
        VeraAdapter(ops_for(nn.Linear(8, 8)), AdapterConfig(method="vera", r=6), "x", small)
    with pytest.raises(ValueError, match="existing VeRA pair"):
        VeraAdapter.make_shared(cfg, [("x", ops_for(nn.Linear(12, 8)))], "n", existing=small)


def test_combine_uses_exact_low_rank_form():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["0", "2"], seed=1), name="a")
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["0", "2"], seed=2), name="b")
    randomise(net, "a", seed=1)
    randomise(net, "b", seed=2)
    lorakit.combine(net, {"a": 0.7, "b": -0.4}, name="mix", how="cat")
    for _, layer in adapted_layers(net):
        want = 0.7 * layer.adapters["a"].delta_weight() - 0.4 * layer.adapters["b"].delta_weight()
        torch.testing.assert_close(layer.adapters["mix"].delta_weight(), want, atol=1e-6, rtol=0)
        a, b, s = layer.adapters["a"].as_lora_factors()
        torch.testing.assert_close(s * b @ a, layer.adapters["a"].delta_weight(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ counts
def test_trainable_parameters_and_report_say_what_is_counted():
    net = mlp()
    lorakit.attach(net, AdapterConfig(method="vera", r=4, targets=["0", "2"]))
    trainable, total = lorakit.trainable_parameters(net)
    assert trainable == (10 + 4) + (6 + 4)  # d and b only; the shared pair is not a parameter
    assert total == sum(p.numel() for p in mlp().parameters()) + trainable
    line = next(ln for ln in lorakit.parameter_report(net).splitlines() if ln.startswith("default"))
    assert line.split()[3] == "24" and line.split()[5] == f"{4 * 12 + 10 * 4}"  # frozen extra: r*(in_max+out_max)


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(d_initial=0.0), "d_initial"),
    (dict(d_initial=float("nan")), "d_initial"),
    (dict(save_projection="yes"), "save_projection"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(alpha=16), "no alpha"),
    (dict(scaling="rslora"), "no alpha"),
    (dict(init="gaussian"), "init='gaussian'"),
    (dict(r=0), "AdapterConfig.r"),
])
def test_bad_config_raises_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(method="vera", **kwargs)


def test_default_rank_and_config_round_trip():
    cfg = AdapterConfig(method="vera")
    assert cfg.r == 256 and cfg.d_initial == 0.1 and cfg.save_projection is True
    assert AdapterConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------------------------------ training
def test_tiny_llama_trains_and_loss_goes_down():
    model = tiny_llama(seed=0)
    lorakit.attach(model, AdapterConfig(method="vera", r=64, seed=0))
    model.train()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    shared = registry(model).shared["default"]
    assert torch.equal(shared.vera_A, projection_pair(64, 128, 128, key=0)[0])  # the frozen pair never moved


# ------------------------------------------------------------------------------------------------ shared z
class Twin(nn.Module):
    """Two layers reading the same input tensor (like q/k/v): VeRA computes x Aᵀ once for both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.p, self.q = nn.Linear(12, 8), nn.Linear(12, 5)

    def forward(self, x, bump=False):
        y = self.p(x)
        if bump:
            x.mul_(2.0)  # an in-place change between the siblings must not reuse the stale projection
        return y, self.q(x)


def test_siblings_share_the_projection_exactly_and_in_place_changes_are_seen():
    net = Twin()
    lorakit.attach(net, AdapterConfig(method="vera", r=6, targets=["p", "q"]))
    randomise(net)
    x = torch.randn(3, 12, requires_grad=True)
    yp, yq = net(x)
    rp = vera_reference(x, net.p, net.p.adapters["default"])
    rq = vera_reference(x, net.q, net.q.adapters["default"])
    torch.testing.assert_close(yp, rp, atol=ATOL, rtol=0)
    torch.testing.assert_close(yq, rq, atol=ATOL, rtol=0)
    params = [x] + [p for _, lay in adapted_layers(net) for p in lay.adapters["default"].parameters()]
    got = torch.autograd.grad(yp.sum() + yq.square().sum(), params)
    want = torch.autograd.grad(rp.sum() + rq.square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    with torch.no_grad():
        x2 = torch.randn(3, 12)
        _, yq2 = net(x2, bump=True)
        torch.testing.assert_close(yq2, vera_reference(x2, net.q, net.q.adapters["default"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("where", ["sequential", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(where):
    from torch.utils.checkpoint import checkpoint

    if where == "sequential":  # each checkpointed segment starts with a VeRA layer on the segment input
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)])
        lorakit.attach(model, AdapterConfig(method="vera", r=8))
        randomise(model, scale=0.3)
        x = torch.randn(4, 16, requires_grad=True)

        def run(ckpt):
            h = x
            for layer in model:
                h = checkpoint(layer, h, use_reentrant=False) if ckpt else layer(h)
            return h.square().sum()
    else:
        model = tiny_llama(seed=1)
        lorakit.attach(model, AdapterConfig(method="vera", r=16))
        randomise(model, scale=0.2)
        model.train()

        def run(ckpt):
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            return model(input_ids=IDS, labels=IDS).loss
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(run(False), params)
    got = torch.autograd.grad(run(True), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_inference_mode_forward_equals_no_grad_forward():
    """Inference tensors have no version counter: the shared-projection cache must not ask for one (it raised)."""
    model = tiny_llama(hidden=32, layers=1)
    lorakit.attach(model, AdapterConfig(method="vera", r=8, targets="all-linear", seed=0))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.adapters["default"].lambda_b.normal_()
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
