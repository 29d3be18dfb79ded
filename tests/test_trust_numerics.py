"""Issue 11 items 11 (merge numerics) and 13 (combine rank, quantize skip): never silently wrong.

* merge → unmerge restores every base weight bit-exactly, in every dtype (the pre-merge weight is kept);
* a partial unmerge leaves ``round(original + remaining deltas)``, rounded once;
* a merge that would overflow the base dtype (fp16) is refused before anything changes;
* ``combine(rank=...)`` and ``quantize(skip=...)`` validate their arguments before anything changes.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit import AdapterConfig


def _randomise(model, name="default", seed=5, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    for _, module in model.named_modules():
        if isinstance(module, lorakit.AdaptedLayer) and name in module.adapters:
            ad = module.adapters[name]
            with torch.no_grad():
                for p in ad.parameters():
                    if p.dim() == 2:
                        p.copy_(torch.randn(p.shape, generator=g) * scale)


def _base_weights(model):
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, lorakit.AdaptedLayer):
            out[path] = module.base.weight.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------------------
# exact unmerge
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_unmerge_restores_base_bit_exactly(dtype, method):
    model = tiny_llama(layers=1).to(dtype)
    lorakit.attach(model, AdapterConfig(method=method, r=4, targets="all-linear"))
    _randomise(model, scale=0.05)
    before = _base_weights(model)
    for _ in range(3):  # repeated cycles must not drift either
        lorakit.merge(model)
        changed = _base_weights(model)
        assert any(not torch.equal(changed[k], before[k]) for k in before)
        lorakit.unmerge(model)
    after = _base_weights(model)
    diff = [k for k in before if not torch.equal(before[k], after[k])]
    assert not diff, f"{len(diff)} layers changed, e.g. {diff[:3]}"


def test_partial_unmerge_is_original_plus_remaining_deltas_rounded_once():
    model = nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16)
    for n in ("a", "b", "c"):
        lorakit.attach(model, AdapterConfig(r=3, targets=["0"]), name=n)
        _randomise(model, n, seed=ord(n), scale=0.2)
    layer = model[0]
    w0 = layer.base.weight.detach().clone()
    lorakit.merge(model, ["a"])
    lorakit.merge(model, ["b", "c"])
    lorakit.unmerge(model, ["b"])
    assert layer.merged == ["a", "c"]
    acc = w0.float() + layer.adapters["a"].delta_weight(layer) + layer.adapters["c"].delta_weight(layer)
    assert torch.equal(layer.base.weight, acc.to(torch.bfloat16))
    lorakit.unmerge(model)
    assert torch.equal(layer.base.weight, w0)


def test_disabled_and_delete_while_merged_restore_exactly():
    model = tiny_llama(layers=1).to(torch.bfloat16)
    lorakit.attach(model, AdapterConfig(r=4, targets=["q_proj", "v_proj"]))
    _randomise(model, scale=0.05)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(model)
    before = _base_weights(model)
    lorakit.merge(model)
    with lorakit.disabled(model), torch.no_grad():
        inner = _base_weights(model)
        assert all(torch.equal(inner[k], before[k]) for k in before)
    lorakit.delete(model, "default")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lorakit.unload(plain, merge=False)(input_ids=ids).logits)


def test_base_shift_while_another_adapter_is_merged_stays_consistent():
    """delete() of a Delta-LoRA adapter undoes its base shift (via change_base_weight) while a LoRA is merged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    w0 = net[0].weight.detach().clone()
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, delta_start=0), name="d")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    hooks = lorakit.training_hooks(net)
    for _ in range(3):
        net(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
    assert not torch.equal(net[0].base.weight, w0)  # the base moved
    lorakit.attach(net, AdapterConfig(r=2), name="a")
    _randomise(net, "a")
    delta_a = net[0].adapters["a"].delta_weight(net[0])
    lorakit.merge(net, ["a"])
    lorakit.delete(net, "d")
    assert torch.allclose(net[0].base.weight, w0 + delta_a, atol=1e-6)
    lorakit.unmerge(net)
    assert torch.allclose(net[0].base.weight, w0, atol=1e-6)


def test_delta_lora_steps_while_another_adapter_is_merged_keep_its_base_moves():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    w0 = net[0].weight.detach().clone()
    lorakit.attach(net, AdapterConfig(r=2), name="a")
    _randomise(net, "a")
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, delta_start=0), name="d")
    lorakit.merge(net, ["a"])
    lorakit.set_active(net, ["a", "d"])
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    hooks = lorakit.training_hooks(net)
    for _ in range(3):
        net(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
    shift = net[0].adapters["d"].base_shift()
    assert shift.abs().max() > 0
    lorakit.unmerge(net)
    assert torch.allclose(net[0].base.weight, w0 + shift, atol=1e-6)


def test_base_changing_adapter_refused_on_a_merged_layer():
    net = nn.Sequential(nn.Linear(8, 8))
    lorakit.attach(net, AdapterConfig(r=2), name="a")
    _randomise(net, "a")
    lorakit.merge(net)
    merged = net[0].base.weight.detach().clone()
    with pytest.raises(ValueError, match="unmerge"):
        lorakit.attach(net, AdapterConfig(r=2, init="pissa"), name="p")
    assert lorakit.adapter_names(net) == ["a"]
    assert torch.equal(net[0].base.weight, merged)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), r=st.integers(1, 4),
       scale=st.floats(1e-3, 1.0), seed=st.integers(0, 2**16), order=st.permutations(["a", "b"]))
