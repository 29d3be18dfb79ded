"""Issue 11 items 7, 8, 12 (heads): every adapter owns its copy of each module it trains (``modules_to_save``).

Each adapter's outputs are checked against a reference built by hand: a plain copy of the base model whose adapted
weights get that adapter's ``s·B·A`` and whose head gets that adapter's head tensors.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.model import adapted_layers

ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))


def train_steps(net: nn.Module, steps: int = 4, seed: int = 0) -> None:
    """A few real optimiser steps on whatever is trainable (the adapter and its head copy)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(5, 3, generator=g)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(X), target).backward()
        opt.step()
    net.eval()


def snapshot(net: nn.Module, name: str) -> dict:
    """What defines adapter ``name`` by hand: its deltas per layer and the head it trained (seen while active)."""
    deltas = {}
    for path, layer in adapted_layers(net):
        if name in layer.adapters:
            ad = layer.adapters[name]
            deltas[path] = (ad.scaling * ad.B.detach() @ ad.A.detach()).clone()
    return {"deltas": deltas, "head": {k: v.detach().clone() for k, v in (("weight", net.head.weight),
                                                                           ("bias", net.head.bias))}}


def reference(base: nn.Module, snap: dict, head: str = "head") -> nn.Module:
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, delta in snap["deltas"].items():
            ref.get_submodule(path).weight.add_(delta)
        for k, v in snap["head"].items():
            getattr(ref.get_submodule(head), k).copy_(v)
    return ref.eval()


def two_heads():
    """Base net plus an adapted copy with adapters a and b, each trained (body adapter and its own head)."""
    base = Net().eval()
    net = copy.deepcopy(base)
    lorakit.attach(net, AdapterConfig(r=2, targets=["body.0", "body.2"], modules_to_save=["head"], seed=1), name="a")
    train_steps(net, seed=1)
    snap_a = snapshot(net, "a")
    lorakit.attach(net, AdapterConfig(r=3, targets=["body.2"], modules_to_save=["head"], seed=2), name="b")
    train_steps(net, seed=2)
    snap_b = snapshot(net, "b")
    assert not torch.allclose(snap_a["head"]["weight"], snap_b["head"]["weight"])
    return base, net, snap_a, snap_b


def out(net, x=X):
    with torch.no_grad():
        return net(x)


# ---------------------------------------------------------------------------------------------- item 7
def test_each_adapter_has_its_own_head_and_set_active_switches_heads():
    base, net, snap_a, snap_b = two_heads()
    ref_a, ref_b = reference(base, snap_a), reference(base, snap_b)
    lorakit.set_active(net, "a")
    torch.testing.assert_close(out(net), out(ref_a), atol=ATOL, rtol=0)  # training b left a's head alone
    lorakit.set_active(net, "b")
    torch.testing.assert_close(out(net), out(ref_b), atol=ATOL, rtol=0)
    lorakit.set_active(net, "a")
    torch.testing.assert_close(out(net), out(ref_a), atol=ATOL, rtol=0)
    # code reading the head's attributes (transformers' get_output_embeddings().weight) sees the active adapter's
    assert torch.equal(net.head.weight, snap_a["head"]["weight"])
    assert net.head.out_features == 3


def test_training_one_head_leaves_the_other_and_the_base_head_unchanged():
    base, net, snap_a, snap_b = two_heads()
    before_b = out(net)  # b is active after two_heads()
    lorakit.set_active(net, "a")
    lorakit.set_trainable(net, "b", False)
    lorakit.set_trainable(net, "a", True)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert any("head" in n for n in trainable)
    train_steps(net, seed=5)
    assert not torch.allclose(net.head.weight, snap_a["head"]["weight"])  # a's head did train
    lorakit.set_active(net, "b")
    assert torch.equal(out(net), before_b)
    assert torch.equal(net.head.weight, snap_b["head"]["weight"])
    with lorakit.disabled(net):
        assert torch.equal(out(net), out(base))


def test_disabled_runs_the_original_head_exactly():
    base, net, _, _ = two_heads()
    for active in (["a"], ["b"]):
        lorakit.set_active(net, active)
        with lorakit.disabled(net):
            assert torch.equal(out(net), out(base))
            assert torch.equal(net.head.weight, base.head.weight)
        assert not torch.equal(out(net), out(base))


