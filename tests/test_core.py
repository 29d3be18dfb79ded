"""The core engine against plain reference formulas: attach, forward, merge, save/load, combine, route, errors."""
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
from lorakit.layers import AdaptedLayer
from lorakit.model import adapted_layers

ATOL = 1e-5


def randomise(model, name="default", scale=0.5, seed=3):
    """Give every adapter non-zero A and B so deltas are visible."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            for p in layer.adapters[name].parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


# ------------------------------------------------------------------------------------------------- targeting
def test_all_linear_targets_every_linear_but_the_output_head(llama):
    lorakit.attach(llama, AdapterConfig(r=2))
    paths = [p for p, _ in adapted_layers(llama)]
    assert len(paths) == 2 * 7
    assert all(not p.startswith("lm_head") for p in paths)
    assert isinstance(llama.lm_head, nn.Linear)


def test_targets_by_name_list_regex_and_exclude(llama):
    m1 = copy.deepcopy(llama)
    lorakit.attach(m1, AdapterConfig(r=2, targets=["q_proj", "v_proj"]))
    assert sorted({p.split(".")[-1] for p, _ in adapted_layers(m1)}) == ["q_proj", "v_proj"]
    m2 = copy.deepcopy(llama)
    lorakit.attach(m2, AdapterConfig(r=2, targets=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    assert [p for p, _ in adapted_layers(m2)] == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    m3 = copy.deepcopy(llama)
    lorakit.attach(m3, AdapterConfig(r=2, exclude=["mlp.down_proj", r".*\.0\..*"]))
    paths = [p for p, _ in adapted_layers(m3)]
    assert len(paths) == 6 and not any("down_proj" in p or ".0." in p for p in paths)


def test_nothing_matches_lists_adaptable_modules_and_leaves_model_untouched(llama):
    before = state(llama)
    with pytest.raises(ValueError) as err:
        lorakit.attach(llama, AdapterConfig(targets=["nonexistent"]))
    assert "matched no module" in str(err.value) and "q_proj" in str(err.value)
    assert same_state(before, state(llama)) and lorakit.adapter_names(llama) == []
    assert not any(isinstance(m, AdaptedLayer) for m in llama.modules())


def test_unsupported_type_and_taken_name_leave_model_untouched(llama):
    before = state(llama)
    with pytest.raises(lorakit.UnsupportedLayer, match="LlamaRMSNorm"):
        lorakit.attach(llama, AdapterConfig(targets=["q_proj", "input_layernorm"]))
    assert same_state(before, state(llama)) and not any(isinstance(m, AdaptedLayer) for m in llama.modules())
    lorakit.attach(llama, AdapterConfig(r=2, targets=["q_proj"]), name="a")
    before = state(llama)
    with pytest.raises(ValueError, match="taken"):
        lorakit.attach(llama, AdapterConfig(r=2, targets=["v_proj"]), name="a")
    assert same_state(before, state(llama)) and lorakit.adapter_names(llama) == ["a"]
    with pytest.raises(ValueError, match="invalid"):
        lorakit.attach(llama, AdapterConfig(r=2), name="bad.name")


def test_failed_pissa_check_on_one_layer_changes_nothing():
    net = mlp()
    before = state(net)
    with pytest.raises(ValueError, match="r <= min"):
        lorakit.attach(net, AdapterConfig(r=8, init="pissa", targets=["0", "2"]))  # layer 2 is 6x10
    assert same_state(before, state(net)) and isinstance(net[0], nn.Linear)


# ------------------------------------------------------------------------------------------------- forward math
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "init_b", "orthogonal"])
def test_zero_delta_at_init_for_every_layer_kind(init):
    net = ConvNet()
    img, tok = torch.randn(2, 3, 5, 5), torch.randint(0, 20, (2, 4))
    y0 = net(img, tok)
    lorakit.attach(net, AdapterConfig(r=2, init=init, targets=["emb", "conv", "conv2", "fc"], seed=1))
    assert torch.allclose(net(img, tok), y0, atol=1e-6)
    # and the non-zero factor really is non-zero (the init did something)
    for _, layer in adapted_layers(net):
        a = layer.adapters["default"]
        assert a.A.abs().sum() + a.B.abs().sum() > 0


def test_linear_forward_equals_reference_formula():
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=3, alpha=6, targets=["0"]))
    randomise(net)
    layer = net[0]
    a, b, s = layer.adapters["default"].A, layer.adapters["default"].B, 2.0
    x = torch.randn(4, 7, 12)
    ref = x @ layer.base.weight.T + layer.base.bias + s * (x @ a.T) @ b.T
    assert torch.allclose(layer(x), ref, atol=ATOL)


def test_conv1d_fan_in_fan_out_forward_and_merge():
    model = tiny_gpt2()
    ids = torch.randint(0, 96, (2, 8))
    lorakit.attach(model, AdapterConfig(r=2, alpha=4))
    randomise(model, scale=0.1)
    layer = model.transformer.h[0].attn.c_attn
    w, bias = layer.base.weight, layer.base.bias  # [in, out]
    a, b = layer.adapters["default"].A, layer.adapters["default"].B
    x = torch.randn(2, 8, 32)
    ref = x @ w + bias + 2.0 * (x @ a.T) @ b.T
    assert torch.allclose(layer(x), ref, atol=ATOL)
    y = model(ids).logits
    lorakit.merge(model)
    assert torch.allclose(model(ids).logits, y, atol=ATOL)


def test_embedding_and_conv2d_forward_reference():
    net = ConvNet()
    lorakit.attach(net, AdapterConfig(r=2, alpha=2, targets=["emb", "conv"]))
    randomise(net)
    emb = net.emb
    tok = torch.randint(0, 20, (3, 4))
    a, b = emb.adapters["default"].A, emb.adapters["default"].B  # A [r, num], B [dim, r]
    ref = emb.base.weight[tok] + (a.T[tok]) @ b.T
    assert torch.allclose(emb(tok), ref, atol=ATOL)
    conv = net.conv
    img = torch.randn(2, 3, 5, 5)
    a, b = conv.adapters["default"].A, conv.adapters["default"].B
    w_eff = conv.base.weight + (b @ a).reshape(conv.base.weight.shape)
    ref = F.conv2d(img, w_eff, conv.base.bias, padding=1)
    assert torch.allclose(conv(img), ref, atol=ATOL)


def test_dropout_applies_to_branch_input_only():
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=3, dropout=0.5, targets=["0"]))
    randomise(net)
    layer = net[0].train()
    x = torch.randn(5, 12)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    xd = F.dropout(x, 0.5, training=True)
    ad = layer.adapters["default"]
    ref = F.linear(x, layer.base.weight, layer.base.bias) + ad.scaling * (xd @ ad.A.T) @ ad.B.T
    assert torch.allclose(y, ref, atol=ATOL)
    layer.eval()
    assert torch.allclose(layer(x), F.linear(x, layer.base.weight, layer.base.bias)
                          + ad.scaling * (x @ ad.A.T) @ ad.B.T, atol=ATOL)


def test_rslora_scaling_in_forward():
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=4, alpha=4, scaling="rslora", targets=["0"]))
    randomise(net)
    ad = net[0].adapters["default"]
    assert ad.scaling == pytest.approx(2.0)
    x = torch.randn(3, 12)
    assert torch.allclose(net[0](x) - net[0].base(x), 2.0 * (x @ ad.A.T) @ ad.B.T, atol=ATOL)


def test_several_active_adapters_sum_their_deltas():
    net = mlp()
    x = torch.randn(4, 12)
    for n in "ab":
        lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"]), name=n)
        randomise(net, n, seed=ord(n))
    layer = net[0]
    lorakit.set_active(net, ["a", "b"])
    da = layer.adapters["a"].delta_weight(layer)
    db = layer.adapters["b"].delta_weight(layer)
    ref = F.linear(x, layer.base.weight + da + db, layer.base.bias)
    assert torch.allclose(layer(x), ref, atol=ATOL)


# ------------------------------------------------------------------------------------------------- merge family
def test_merge_equals_unmerged_and_unmerge_restores(llama, token_batch):
    lorakit.attach(llama, AdapterConfig(r=4, alpha=8))
    randomise(llama, scale=0.05)
    w_before = {p: l.base.weight.clone() for p, l in adapted_layers(llama)}
    y = llama(token_batch).logits
    lorakit.merge(llama)
    assert torch.allclose(llama(token_batch).logits, y, atol=ATOL)
    lorakit.merge(llama)  # merging twice is a no-op
    assert torch.allclose(llama(token_batch).logits, y, atol=ATOL)
    lorakit.unmerge(llama)
    for p, layer in adapted_layers(llama):
        assert torch.allclose(layer.base.weight, w_before[p], atol=1e-6)
    assert torch.allclose(llama(token_batch).logits, y, atol=ATOL)


def test_unload_returns_original_types(llama, token_batch):
    base = copy.deepcopy(llama)
    lorakit.attach(llama, AdapterConfig(r=4))
    randomise(llama, scale=0.05)
    y = llama(token_batch).logits
    merged = lorakit.unload(copy.deepcopy(llama), merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert "_lorakit_registry" not in merged.__dict__
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(merged(token_batch).logits, y, atol=ATOL)
    plain = lorakit.unload(llama, merge=False)
    assert plain.state_dict().keys() == base.state_dict().keys()
    assert torch.allclose(plain(token_batch).logits, base(token_batch).logits, atol=ATOL)


def test_disabled_runs_base_even_when_merged(llama, token_batch):
    y0 = llama(token_batch).logits
    lorakit.attach(llama, AdapterConfig(r=4))
    randomise(llama, scale=0.05)
    y1 = llama(token_batch).logits
    with lorakit.disabled(llama):
        assert torch.allclose(llama(token_batch).logits, y0, atol=ATOL)
    lorakit.merge(llama)
    with lorakit.disabled(llama):
        assert torch.allclose(llama(token_batch).logits, y0, atol=ATOL)
    assert torch.allclose(llama(token_batch).logits, y1, atol=ATOL)
    assert all(layer.merged == ["default"] for _, layer in adapted_layers(llama))


def test_delete_restores_plain_layers(llama, token_batch):
    y0 = llama(token_batch).logits
    lorakit.attach(llama, AdapterConfig(r=2), name="a")
    lorakit.attach(llama, AdapterConfig(r=2, targets=["q_proj"]), name="b")
    randomise(llama, "a", scale=0.05)
    lorakit.delete(llama, "a")
    assert lorakit.adapter_names(llama) == ["b"]
    assert sum(1 for _ in adapted_layers(llama)) == 2  # only b's q_proj layers remain wrapped
    lorakit.delete(llama, "b")
    assert lorakit.adapter_names(llama) == [] and not any(isinstance(m, AdaptedLayer) for m in llama.modules())
    assert torch.allclose(llama(token_batch).logits, y0, atol=ATOL)
    with pytest.raises(ValueError, match="no lorakit adapters|unknown"):
        lorakit.delete(llama, "b")


def test_bf16_merge_accumulates_in_fp32():
    net = mlp().to(torch.bfloat16)
    lorakit.attach(net, AdapterConfig(r=2, targets=["0"]))
    ad = net[0].adapters["default"]
    assert ad.A.dtype == torch.float32  # adapters train in fp32 on low-precision bases
    randomise(net, scale=0.3)
    w = net[0].base.weight.clone()
    expected = (w.float() + ad.delta_weight(net[0])).to(torch.bfloat16)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    y = net(x)
    assert y.dtype == torch.bfloat16
    lorakit.merge(net)
    assert torch.equal(net[0].base.weight, expected)
    assert torch.allclose(net(x).float(), y.float(), atol=5e-2)


# ------------------------------------------------------------------------------------------------- training
def test_gradients_reach_only_adapters_and_modules_to_save(llama, token_batch):
    lorakit.attach(llama, AdapterConfig(r=2, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    randomise(llama, scale=0.05)
    llama.train()
    out = llama(token_batch, labels=token_batch)
    out.loss.backward()
    with_grad = {n for n, p in llama.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(".adapters.default." in n or n.startswith("lm_head") for n in trainable)
    assert any(n.startswith("lm_head") for n in trainable) and any(n.endswith(".A") for n in trainable)


def test_trainable_parameter_counts():
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"]))
    trainable, total = lorakit.trainable_parameters(net)
    assert trainable == 2 * (12 + 10) + 2 * (10 + 6)
    assert total == (12 * 10 + 10) + (10 * 6 + 6) + trainable
    report = lorakit.parameter_report(net)
    assert "default" in report and f"{trainable:,}" in report and "lora" in report


# ------------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_identical_outputs(llama, token_batch, tmp_path):
    base = copy.deepcopy(llama)
    lorakit.attach(llama, AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]), name="x")
    randomise(llama, "x", scale=0.05)
    y = llama(token_batch).logits
    folder = lorakit.save(llama, tmp_path / "ad")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["lorakit_config.json", "lorakit_weights.safetensors"]
    meta = json.loads((folder / "lorakit_config.json").read_text())
    assert meta["adapters"]["x"]["config"]["r"] == 4
    fresh = copy.deepcopy(base)
    lorakit.load(fresh, folder)
    assert lorakit.adapter_names(fresh) == ["x"] and lorakit.active_adapters(fresh) == ["x"]
    assert torch.allclose(fresh(token_batch).logits, y, atol=ATOL)
    assert lorakit.trainable_parameters(fresh)[0] == 0  # trainable=False by default
    renamed = copy.deepcopy(base)
    lorakit.load(renamed, folder, name="y", trainable=True)
    assert lorakit.adapter_names(renamed) == ["y"] and lorakit.trainable_parameters(renamed)[0] > 0


def test_save_overwrites_atomically(tmp_path):
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=2, targets=["0"]))
    lorakit.save(net, tmp_path / "ad")
    randomise(net)
    lorakit.save(net, tmp_path / "ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp folders left behind
    fresh = mlp()
    lorakit.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh[0].adapters["default"].B, net[0].adapters["default"].B)


def test_load_errors_leave_model_untouched(llama, tmp_path):
    lorakit.attach(llama, AdapterConfig(r=2, targets=["q_proj"]), name="x")
    folder = lorakit.save(llama, tmp_path / "ad")
    other = tiny_llama(hidden=32)  # different shapes
    before = state(other)
    with pytest.raises(lorakit.AdapterLoadError, match="shape"):
        lorakit.load(other, folder)
    assert same_state(before, state(other)) and lorakit.adapter_names(other) == []
    # a tampered file: a key renamed
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "lorakit_weights.safetensors"))
    key = next(k for k in tensors if k.endswith("|B"))
    tensors[key.replace("|B", "|C")] = tensors.pop(key)
    save_file(tensors, str(folder / "lorakit_weights.safetensors"))
    fresh = tiny_llama()
    before = state(fresh)
    with pytest.raises(lorakit.AdapterLoadError) as err:
        lorakit.load(fresh, folder)
    assert "missing keys" in str(err.value) and "|C" in str(err.value)
    assert same_state(before, state(fresh)) and not any(isinstance(m, AdaptedLayer) for m in fresh.modules())
    with pytest.raises(FileNotFoundError):
        lorakit.load(fresh, tmp_path / "nope")
    # name clash on load
    with pytest.raises(lorakit.AdapterLoadError, match="already exist"):
        lorakit.load(llama, tmp_path / "ad")


def test_saved_files_are_json_and_safetensors_only(tmp_path):
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=2, targets=["0"]))
    folder = lorakit.save(net, tmp_path / "ad")
    raw = (folder / "lorakit_weights.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert "default|layer|0|A" in header
    json.loads((folder / "lorakit_config.json").read_text())


# ------------------------------------------------------------------------------------------------- combine
def _two_adapters():
    net = mlp()
    lorakit.attach(net, AdapterConfig(r=2, alpha=4, targets=["0", "2"]), name="a")
    lorakit.attach(net, AdapterConfig(r=3, alpha=3, targets=["0"]), name="b")
    randomise(net, "a", seed=1)
    randomise(net, "b", seed=2)
    return net


def test_combine_cat_is_exactly_the_weighted_sum_of_deltas():
    net = _two_adapters()
    lorakit.combine(net, {"a": 0.7, "b": -0.3}, name="mix", how="cat")
    layer = net[0]
    mix = layer.adapters["mix"]
    assert mix.r == 5
    ref = 0.7 * layer.adapters["a"].delta_weight(layer) - 0.3 * layer.adapters["b"].delta_weight(layer)
    assert torch.allclose(mix.delta_weight(layer), ref, atol=ATOL)
    assert torch.allclose(net[2].adapters["mix"].delta_weight(net[2]), 0.7 * net[2].adapters["a"].delta_weight(net[2]),
                          atol=ATOL)
    x = torch.randn(4, 12)
    lorakit.set_active(net, "mix")
    assert torch.allclose(layer(x), F.linear(x, layer.base.weight + ref, layer.base.bias), atol=ATOL)


def test_combine_linear_matches_peft_definition():
    net = mlp()
    for n, seed in (("a", 1), ("b", 2)):
        lorakit.attach(net, AdapterConfig(r=2, alpha=4 if n == "a" else 2, targets=["0"]), name=n)
        randomise(net, n, seed=seed)
    lorakit.combine(net, {"a": 0.6, "b": -0.5}, name="lin", how="linear")
    layer = net[0]
    a, b = layer.adapters["a"], layer.adapters["b"]
    wa, wb = 0.6 * a.scaling, -0.5 * b.scaling
    ref_a = (wa ** 0.5) * a.A - ((-wb) ** 0.5) * b.A
    ref_b = (wa ** 0.5) * a.B + ((-wb) ** 0.5) * b.B
    assert torch.allclose(layer.adapters["lin"].delta_weight(layer), ref_b @ ref_a, atol=ATOL)
    with pytest.raises(ValueError, match="equal ranks"):
        lorakit.combine(_two_adapters(), {"a": 1.0, "b": 1.0}, name="bad", how="linear")


def test_combine_svd_is_best_rank_k_approximation():
    net = _two_adapters()
    lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="svd", how="svd", rank=2)
    layer = net[0]
    full = 0.5 * layer.adapters["a"].delta_weight(layer) + 0.5 * layer.adapters["b"].delta_weight(layer)
    u, s, vh = torch.linalg.svd(full)
    ref = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    got = layer.adapters["svd"].delta_weight(layer)
    assert torch.allclose(got, ref, atol=1e-4)
    assert torch.linalg.matrix_rank(got) == 2


def test_combine_bad_inputs():
    net = _two_adapters()
    with pytest.raises(ValueError, match="how"):
        lorakit.combine(net, {"a": 1.0}, how="bogus")
    with pytest.raises(ValueError, match="unknown adapter"):
        lorakit.combine(net, {"zz": 1.0})
    with pytest.raises(ValueError, match="taken"):
        lorakit.combine(net, {"a": 1.0}, name="b")
    assert lorakit.adapter_names(net) == ["a", "b"]


def test_combined_adapter_saves_and_loads(tmp_path):
    net = _two_adapters()
    lorakit.combine(net, {"a": 0.7, "b": 0.3}, name="mix")
    lorakit.set_active(net, "mix")
    x = torch.randn(3, 12)
    y = net(x)
    lorakit.save(net, tmp_path / "mix", names="mix")
    fresh = mlp()
    lorakit.load(fresh, tmp_path / "mix")
    assert torch.allclose(fresh(x), y, atol=ATOL)


# ------------------------------------------------------------------------------------------------- route
@pytest.mark.parametrize("train", [False, True])
def test_route_equals_per_example_single_adapter_runs(llama, token_batch, train):
    base = copy.deepcopy(llama)
    for n, seed in (("a", 1), ("b", 2)):
        lorakit.attach(llama, AdapterConfig(r=2, targets=["q_proj", "v_proj", "down_proj"]), name=n)
        randomise(llama, n, seed=seed, scale=0.05)
    lorakit.set_trainable(llama, ["a", "b"])
    llama.train(train)
    names = ["b", None, "a"]
    with lorakit.route(llama, names):
        routed = llama(token_batch).logits
    for i, n in enumerate(names):
        if n is None:
            ref = base.train(train)(token_batch[i:i + 1]).logits
        else:
            lorakit.set_active(llama, n)
            ref = llama(token_batch[i:i + 1]).logits
        assert torch.allclose(routed[i:i + 1], ref, atol=ATOL), n
    if train:  # gradients flow to each adapter only from its own examples
        lorakit.set_active(llama, ["a", "b"])
        for p in llama.parameters():
            p.grad = None
        with lorakit.route(llama, names):
            llama(token_batch).logits[2].sum().backward()
        q = llama.model.layers[0].self_attn.q_proj
        assert q.adapters["a"].B.grad.abs().sum() > 0
        assert q.adapters["b"].B.grad is None or q.adapters["b"].B.grad.abs().sum() == 0


def test_route_errors(llama, token_batch):
    lorakit.attach(llama, AdapterConfig(r=2, targets=["q_proj"]), name="a")
    with pytest.raises(ValueError, match="unknown adapter"):
        with lorakit.route(llama, ["zz", None, None]):
            pass
    with pytest.raises(ValueError, match="batch size"):
        with lorakit.route(llama, ["a", None]):
            llama(token_batch)
    lorakit.merge(llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lorakit.route(llama, ["a", None, None]):
            pass
    lorakit.unmerge(llama)
    with lorakit.route(llama, ["a", None, None]):
        llama(token_batch)  # works again, and the route is cleared afterwards
    assert all(layer._route is None for _, layer in adapted_layers(llama))


# ------------------------------------------------------------------------------------------------- PiSSA
def test_pissa_init_keeps_output_and_builds_residual():
    net = mlp()
    x = torch.randn(5, 12)
    y0 = net(x)
    w = net[0].weight.detach().clone()
    lorakit.attach(net, AdapterConfig(r=3, alpha=6, init="pissa", targets=["0"]))
    layer = net[0]
    ad = layer.adapters["default"]
    assert torch.allclose(net(x), y0, atol=ATOL)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert torch.allclose(ad.scaling * ad.B @ ad.A, top, atol=1e-5)  # s·BA is the principal part for any alpha
    assert torch.allclose(layer.base.weight, w - top, atol=1e-5)  # base is the residual
    with lorakit.disabled(net):  # disabled means the true base model, not the residual
        assert torch.allclose(net(x), y0, atol=ATOL)
    with lorakit.route(net, [None, "default", None, None, "default"]):
        assert torch.allclose(net(x), y0, atol=ATOL)
    restored = lorakit.unload(copy.deepcopy(net), merge=False)
    assert torch.allclose(restored[0].weight, w, atol=1e-5)


def test_pissa_save_load_on_original_weights_and_rank_2r_conversion(tmp_path):
    net = mlp()
    original = copy.deepcopy(net)
    lorakit.attach(net, AdapterConfig(r=3, init="pissa_fast", targets=["0", "2"], seed=0))
    with torch.no_grad():  # pretend training moved A and B
        for _, layer in adapted_layers(net):
            layer.adapters["default"].A.add_(0.1)
            layer.adapters["default"].B.mul_(1.1)
    x = torch.randn(4, 12)
    y = net(x)
    lorakit.save(net, tmp_path / "pissa")
    fresh = copy.deepcopy(original)
    lorakit.load(fresh, tmp_path / "pissa")
    assert torch.allclose(fresh(x), y, atol=ATOL)
    lorakit.save(net, tmp_path / "plain", convert_pissa=True)
    meta = json.loads((tmp_path / "plain" / "lorakit_config.json").read_text())["adapters"]["default"]["config"]
    assert meta["init"] == "kaiming" and meta["rank_pattern"] == {"0": 6, "2": 6}
    plain = copy.deepcopy(original)
    lorakit.load(plain, tmp_path / "plain")
    assert not plain[0].adapters["default"].shifts_base
    assert torch.allclose(plain[0].base.weight, original[0].weight)  # used on the original weights
    assert torch.allclose(plain(x), y, atol=ATOL)


def test_attach_and_load_follow_the_model_mode():
    """Adapters attached to a model in eval mode must not run dropout (a new nn.Module defaults to train mode)."""
    model = tiny_llama()
    model.eval()
    lorakit.attach(model, AdapterConfig(r=4, dropout=0.5, init="gaussian", seed=0))
    assert not any(m.training for m in model.modules())
    ids = torch.arange(8)[None]
    assert torch.equal(model(ids).logits, model(ids).logits)  # deterministic: dropout is off
    model.train()
    assert all(m.training for m in model.modules())