def test_property_merge_unmerge_any_order_exact(dtype, r, scale, seed, order):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5)).to(dtype)
    w0 = net[0].weight.detach().clone()
    for n in ("a", "b"):
        lorakit.attach(net, AdapterConfig(r=r, targets=["0"]), name=n)
        _randomise(net, n, seed=seed + ord(n), scale=scale)
    lorakit.merge(net, [order[0]])
    lorakit.merge(net, [order[1]])
    lorakit.unmerge(net, [order[0]])
    lorakit.unmerge(net, [order[1]])
    assert torch.equal(net[0].base.weight, w0)


# ---------------------------------------------------------------------------------------------------------------
# overflow
# ---------------------------------------------------------------------------------------------------------------
def _overflowing_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).to(torch.float16)
    lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"]))
    with torch.no_grad():
        for i in (0, 2):
            ad = net[i].adapters["default"]
            ad.A.fill_(1.0)
            ad.B.fill_(0.01)
        net[2].adapters["default"].B.fill_(6e4)  # s·BA = 2·6e4 > 65504 in layer "2" only
    return net


def test_fp16_merge_overflow_refused_and_model_unchanged():
    net = _overflowing_net()
    x = torch.randn(3, 4).to(torch.float16)
    with torch.no_grad():
        out_before = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)'2'.*float16.*(float32|bfloat16)"):
        lorakit.merge(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net[0].merged == [] and net[2].merged == []
    assert all(torch.isfinite(p).all() for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(net(x), out_before)


def test_fp16_unload_merge_overflow_refused():
    net = _overflowing_net()
    with pytest.raises(ValueError, match="overflow"):
        lorakit.unload(net, merge=True)
    assert lorakit.adapter_names(net) == ["default"]
    assert isinstance(net[2], lorakit.AdaptedLayer)
    assert net[2].merged == []


def test_merge_of_nan_adapter_refused():
    net = nn.Sequential(nn.Linear(4, 4))
    lorakit.attach(net, AdapterConfig(r=2))
    with torch.no_grad():
        net[0].adapters["default"].B.fill_(float("nan"))
    w = net[0].base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite|overflow"):
        lorakit.merge(net)
    assert torch.equal(net[0].base.weight, w)


# ---------------------------------------------------------------------------------------------------------------
# combine(rank=...)
# ---------------------------------------------------------------------------------------------------------------
def _two_adapters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    for n in ("a", "b"):
        lorakit.attach(net, AdapterConfig(r=2, targets=["0", "2"]), name=n)
        _randomise(net, n, seed=ord(n))
    return net


@pytest.mark.parametrize("rank", [-1, 0, 2.5, True, "2", 5])
def test_combine_invalid_rank_refused_before_any_change(rank):
    net = _two_adapters()
    with pytest.raises(ValueError, match="rank"):
        lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="mix", how="svd", rank=rank)
    assert lorakit.adapter_names(net) == ["a", "b"]
    assert "mix" not in net[0].adapters and "mix" not in net[2].adapters


def test_combine_rank_only_for_svd():
    net = _two_adapters()
    with pytest.raises(ValueError, match="svd"):
        lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="mix", how="cat", rank=2)
    assert lorakit.adapter_names(net) == ["a", "b"]