def test_route_gives_every_example_its_own_head():
    base, net, snap_a, snap_b = two_heads()
    names = ["a", "b", None, "b", "a"]
    with lorakit.route(net, names):
        got = out(net)
    refs = {"a": out(reference(base, snap_a)), "b": out(reference(base, snap_b)), None: out(base)}
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], refs[n][i], atol=ATOL, rtol=0)


def test_several_active_heads_are_refused_not_summed():
    base, net, _, _ = two_heads()
    lorakit.set_active(net, ["a", "b"])
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*'head'.*set_active"):
        out(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"head.*set_active"):
        lorakit.unload(net, merge=True)
    assert lorakit.adapter_names(net) == ["a", "b"]  # refused before anything changed
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert before.keys() == net.state_dict().keys()


def test_several_active_heads_with_identical_copies_run_that_head():
    """Copies equal bit for bit (as in a 0.1.0 folder where two adapters shared one head) are one head: no
    ambiguity, so it runs; once one copy differs, the same call is refused."""
    base, net, _, _ = two_heads()
    wrapper = net.get_submodule("head")
    with torch.no_grad():
        for pa, pb in zip(wrapper.copies["a"].parameters(), wrapper.copies["b"].parameters()):
            pb.copy_(pa)
    lorakit.set_active(net, ["a", "b"])
    x = torch.randn(5, wrapper.copies["a"].in_features)
    assert torch.equal(wrapper(x), wrapper.copies["a"](x))
    out(net)  # the whole model runs with both adapters active
    with torch.no_grad():
        next(wrapper.copies["b"].parameters()).view(-1)[0] += 1.0
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*'head'"):
        out(net)


def test_save_load_keeps_each_adapters_head(tmp_path):
    base, net, snap_a, snap_b = two_heads()
    folder = lorakit.save(net, tmp_path / "both")
    fresh = lorakit.load(copy.deepcopy(base), folder)
    for name, snap in (("a", snap_a), ("b", snap_b)):
        lorakit.set_active(fresh, name)
        torch.testing.assert_close(out(fresh), out(reference(base, snap)), atol=ATOL, rtol=0)
    with lorakit.disabled(fresh):
        assert torch.equal(out(fresh), out(base))
    # one adapter of a multi-adapter folder, chosen by name
    solo = lorakit.load(copy.deepcopy(base), folder, name="b")
    torch.testing.assert_close(out(solo), out(reference(base, snap_b)), atol=ATOL, rtol=0)


def test_restore_puts_saved_heads_back(tmp_path):
    base, net, snap_a, snap_b = two_heads()
    folder = lorakit.save(net, tmp_path / "ckpt")
    lorakit.set_active(net, "a")
    lorakit.set_trainable(net, "a")
    train_steps(net, seed=9)  # moves a's head and body adapter away from the saved values
    assert not torch.allclose(out(net), out(reference(base, snap_a)), atol=1e-3)
    lorakit.io.restore(net, folder)
    torch.testing.assert_close(out(net), out(reference(base, snap_a)), atol=ATOL, rtol=0)
    lorakit.set_active(net, "b")
    torch.testing.assert_close(out(net), out(reference(base, snap_b)), atol=ATOL, rtol=0)


def test_delete_removes_the_adapters_head_and_restores_the_original_module():
    base, net, snap_a, _ = two_heads()
    original = net.head.original if hasattr(net.head, "original") else None
    lorakit.delete(net, "b")
    lorakit.set_active(net, "a")
    torch.testing.assert_close(out(net), out(reference(base, snap_a)), atol=ATOL, rtol=0)
    lorakit.delete(net, "a")
    assert type(net.head) is nn.Linear and (original is None or net.head is original)
    assert torch.equal(out(net), out(base))
    assert dict(base.state_dict().items()).keys() == net.state_dict().keys()


def test_unload_without_merge_gives_the_original_head():
    base, net, _, _ = two_heads()
    lorakit.set_active(net, "b")
    plain = lorakit.unload(net, merge=False)
    assert type(plain.head) is nn.Linear and type(plain.body[2]) is nn.Linear
    assert torch.equal(out(plain), out(base))
    assert plain.state_dict().keys() == base.state_dict().keys()


