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