def test_combine_valid_rank_gives_that_rank():
    net = _two_adapters()
    lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="mix", how="svd", rank=3)
    assert net[0].adapters["mix"].r == 3 and net[2].adapters["mix"].r == 3
    lorakit.combine(net, {"a": 0.5, "b": 0.5}, name="mix4", how="svd", rank=4)  # = min(out, in) of layer "2"
    assert net[2].adapters["mix4"].r == 4


# ---------------------------------------------------------------------------------------------------------------
# quantize(skip=...)
# ---------------------------------------------------------------------------------------------------------------
class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 4)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_quantize_skip_typo_refused_with_suggestion_nothing_quantised():
    model = _Classifier()
    with pytest.raises(ValueError, match=r"(?s)'classifer'.*classifier"):
        lorakit.quantize(model, compute_dtype=torch.float32, skip=("classifer",))
    assert type(model.body[0]) is nn.Linear and type(model.classifier) is nn.Linear


def test_quantize_invalid_skip_regex_refused():
    model = _Classifier()
    with pytest.raises(ValueError, match=r"classifier\["):
        lorakit.quantize(model, compute_dtype=torch.float32, skip=("classifier[",))
    assert type(model.body[0]) is nn.Linear


@pytest.mark.parametrize("kwargs, words", [
    (dict(skip=5), "skip=5"),
    (dict(skip=[("classifier",)]), "skip="),
    (dict(double_quant="yes"), "double_quant='yes'"),
    (dict(double_quant=1), "double_quant=1"),
])
def test_quantize_arguments_of_the_wrong_type_are_refused_before_any_change(kwargs, words):
    # skip=5 was a TypeError from deep inside; double_quant="yes" was silently taken as true
    model = _Classifier()
    with pytest.raises(ValueError, match=re.escape(words)):
        lorakit.quantize(model, compute_dtype=torch.float32, **kwargs)
    assert type(model.body[0]) is nn.Linear and type(model.classifier) is nn.Linear


def test_quantize_valid_skip_keeps_head_and_default_is_lenient():
    model = _Classifier()
    lorakit.quantize(model, compute_dtype=torch.float32, skip=("classifier",))
    assert type(model.classifier) is nn.Linear and type(model.body[0]).__name__ == "Linear4bit"
    plain = nn.Sequential(nn.Linear(64, 64))  # no lm_head: the default skip does not complain
    lorakit.quantize(plain, compute_dtype=torch.float32)
    assert type(plain[0]).__name__ == "Linear4bit"


def test_quantize_skip_of_a_container_skips_its_layers():
    model = _Classifier()
    lorakit.quantize(model, compute_dtype=torch.float32, skip=("body",))
    assert type(model.body[0]) is nn.Linear and type(model.classifier).__name__ == "Linear4bit"


def test_train_job_with_quantize_on_a_classifier_still_runs(tiny_classifier_folder, tmp_path):
    """The job's skip list names only modules the model has (a BERT classifier has no lm_head)."""
    from lorakit.train.job import JobConfig, run_job

    folder, data = tiny_classifier_folder
    job = JobConfig(model=str(folder), data=str(data), quantize=True, output_dir=str(tmp_path / "run"),
                    adapter={"method": "lora", "r": 2}, train={"steps": 1, "batch_size": 4, "lr": 1e-3})
    run_job(job)
    assert (tmp_path / "run" / "adapter").is_dir()