def test_unload_with_merge_keeps_the_active_adapters_head():
    base, net, _, snap_b = two_heads()
    lorakit.set_active(net, "b")
    plain = lorakit.unload(net, merge=True)
    assert type(plain.head) is nn.Linear and type(plain.body[2]) is nn.Linear
    torch.testing.assert_close(out(plain), out(reference(base, snap_b)), atol=ATOL, rtol=0)
    assert plain.state_dict().keys() == base.state_dict().keys()


def test_adapter_without_head_uses_the_original_head():
    base, net, snap_a, _ = two_heads()
    lorakit.attach(net, AdapterConfig(r=2, targets=["body.0"], seed=4), name="plain")
    with torch.no_grad():
        net.body[0].adapters["plain"].B.normal_()
    snap = snapshot(net, "plain")
    snap["head"] = {"weight": base.head.weight.detach(), "bias": base.head.bias.detach()}
    torch.testing.assert_close(out(net), out(reference(base, snap)), atol=ATOL, rtol=0)
    # a head adapter plus a body-only adapter: the one head applies, the deltas add
    lorakit.set_active(net, ["a", "plain"])
    both = {"deltas": dict(snap_a["deltas"]), "head": snap_a["head"]}
    both["deltas"]["body.0"] = both["deltas"]["body.0"] + snap["deltas"]["body.0"]
    torch.testing.assert_close(out(net), out(reference(base, both)), atol=ATOL, rtol=0)


def test_head_copy_of_a_tied_output_embedding_leaves_the_tie_of_the_original():
    from conftest import tiny_llama

    model = tiny_llama(tie=True, layers=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base_logits = model(torch.arange(1, 9)[None]).logits.detach()
    lorakit.attach(model, AdapterConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), name="a")
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # the adapter's own (untied) copy
    assert model.get_output_embeddings().weight is model.lm_head.weight
    with lorakit.disabled(model):
        assert torch.equal(model(torch.arange(1, 9)[None]).logits, base_logits)
    plain = lorakit.unload(model, merge=False)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # the original tie survives


# ---------------------------------------------------------------------------------------------- old folders
def test_folder_in_the_0_1_0_layout_loads_with_each_head(tmp_path):
    """Keys ``<adapter>|module|<path>|<tensor>`` (written by 0.1.0 from the plain head) keep loading."""
    base = Net().eval()
    g = torch.Generator().manual_seed(11)
    tensors, meta, snaps = {}, {"format": "lorakit", "version": 1, "adapters": {}}, {}
    for name, r, layers in (("a", 2, ["body.0", "body.2"]), ("b", 3, ["body.2"])):
        cfg = AdapterConfig(r=r, alpha=2 * r, targets=layers, modules_to_save=["head"])
        snap = {"deltas": {}, "head": {"weight": torch.randn(3, 8, generator=g), "bias": torch.randn(3, generator=g)}}
        for path in layers:
            fan_in = base.get_submodule(path).in_features
            a, b = torch.randn(r, fan_in, generator=g), torch.randn(8, r, generator=g)
            tensors[f"{name}|layer|{path}|A"], tensors[f"{name}|layer|{path}|B"] = a, b
            snap["deltas"][path] = 2.0 * b @ a
        for k, v in snap["head"].items():
            tensors[f"{name}|module|head|{k}"] = v
        meta["adapters"][name] = {"config": cfg.to_dict(), "layers": layers, "modules_to_save": ["head"], "extra": {}}
        snaps[name] = snap
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(tensors, str(folder / "lorakit_weights.safetensors"), metadata={"format": "lorakit"})
    (folder / "lorakit_config.json").write_text(json.dumps(meta))
    net = lorakit.load(copy.deepcopy(base), folder)
    for name in ("a", "b"):
        lorakit.set_active(net, name)
        torch.testing.assert_close(out(net), out(reference(base, snaps[name])), atol=ATOL, rtol=0)
    # and today's save writes exactly the same keys
    again = load_file(str(lorakit.save(net, tmp_path / "new") / "lorakit_weights.safetensors"))
    assert sorted(again) == sorted(tensors)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------------------------- item 12 (part)
