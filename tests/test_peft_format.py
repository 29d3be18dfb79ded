"""PEFT's folder format both ways: PEFT-made adapters load with PEFT's outputs; ours load in PEFT with ours."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ConvNet, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterConfig
from lorakit.peft_format import PeftFormatError

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def randomise_adapters(model, seed=1):
    """PEFT inits B = 0; give every adapter tensor random values so the comparison means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "vera_lambda" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_folder(tmp_path, base, config, name="peft"):
    model = get_peft_model(copy.deepcopy(base), config)
    randomise_adapters(model)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def peft_logits(base, folder, inputs):
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        return model(**inputs).logits


def ours_logits(base, folder, inputs):
    model = lorakit.load(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=8, target_modules="all-linear"),
    dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
         rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"v_proj": 3}),
    dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k)_proj", use_dora=True),
])
def test_peft_lora_loads_with_peft_outputs(tmp_path, kwargs):
    if kwargs.get("use_dora"):
        pytest.importorskip("lorakit.methods.dora")
    base = tiny_llama()
    folder = peft_folder(tmp_path, base, LoraConfig(**kwargs))
    inputs = {"input_ids": IDS}
    torch.testing.assert_close(ours_logits(base, folder, inputs), peft_logits(base, folder, inputs),
                               atol=1e-5, rtol=0)


def test_peft_embedding_lora_and_modules_to_save(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64)).eval()
    folder = peft_folder(tmp_path, base, LoraConfig(r=4, lora_alpha=8, modules_to_save=["classifier"],
                                                    target_modules=["query", "value", "word_embeddings"]))
    inputs = {"input_ids": IDS}
    ours = ours_logits(base, folder, inputs)
    torch.testing.assert_close(ours, peft_logits(base, folder, inputs), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(ours, base(**inputs).logits, atol=1e-3)  # the adapter really changed something


def test_peft_conv2d_and_conv1d(tmp_path):
    net = ConvNet().eval()
    folder = peft_folder(tmp_path, net, LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]), "conv")
    x = torch.randn(2, 3, 8, 8)
    ours = lorakit.load(copy.deepcopy(net), folder).eval()
    theirs = PeftModel.from_pretrained(copy.deepcopy(net), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.conv(x), theirs.base_model.model.conv(x), atol=1e-5, rtol=0)
    gpt = tiny_gpt2()
    folder = peft_folder(tmp_path, gpt, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                   fan_in_fan_out=True), "gpt")
    inputs = {"input_ids": IDS}
    torch.testing.assert_close(ours_logits(gpt, folder, inputs), peft_logits(gpt, folder, inputs), atol=1e-5, rtol=0)


