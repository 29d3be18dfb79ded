"""Hot-swap (lorakit.prepare_hotswap + lorakit.hotswap): another adapter's values copied into an attached one in place
compute what a fresh load computes, in lorakit's and PEFT's format, without recompiling a compiled model; bad input is
refused before anything changes."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ConvNet, tiny_llama

import lorakit
from lorakit import AdapterConfig
from lorakit.io import AdapterLoadError
from lorakit.registry import registry


def _trained(model, config, seed):
    """``model`` with adapter ``config`` attached and random (non-zero) factors, as after training."""
    lorakit.attach(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _saved(tmp_path, base, config, seed, tag):
    return lorakit.save(_trained(copy.deepcopy(base), config, seed), tmp_path / tag)


def _conv_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 5, 5, generator=g), torch.randint(0, 20, (2, 4), generator=g)


def _adapters(model):
    return [layer.adapters["default"] for _, layer in lorakit.model.adapted_layers(model)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_swapped_adapters_compute_what_a_fresh_load_computes(tmp_path):
    """Linear, Conv2d and Embedding layers; ranks below, at and above the attached one; alphas and rsLoRA differ."""
    base = ConvNet().eval()
    img, tok = _conv_inputs()
    model = _trained(copy.deepcopy(base), AdapterConfig(r=4, alpha=8), seed=1)
    lorakit.prepare_hotswap(model, max_rank=8)
    before = model(img, tok)
    with torch.no_grad():
        assert torch.allclose(before, _trained(copy.deepcopy(base), AdapterConfig(r=4, alpha=8), seed=1)(img, tok),
                              atol=1e-6)  # preparing does not change what the model computes
    for i, config in enumerate([AdapterConfig(r=2, alpha=32, init="gaussian"), AdapterConfig(r=8, alpha=3.0),
                                AdapterConfig(r=6, alpha=12, scaling="rslora", init="init_b")]):
        folder = _saved(tmp_path, base, config, seed=10 + i, tag=f"a{i}")
        lorakit.hotswap(model, folder)
        fresh = lorakit.load(copy.deepcopy(base), folder)
        with torch.no_grad():
            got, want = model(img, tok), fresh(img, tok)
        assert (want - before).abs().max() > 1e-2  # the swap really changes the output
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert registry(model).configs["default"] == registry(fresh).configs["default"]


def test_swap_matches_the_lora_formula_and_saves_at_the_new_rank(tmp_path):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with the new A, B and s = alpha/r, written plainly; save writes rank r (not
    max_rank)."""
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    model = _trained(copy.deepcopy(base), AdapterConfig(r=2), seed=3)
    lorakit.prepare_hotswap(model, max_rank=7)
    other = _trained(copy.deepcopy(base), AdapterConfig(r=3, alpha=5.0), seed=4)
    folder = lorakit.save(other, tmp_path / "b")
    lorakit.hotswap(model, folder)
    a, b = other[0].adapters["default"].A, other[0].adapters["default"].B
    x = torch.randn(4, 6)
    want = x @ base[0].weight.T + base[0].bias + (5.0 / 3) * (x @ a.T) @ b.T
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
    again = lorakit.save(model, tmp_path / "again")
    reloaded = lorakit.load(copy.deepcopy(base), again)
    assert tuple(reloaded[0].adapters["default"].A.shape) == (3, 6)
    assert torch.equal(reloaded[0].adapters["default"].A, a) and torch.equal(reloaded[0].adapters["default"].B, b)