def test_failed_multi_adapter_load_leaves_every_head_unchanged(tmp_path):
    base, net, snap_a, snap_b = two_heads()
    folder = lorakit.save(net, tmp_path / "both")
    sd = load_file(str(folder / "lorakit_weights.safetensors"))
    sd["b|module|head|weight"] = sd["b|module|head|weight"][:, :-1].contiguous()  # broken second adapter
    save_file(sd, str(folder / "lorakit_weights.safetensors"))

    target = copy.deepcopy(base)
    lorakit.attach(target, AdapterConfig(r=2, targets=["body.0"], modules_to_save=["head"]), name="x")
    train_steps(target, seed=3)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    before = out(target)
    with pytest.raises(lorakit.AdapterLoadError, match="head"):
        lorakit.load(target, folder)
    assert lorakit.adapter_names(target) == ["x"]
    assert state.keys() == target.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in target.state_dict().items())
    assert torch.equal(out(target), before)
    with lorakit.disabled(target):
        assert torch.equal(out(target), out(base))
    # on a model without adapters the original head stays the original module
    fresh = copy.deepcopy(base)
    head = fresh.head
    with pytest.raises(lorakit.AdapterLoadError):
        lorakit.load(fresh, folder)
    assert fresh.head is head and torch.equal(out(fresh), out(base))


# ---------------------------------------------------------------------------------------------- item 8
def test_unload_without_merge_after_merge_gives_the_original_model():
    base, net, _, _ = two_heads()
    lorakit.set_active(net, "b")
    lorakit.merge(net)
    plain = lorakit.unload(net, merge=False)
    assert type(plain.body[2]) is nn.Linear
    torch.testing.assert_close(out(plain), out(base), atol=1e-6, rtol=0)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, atol=1e-6, rtol=0)