def test_keys_without_prefix_load_too(tmp_path):
    base = tiny_llama()
    folder = peft_folder(tmp_path, base, LoraConfig(r=4, target_modules=["q_proj"]))
    inputs = {"input_ids": IDS}
    expected = peft_logits(base, folder, inputs)
    sd = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): v for k, v in sd.items()}, str(folder / "adapter_model.safetensors"))
    torch.testing.assert_close(ours_logits(base, folder, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_lorakit_adapter_loads_in_peft_with_our_outputs(tmp_path, init, scaling):
    base = tiny_llama()
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(r=4, alpha=12, scaling=scaling, init=init, seed=0,
                                        rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B") or "lm_head" in n:
                p.add_(torch.randn(p.shape) * 0.05)
    model.eval()
    folder = lorakit.save(model, tmp_path / "ours", format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and isinstance(cfg["target_modules"], list)
    inputs = {"input_ids": IDS}
    with torch.no_grad():
        ours = model(**inputs).logits
    torch.testing.assert_close(peft_logits(base, folder, inputs), ours, atol=1e-5, rtol=0)
    # and back into lorakit from the PEFT folder
    torch.testing.assert_close(ours_logits(base, folder, inputs), ours, atol=1e-5, rtol=0)


def test_unsupported_peft_folders_fail_cleanly(tmp_path):
    base = tiny_llama()
    folder = peft_folder(tmp_path, base, LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"))
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftFormatError, match="bias"):
        lorakit.load(model, folder)
    assert not any(isinstance(m, lorakit.AdaptedLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(bias="none", peft_type="LOHA")
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftFormatError, match="LOHA"):
        lorakit.load(model, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(PeftFormatError, match="pickle"):
        lorakit.load(model, folder)


def test_delta_lora_refuses_peft_export(tmp_path):
    pytest.importorskip("lorakit.methods.delta_lora")
    model = tiny_llama()
    lorakit.attach(model, AdapterConfig(method="delta_lora", r=4, delta_start=0, targets=["q_proj"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = lorakit.training_hooks(model)
    for _ in range(2):  # two steps: B moves away from 0, so BA changes and the base weights move
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
    with pytest.raises(ValueError, match="base weights"):
        lorakit.save(model, tmp_path / "x", format="peft")


# ------------------------------------------------------------------------------------------------------ AdaLoRA
ADA_TARGETS = ["q_proj", "v_proj"]
ADA_PATHS = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ADA_TARGETS]


def ada_peft_config(**kw):
    from peft import AdaLoraConfig

    base = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=ADA_TARGETS, total_step=4, tinit=0, tfinal=1)
    return AdaLoraConfig(**{**base, **kw})


def adalora_ranks(model, name="default"):
    return {p: layer.adapters[name].r for p, layer in lorakit.model.adapted_layers(model) if name in layer.adapters}


def test_peft_adalora_unpruned_loads_with_peft_outputs(tmp_path):
    pytest.importorskip("lorakit.methods.adalora")
    base = tiny_llama(hidden=32)
    folder = peft_folder(tmp_path, base, ada_peft_config(lora_alpha=6))
    inputs = {"input_ids": IDS}
    ours = lorakit.load(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        got, plain = ours(**inputs).logits, base(**inputs).logits
    expected = peft_logits(base, folder, inputs)
    assert (expected - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    config = lorakit.model.registry(ours).configs["default"]
    assert config.method == "adalora" and config.r == 4 and config.final_ranks is None
    assert set(adalora_ranks(ours).values()) == {4}


@pytest.mark.parametrize("how", ["masks_with_rank_zero", "peft_allocation"])
def test_peft_adalora_pruned_by_rank_allocation_loads_with_peft_outputs(tmp_path, how):
    pytest.importorskip("lorakit.methods.adalora")
    base = tiny_llama(hidden=32)
    model = get_peft_model(copy.deepcopy(base), ada_peft_config())
    randomise_adapters(model)
    if how == "masks_with_rank_zero":
        masks = dict(zip(ADA_PATHS, [[True, False, True, True], [False] * 4, [True, False, False, False],
                                     [True] * 4]))
        model.peft_config["default"].rank_pattern = {f"{p}.lora_E": m for p, m in masks.items()}
    else:  # PEFT's own allocator, on fixed weights and gradients, until the final phase fixes the pattern
        g = torch.Generator().manual_seed(3)
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for step in range(1, 5):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            model.base_model.update_and_allocate(step)
        pattern = model.peft_config["default"].rank_pattern
        masks = {p: pattern[f"{p}.lora_E.default"] for p in ADA_PATHS}
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {f"{p}.lora_E": m for p, m in masks.items()}
    kept = {p: sum(m) for p, m in masks.items()}
    assert sum(kept.values()) < 16  # something really was pruned

    inputs = {"input_ids": IDS}
    ours = lorakit.load(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        got = ours(**inputs).logits
    torch.testing.assert_close(got, peft_logits(base, folder, inputs), atol=1e-5, rtol=0)
    # the initial rank stays r (so the scaling is alpha / (init_r + 1e-5) = 8 / 4.00001); kept ranks in final_ranks
    config = lorakit.model.registry(ours).configs["default"]
    assert config.r == 4 and config.final_ranks == kept and config.rank_pattern is None
    assert adalora_ranks(ours) == kept
    for _, layer in lorakit.model.adapted_layers(ours):
        assert layer.adapters["default"].scaling == pytest.approx(8 / (4 + 1e-5), rel=1e-12)


def _lorakit_adalora_model(base):
    model = copy.deepcopy(base)
    # different initial ranks and alphas per layer: PEFT has one init_r and one alpha, so the writer must use masks
    # and fold the scaling ratio into λ
    lorakit.attach(model, AdapterConfig(method="adalora", r=4, alpha=8, target_r=2, total_steps=6, t_final=2,
                                        targets=ADA_TARGETS, rank_pattern={"v_proj": 3}, alpha_pattern={"q_proj": 5},
                                        seed=0, orth_reg=0.5))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    hooks = lorakit.training_hooks(model)
    for _ in range(3):  # part of the schedule: some λ are masked to zero, nothing is pruned yet
        loss = model(input_ids=IDS, labels=IDS).loss + lorakit.regularization_loss(model)
        loss.backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
    return model.eval(), hooks


def _peft_matches_ours(base, model, folder):
    inputs = {"input_ids": IDS}
    with torch.no_grad():
        ours = model(**inputs).logits
        assert (ours - base(**inputs).logits).abs().max() > 1e-3
    torch.testing.assert_close(peft_logits(base, folder, inputs), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_logits(base, folder, inputs), ours, atol=1e-5, rtol=0)  # and back


def test_lorakit_adalora_loads_in_peft_before_and_after_pruning(tmp_path):
    pytest.importorskip("lorakit.methods.adalora")
    base = tiny_llama(hidden=32)
    model, hooks = _lorakit_adalora_model(base)
    assert any((layer.adapters["default"].E == 0).any() for _, layer in lorakit.model.adapted_layers(model))
    folder = lorakit.save(model, tmp_path / "before", format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 4
    # v_proj starts with 3 of PEFT's 4 triplets: a mask keeping 3, tensors of 3 rows
    assert cfg["rank_pattern"] == {f"{p}.lora_E": [True] * 3 + [False] for p in ADA_PATHS if "v_proj" in p}
    _peft_matches_ours(base, model, folder)

    hooks.finish()
    ranks = adalora_ranks(model)
    assert sum(ranks.values()) == 2 * len(ADA_PATHS)
    folder = lorakit.save(model, tmp_path / "after", format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {f"{p}.lora_E": [True] * r + [False] * (4 - r) for p, r in ranks.items() if r < 4}
    _peft_matches_ours(base, model, folder)


def test_lorakit_adalora_rank_zero_layers_load_in_peft(tmp_path):
    pytest.importorskip("lorakit.methods.adalora")
    base = tiny_llama(hidden=32)
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(method="adalora", r=4, alpha=8, target_r=2, total_steps=10,
                                        targets=ADA_TARGETS, seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, path in enumerate(ADA_PATHS):  # λ = 0 for 4, 3, 1, 0 triplets: no importance measured, so finish()
            e = model.get_submodule(path).adapters["default"].E  # prunes by |λ|·‖A‖·‖B‖ -> ranks 0, 1, 3, 4
            e.copy_(torch.randn(4, 1, generator=g))
            e[: (4, 3, 1, 0)[i]] = 0.0
    model.eval()
    lorakit.training_hooks(model).finish()
    assert adalora_ranks(model) == dict(zip(ADA_PATHS, (0, 1, 3, 4)))
    folder = lorakit.save(model, tmp_path / "peft", format="peft")
    sd = load_file(str(folder / "adapter_model.safetensors"))
    assert tuple(sd[f"base_model.model.{ADA_PATHS[0]}.lora_A"].shape) == (0, 32)
    _peft_matches_ours(base, model, folder)


# ------------------------------------------------------------------------------------------- several adapters
def _two_adapter_model(base, names=("default", "other")):
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, targets=["q_proj"], seed=0), name=names[0])
    lorakit.attach(model, AdapterConfig(r=2, alpha=3, scaling="rslora", targets=["v_proj", "down_proj"],
                                        rank_pattern={"down_proj": 3}, seed=1), name=names[1])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


def _logits_of(model, name):
    lorakit.set_active(model, [name])
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_several_adapters_use_peft_multi_adapter_layout(tmp_path):
    base = tiny_llama()
    model = _two_adapter_model(base)
    expected = {n: _logits_of(model, n) for n in ("default", "other")}
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    folder = lorakit.save(model, tmp_path / "both", format="peft")
    # PEFT's save_pretrained layout: "default" at the top, every other adapter in a subfolder named after it
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert (folder / "other" / "adapter_config.json").exists()

    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    theirs.load_adapter(folder / "other", adapter_name="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(theirs(input_ids=IDS).logits, expected[name], atol=1e-5, rtol=0)
    other_alone = peft_logits(base, folder / "other", {"input_ids": IDS})
    torch.testing.assert_close(other_alone, expected["other"], atol=1e-5, rtol=0)

    # PEFT's own multi-adapter save of the same two adapters has the same layout, and lorakit loads it whole
    theirs.save_pretrained(tmp_path / "peft_saved")
    peft_layout = sorted(p.name for p in (tmp_path / "peft_saved").iterdir() if p.name != "README.md")
    assert peft_layout == sorted(p.name for p in folder.iterdir())
    for src in (folder, tmp_path / "peft_saved"):
        ours = lorakit.load(copy.deepcopy(base), src).eval()
        assert lorakit.adapter_names(ours) == ["default", "other"]
        assert lorakit.active_adapters(ours) == ["default", "other"]
        for name in ("default", "other"):
            torch.testing.assert_close(_logits_of(ours, name), expected[name], atol=1e-5, rtol=0)
        # name= selects one of several
        one = lorakit.load(copy.deepcopy(base), src, name="other").eval()
        assert lorakit.adapter_names(one) == ["other"]
        torch.testing.assert_close(_logits_of(one, "other"), expected["other"], atol=1e-5, rtol=0)


def test_several_adapters_without_default_all_go_in_subfolders(tmp_path):
    base = tiny_llama()
    model = _two_adapter_model(base, names=("first", "second"))
    expected = {n: _logits_of(model, n) for n in ("first", "second")}
    folder = lorakit.save(model, tmp_path / "x", format="peft")
    assert sorted(p.name for p in folder.iterdir()) == ["first", "second"]
    for name in ("first", "second"):
        torch.testing.assert_close(peft_logits(base, folder / name, {"input_ids": IDS}), expected[name],
                                   atol=1e-5, rtol=0)
    ours = lorakit.load(copy.deepcopy(base), folder).eval()
    assert lorakit.adapter_names(ours) == ["first", "second"]
    for name in ("first", "second"):
        torch.testing.assert_close(_logits_of(ours, name), expected[name], atol=1e-5, rtol=0)
    # one adapter of a multi-adapter model still goes to the top of the folder
    single = lorakit.save(model, tmp_path / "one", names="second", format="peft")
    assert (single / "adapter_config.json").exists()


def test_peft_folder_loads_under_a_chosen_name_next_to_existing_adapters(tmp_path):
    base = tiny_llama()
    folder = peft_folder(tmp_path, base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    inputs = {"input_ids": IDS}
    peft_out = peft_logits(base, folder, inputs)
    model = _two_adapter_model(base)  # q_proj already carries "default": both adapters live in the same layers
    before = {n: _logits_of(model, n) for n in ("default", "other")}
    lorakit.load(model, folder, name="imported")
    assert lorakit.adapter_names(model) == ["default", "other", "imported"]
    assert lorakit.active_adapters(model) == ["imported"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, peft_out, atol=1e-5, rtol=0)
    for name, out in before.items():  # the existing adapters are untouched
        torch.testing.assert_close(_logits_of(model, name), out, atol=0, rtol=0)
    with pytest.raises(lorakit.io.AdapterLoadError, match="already exist"):
        lorakit.load(model, folder, name="other")


def test_failed_peft_load_leaves_the_model_unchanged(tmp_path):
    base = tiny_llama()
    multi = tmp_path / "multi"
    good = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["k_proj"], modules_to_save=["lm_head"]))
    randomise_adapters(good)
    good.save_pretrained(multi)  # "default" at the top: loads first, overwriting lm_head
    peft_folder(multi, base, LoraConfig(r=2, target_modules=["up_proj"], modules_to_save=["lm_head"]), name="zz")
    sd = load_file(str(multi / "zz" / "adapter_model.safetensors"))
    key = next(k for k in sd if "lm_head" in k)
    sd[key] = sd[key][:, :-1].contiguous()  # a modules_to_save tensor of the wrong shape, found only when loading
    save_file(sd, str(multi / "zz" / "adapter_model.safetensors"))

    model = _two_adapter_model(base, names=("mine", "other"))
    lorakit.set_active(model, ["other"])
    lorakit.set_trainable(model, "other")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    with pytest.raises(lorakit.io.AdapterLoadError, match="lm_head"):
        lorakit.load(model, multi)
    assert lorakit.adapter_names(model) == ["mine", "other"]
    assert lorakit.active_adapters(model) == ["other"]
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, out)
    # and a name that is none of the folder's adapters is refused before anything happens
    with pytest.raises(lorakit.io.AdapterLoadError, match="none of them"):
        lorakit.load(model, multi, name="nope")


# ------------------------------------------------------------------------ methods PEFT lacks: written as plain LoRA
def _randomise_ours(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _saved_as_plain_lora(base, model, folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["use_dora"] and not cfg["use_rslora"]
    _peft_matches_ours(base, model, folder)


@pytest.mark.parametrize("finished", [False, True])
def test_sora_written_as_plain_lora(tmp_path, finished):
    pytest.importorskip("lorakit.methods.sora")
    base = tiny_llama()
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(method="sora", r=4, alpha=6, targets=["q_proj", "up_proj"], seed=0))
    _randomise_ours(model)
    with torch.no_grad():
        for i, (_, layer) in enumerate(lorakit.model.adapted_layers(model)):
            layer.adapters["default"].gate[: i % 4] = 0.0  # sparse gates: kept ranks 4, 3, 2, 1
    model.eval()
    if finished:
        lorakit.training_hooks(model).finish()  # pruned to a plain LoRA of rank nnz(g) per layer
    folder = lorakit.save(model, tmp_path / "sora", format="peft")
    # before finish: rank r with the gate folded into B (s·(B·diag(g))·A); after: the pruned ranks
    ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0]
             for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_A" in k}
    assert sorted(ranks.values()) == ([1, 2, 3, 4] if finished else [4] * 4)
    _saved_as_plain_lora(base, model, folder)


def test_lora_drop_shared_pair_written_per_layer(tmp_path):
    pytest.importorskip("lorakit.methods.lora_drop")
    base = tiny_llama()
    model = copy.deepcopy(base)
    selected = ["model.layers.1.self_attn.q_proj"]
    lorakit.attach(model, AdapterConfig(method="lora_drop", r=4, alpha=8, targets=["q_proj", "v_proj"],
                                        drop_selected=selected, seed=0))
    _randomise_ours(model)
    model.eval()
    folder = lorakit.save(model, tmp_path / "drop", format="peft")
    sd = load_file(str(folder / "adapter_model.safetensors"))
    # every layer gets its own copy; layers sharing a pair get equal tensors
    a = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v for k, v in sd.items() if "lora_A" in k}
    assert len(a) == 4
    assert torch.equal(a["model.layers.0.self_attn.v_proj"], a["model.layers.1.self_attn.v_proj"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj"], a["model.layers.1.self_attn.q_proj"])
    _saved_as_plain_lora(base, model, folder)


def test_lora_fa_written_as_plain_lora(tmp_path):
    pytest.importorskip("lorakit.methods.lora_fa")
    base = tiny_llama()
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(method="lora_fa", r=4, alpha=8, targets=["q_proj", "down_proj"], seed=0))
    _randomise_ours(model)  # B trains (A is frozen, so it keeps its init)
    model.eval()
    folder = lorakit.save(model, tmp_path / "fa", format="peft")
    _saved_as_plain_lora(base, model, folder)


# ------------------------------------------------------------------------------------------------------ VeRA
VERA_TARGETS = ["q_proj", "down_proj"]  # different shapes: the shared pair is sized for the largest (128 in)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_loads_with_peft_outputs(tmp_path, save_projection):
    pytest.importorskip("lorakit.methods.vera")
    from peft import VeraConfig

    base = tiny_llama()
    folder = peft_folder(tmp_path, base, VeraConfig(r=8, target_modules=VERA_TARGETS, projection_prng_key=5,
                                                    save_projection=save_projection, d_initial=0.2))
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    assert ("base_model.vera_A" in keys) == save_projection  # False: regenerated from projection_prng_key
    inputs = {"input_ids": IDS}
    ours = lorakit.load(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        got, plain = ours(**inputs).logits, base(**inputs).logits
    expected = peft_logits(base, folder, inputs)
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    config = lorakit.model.registry(ours).configs["default"]
    assert (config.method, config.r, config.seed, config.save_projection) == ("vera", 8, 5, save_projection)


@pytest.mark.parametrize("save_projection", [True, False])
def test_lorakit_vera_loads_in_peft_with_our_outputs(tmp_path, save_projection):
    pytest.importorskip("lorakit.methods.vera")
    base = tiny_llama()
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(method="vera", r=8, seed=7, targets=VERA_TARGETS,
                                        save_projection=save_projection))
    _randomise_ours(model)  # the vectors d and b
    model.eval()
    folder = lorakit.save(model, tmp_path / "vera", format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["projection_prng_key"] == 7 and cfg["save_projection"] == save_projection
    _peft_matches_ours(base, model, folder)


def test_adalora_conv2d_both_ways(tmp_path):
    pytest.importorskip("lorakit.methods.adalora")
    net = ConvNet().eval()
    img, tok = torch.randn(2, 3, 5, 5), torch.randint(0, 20, (2, 4))
    model = get_peft_model(copy.deepcopy(net), ada_peft_config(target_modules=["conv", "fc"], init_r=3))
    randomise_adapters(model)
    model.peft_config["default"].rank_pattern = {"conv.lora_E": [False, True, True], "fc.lora_E": [True] * 3}
    model.save_pretrained(tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "peft").eval()
    ours = lorakit.load(copy.deepcopy(net), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = theirs(img, tok)
        assert (expected - net(img, tok)).abs().max() > 1e-3
        torch.testing.assert_close(ours(img, tok), expected, atol=1e-5, rtol=0)
    assert adalora_ranks(ours) == {"conv": 2, "fc": 3}
    folder = lorakit.save(ours, tmp_path / "back", format="peft")
    again = PeftModel.from_pretrained(copy.deepcopy(net), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(img, tok), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------ DoRA
def test_peft_dora_conv2d_and_conv1d_load_with_peft_outputs(tmp_path):
    pytest.importorskip("lorakit.methods.dora")
    net = ConvNet().eval()
    img, tok = torch.randn(2, 3, 5, 5), torch.randint(0, 20, (2, 4))
    folder = peft_folder(tmp_path, net, LoraConfig(r=2, lora_alpha=4, use_dora=True,
                                                   target_modules=["conv", "conv2", "fc"]), "conv")
    theirs = PeftModel.from_pretrained(copy.deepcopy(net), folder).eval()
    ours = lorakit.load(copy.deepcopy(net), folder).eval()
    with torch.no_grad():
        expected = theirs(img, tok)
        assert (expected - net(img, tok)).abs().max() > 1e-3
        torch.testing.assert_close(ours(img, tok), expected, atol=1e-5, rtol=0)
    assert lorakit.model.registry(ours).configs["default"].method == "dora"
    gpt = tiny_gpt2()
    folder = peft_folder(tmp_path, gpt, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                   fan_in_fan_out=True, use_dora=True), "gpt")
    inputs = {"input_ids": IDS}
    torch.testing.assert_close(ours_logits(gpt, folder, inputs), peft_logits(gpt, folder, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_lorakit_dora_loads_in_peft_with_our_outputs(tmp_path, scaling):
    pytest.importorskip("lorakit.methods.dora")
    base = tiny_llama()
    model = copy.deepcopy(base)
    lorakit.attach(model, AdapterConfig(method="dora", r=4, alpha=6, scaling=scaling, seed=0,
                                        targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2}))
    _randomise_ours(model)  # A, B and the magnitudes
    model.eval()
    folder = lorakit.save(model, tmp_path / "dora", format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"] == (scaling == "rslora")
    _peft_matches_ours(base, model, folder)


def test_lorakit_dora_conv_layers_load_in_peft(tmp_path):
    pytest.importorskip("lorakit.methods.dora")
    net = ConvNet().eval()
    img, tok = torch.randn(2, 3, 5, 5), torch.randint(0, 20, (2, 4))
    model = copy.deepcopy(net)
    lorakit.attach(model, AdapterConfig(method="dora", r=2, alpha=4, targets=["conv", "conv2", "fc"], seed=0))
    _randomise_ours(model)
    model.eval()
    folder = lorakit.save(model, tmp_path / "dora", format="peft")
    sd = load_file(str(folder / "adapter_model.safetensors"))
    assert tuple(sd["base_model.model.conv.lora_magnitude_vector"].shape) == (1, 6, 1, 1)
    theirs = PeftModel.from_pretrained(copy.deepcopy(net), folder).eval()
    with torch.no_grad():
        expected = model(img, tok)
        assert (expected - net(img, tok)).abs().max() > 1e-3
        torch.testing.assert_close(theirs(img, tok), expected, atol=1e-5, rtol=0)