def test_a_peft_adapter_swaps_in_with_peft_outputs(tmp_path):
    """An rsLoRA adapter PEFT saved (rank 6) replaces a lorakit LoRA of rank 2: logits equal PEFT's own."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=2)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=6, lora_alpha=9, use_rslora=True, lora_dropout=0.0,
                                                        target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval().save_pretrained(tmp_path / "peft")
    model = _trained(copy.deepcopy(base), AdapterConfig(r=2, targets=["q_proj", "v_proj"]), seed=1)
    lorakit.prepare_hotswap(model, max_rank=8)
    lorakit.hotswap(model, tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 10), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)


def _compiled_llama_and_folders(tmp_path):
    base = tiny_llama(seed=1)
    model = _trained(copy.deepcopy(base), AdapterConfig(r=4, alpha=8), seed=1)
    folders = [_saved(tmp_path, base, AdapterConfig(r=8, alpha=3.0), seed=2, tag="r8"),
               _saved(tmp_path, base, AdapterConfig(r=2, alpha=16, scaling="rslora"), seed=3, tag="r2")]
    return base, model, folders


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_runs_swapped_adapters_without_recompiling(tmp_path, backend):
    base, model, folders = _compiled_llama_and_folders(tmp_path)
    lorakit.prepare_hotswap(model, max_rank=8)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        first = compiled(ids).logits
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for folder in folders:
            lorakit.hotswap(compiled, folder)
            got = compiled(ids).logits  # raises RecompileError if the swap changed a guard
            want = lorakit.load(copy.deepcopy(base), folder)(ids).logits
            assert (want - first).abs().max() > 1e-3
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_an_inductor_compiled_model_runs_swapped_adapters_without_recompiling(tmp_path):
    base, model, folders = _compiled_llama_and_folders(tmp_path)
    lorakit.prepare_hotswap(model, max_rank=8)
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(ids)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for folder in folders:
            lorakit.hotswap(compiled, folder)
            want = lorakit.load(copy.deepcopy(base), folder)(ids).logits
            torch.testing.assert_close(compiled(ids).logits, want, rtol=1e-4, atol=1e-4)


def _refused(model, call, *words):
    """``call`` raises one line naming ``words``, and the model (tensors, configs) is unchanged."""
    state, configs = _state(model), dict(registry(model).configs)
    with pytest.raises((ValueError, AdapterLoadError)) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert dict(registry(model).configs) == configs


def test_bad_input_is_refused_before_anything_changes(tmp_path):
    base = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    model = _trained(copy.deepcopy(base), AdapterConfig(r=2), seed=1)
    too_big = _saved(tmp_path, base, AdapterConfig(r=5), seed=2, tag="big")
    _refused(model, lambda: lorakit.hotswap(model, too_big), "prepare_hotswap")  # not prepared yet
    lorakit.prepare_hotswap(model, max_rank=4)
    _refused(model, lambda: lorakit.hotswap(model, too_big), "rank 5", "max_rank")
    dora = _saved(tmp_path, base, AdapterConfig(method="dora", r=2), seed=3, tag="dora")
    _refused(model, lambda: lorakit.hotswap(model, dora), "'dora'", "same method")
    other_layers = _saved(tmp_path, base, AdapterConfig(r=2, targets=["0"]), seed=4, tag="layers")
    _refused(model, lambda: lorakit.hotswap(model, other_layers), "other layers", "'2'")
    wider = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    other_base = _saved(tmp_path, wider, AdapterConfig(r=2), seed=5, tag="wider")
    _refused(model, lambda: lorakit.hotswap(model, other_base), "shape")
    _refused(model, lambda: lorakit.hotswap(model, too_big, name="nope"), "no adapter 'nope'")
    _refused(model, lambda: lorakit.prepare_hotswap(model, max_rank=1), "max_rank=1")


@pytest.mark.parametrize("config, words", [
    (AdapterConfig(method="dora", r=2), ("'dora'", "cannot be hot-swapped")),
    (AdapterConfig(method="vera", r=2), ("'vera'", "cannot be hot-swapped")),
    (AdapterConfig(r=2, init="pissa"), ("convert_pissa=True",)),
])
def test_members_without_a_hot_swap_form_are_refused(config, words):
    model = _trained(torch.nn.Sequential(torch.nn.Linear(6, 6)), config, seed=1)
    _refused(model, lambda: lorakit.prepare_hotswap(model, max_rank=4), *words)


def test_a_compiled_model_cannot_be_prepared():
    model = _trained(torch.nn.Sequential(torch.nn.Linear(6, 6)), AdapterConfig(r=2), seed=1)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="before torch.compile"):
        lorakit.prepare_hotswap(compiled, max_rank=4)


def test_a_swap_replaces_the_adapters_own_head_too(tmp_path):
    """modules_to_save: the adapter's own copy of the head takes the new adapter's values; the original stays."""
    base = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    config = AdapterConfig(r=2, targets=["0"], modules_to_save=["2"])
    model = _trained(copy.deepcopy(base), config, seed=1)
    lorakit.prepare_hotswap(model, max_rank=4)
    folder = _saved(tmp_path, base, AdapterConfig(r=4, alpha=2.0, targets=["0"], modules_to_save=["2"]), 7, "head")
    lorakit.hotswap(model, folder)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lorakit.load(copy.deepcopy(base), folder)(x))
        assert torch.equal(model[2].original.weight, base[2].weight)


def test_lora_fa_and_a_finished_sora_hot_swap(tmp_path):
    """LoRA-FA (its frozen A regenerated from the saved seed) and a finished SoRA adapter (plain LoRA by then)."""
    base = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    x = torch.randn(5, 6)
    model = _trained(copy.deepcopy(base), AdapterConfig(method="lora_fa", r=2), seed=1)
    lorakit.prepare_hotswap(model, max_rank=6)
    folder = _saved(tmp_path, base, AdapterConfig(method="lora_fa", r=5, alpha=3.0, save_projection=False), 2, "fa")
    lorakit.hotswap(model, folder)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lorakit.load(copy.deepcopy(base), folder)(x))
    again = lorakit.load(copy.deepcopy(base), lorakit.save(model, tmp_path / "fa2"))  # rank 5, A as its seed
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    sora = _trained(copy.deepcopy(base), AdapterConfig(method="sora", r=4), seed=3)
    with torch.no_grad():
        for _, layer in lorakit.model.adapted_layers(sora):
            layer.adapters["default"].gate[1] = 0.0  # a pruned gate
    lorakit.training_hooks(sora).finish()
    lorakit.prepare_hotswap(sora, max_rank=6)
    plain = _saved(tmp_path, base, AdapterConfig(r=6, alpha=2.0), 4, "plain")
    lorakit.hotswap(sora, plain)
    with torch.no_grad():
        torch.testing.assert_close(sora(x), lorakit.load(copy.deepcopy(base), plain)(x))


def test_an_interrupted_swap_puts_every_value_back(tmp_path, monkeypatch):
    """Ctrl-C while the values are copied (after the first layer): every layer and the config are as before."""
    from lorakit.methods.lora import LoraAdapter

    base = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    model = _trained(copy.deepcopy(base), AdapterConfig(r=2), seed=1)
    lorakit.prepare_hotswap(model, max_rank=4)
    folder = _saved(tmp_path, base, AdapterConfig(r=3, alpha=7.0), 2, "b")
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
    real, calls = LoraAdapter.hotswap_from, []

    def interrupted(self, new):
        calls.append(self.path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, new)

    monkeypatch.setattr(LoraAdapter, "hotswap_from", interrupted)
    _state_before, configs = _state(model), dict(registry(model).configs)
    ranks_and_scalings = [(a.r, a.scaling) for a in _adapters(model)]
    with pytest.raises(KeyboardInterrupt):
        lorakit.hotswap(model, folder)
    assert len(calls) == 2
    after = model.state_dict()
    assert all(torch.equal(_state_before[k], after[k]) for k in _state_before)
    assert dict(registry(model).configs) == configs
    assert [(a.r, a.scaling) for a in _adapters(model)] == ranks_and_scalings
    with torch.no_grad():
        assert torch.equal(model(x), before)