def test_unload_without_merge_after_merge_plain_mlp():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    net = copy.deepcopy(base)
    lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"]))
    with torch.no_grad():
        for _, layer in adapted_layers(net):
            layer.adapters["default"].B.normal_()
    lorakit.merge(net)
    plain = lorakit.unload(net, merge=False)
    torch.testing.assert_close(plain[0].weight, base[0].weight, atol=1e-6, rtol=0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(out(plain, x), out(base, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_unload_without_merge_after_merge_is_the_original_bit_for_bit(method, dtype):
    """The atol checks above would miss a one-ulp drift (an unmerge that subtracts the delta again): every weight
    of the unloaded model is the original tensor exactly, in every dtype."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    net = copy.deepcopy(base)
    lorakit.attach(net, AdapterConfig(method=method, r=2, targets=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in net.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g))
    lorakit.merge(net)
    assert not torch.equal(net[0].base.weight, base[0].weight)  # the merge really changed the weight
    plain = lorakit.unload(net, merge=False)
    assert plain.state_dict().keys() == base.state_dict().keys()
    for k, v in base.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unload_without_merge_undoes_pissas_residual_within_one_rounding(dtype):
    """PiSSA keeps the residual ``W - s·B0·A0`` as the base weight, rounded once when it was made; unload adds the
    shift back (fp32, rounded once), so the original comes back within those two roundings, as documented."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    net = copy.deepcopy(base)
    lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"], init="pissa"))
    residual = {p: net.get_submodule(p).base.weight.detach().clone() for p in ("0", "2")}
    lorakit.merge(net)
    plain = lorakit.unload(net, merge=False)

    def ulp(t):
        t = t.abs()
        return torch.nextafter(t, torch.full_like(t, float("inf"))) - t

    for p in ("0", "2"):
        original, got = base.get_submodule(p).weight, plain.get_submodule(p).weight
        bound = ulp(original).float() + ulp(residual[p]).float()
        assert bool(((got.float() - original.float()).abs() <= bound).all()), p
    assert torch.equal(plain[0].bias, base[0].bias)


def test_lora_drop_stage_two_continues_the_stage_one_head():
    """run_lora_drop re-attaches its adapter for stage 2; the head trained in stage 1 must carry over with it."""
    net = Net().eval()
    data = [(X[i], torch.randn(3, generator=torch.Generator().manual_seed(i))) for i in range(5)]
    seen = []

    def train(model, examples):
        seen.append(model.head.weight.detach().clone())  # the head this stage starts from
        if len(seen) == 1:
            train_steps(model, seed=8)
            seen.append(model.head.weight.detach().clone())  # the head stage 1 ends with

    cfg = AdapterConfig(method="lora_drop", r=2, drop_fraction=0.5, drop_top_n=1, seed=0, targets=["body.0", "body.2"],
                        modules_to_save=["head"])
    lorakit.run_lora_drop(net, cfg, data, train)
    start1, end1, start2 = seen
    assert not torch.equal(start1, end1)
    assert torch.equal(start2, end1)
    with lorakit.disabled(net):
        assert torch.equal(net.head.weight, start1)


def test_save_quantized_keeps_the_original_head_as_base_and_the_copy_in_the_adapter(tmp_path):
    from lorakit.quant import load_quantized, quantize, save_quantized

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))

    model = quantize(fresh(), compute_dtype=torch.float32, skip=("2",))
    lorakit.attach(model, AdapterConfig(r=2, targets=["0"], modules_to_save=["2"], seed=0))
    with torch.no_grad():
        model[0].adapters["default"].B.normal_()
        model[2].weight.add_(1.0)  # the adapter's copy of the head
    x = torch.randn(4, 64)
    ref = out(model, x)
    with lorakit.disabled(model):
        base_ref = out(model, x)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(fresh(), tmp_path / "q")
    torch.testing.assert_close(out(loaded, x), ref, atol=1e-6, rtol=0)
    with lorakit.disabled(loaded):
        torch.testing.assert_close(out(loaded, x), base_ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- clear refusals
def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_new_adapters_copy_trains_and_counts_as_its_own():
    base, net, _, _ = two_heads()
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert trainable == ["body.2.adapters.b.A", "body.2.adapters.b.B", "head.copies.b.bias", "head.copies.b.weight"]
    assert lorakit.trainable_parameters(net)[0] == 3 * 8 + 8 * 3 + 3 * 8 + 3
    report = lorakit.parameter_report(net).splitlines()
    row_b = next(line for line in report if line.startswith("b "))
    assert f"{3 * 8 + 8 * 3 + 3 * 8 + 3:,}" in row_b  # b's body adapter plus its head copy
    assert f"base model parameters: {sum(p.numel() for p in base.parameters()):,}" in report[-1]


def test_head_and_adapted_layer_conflicts_are_refused_before_changes():
    base, net, _, _ = two_heads()
    before, names = _state(net), lorakit.adapter_names(net)
    with pytest.raises(ValueError, match=r"head is trained whole by adapter\(s\) \['a', 'b'\]"):
        lorakit.attach(net, AdapterConfig(r=2, targets=["head"]), name="c")
    with pytest.raises(ValueError, match=r"body\.2 is adapted by adapter\(s\) \['a', 'b'\]"):
        lorakit.attach(net, AdapterConfig(r=2, targets=["body.0"], modules_to_save=["body.2"]), name="c")
    assert lorakit.adapter_names(net) == names and _same(before, _state(net))
    other = lorakit.attach(Net(), AdapterConfig(r=2, targets=["body.0"]), name="a")
    before = _state(other)
    with pytest.raises(ValueError, match=r"body holds adapted or saved modules \(body\.0\)"):
        lorakit.attach(other, AdapterConfig(r=2, targets=["head"], modules_to_save=["body"]), name="c")
    assert lorakit.adapter_names(other) == ["a"] and _same(before, _state(other))


def test_targets_inside_a_module_saved_whole_are_left_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    lorakit.attach(net, AdapterConfig(r=2, targets=r"\d+(\.\d+)?", modules_to_save=["1"]))
    assert [p for p, _ in adapted_layers(net)] == ["0"]
    assert type(net[1]).__name__ == "ModuleCopies"


def test_combine_refuses_adapters_with_their_own_heads():
    _, net, _, _ = two_heads()
    before = _state(net)
    with pytest.raises(ValueError, match=r"combine\(\) cannot mix adapters that train whole modules"):
        lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="mix")
    assert lorakit.adapter_names(net) == ["a", "b"] and _same(before, _state(net))


def test_delete_one_of_two_owners_keeps_the_other_head():
    base, net, snap_a, snap_b = two_heads()
    lorakit.delete(net, "a")
    assert lorakit.active_adapters(net) == ["b"]
    torch.testing.assert_close(out(net), out(reference(base, snap_b)), atol=ATOL, rtol=0)
    with lorakit.disabled(net):
        assert torch.equal(out(net), out(base))
