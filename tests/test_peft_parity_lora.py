"""LoRA and rsLoRA logits equal PEFT's on a transformers Llama with identical A and B (PEFT is a dev dependency)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

import lorakit
from lorakit import AdapterConfig
from lorakit.model import adapted_layers

peft = pytest.importorskip("peft")


def _peft_model(base, r, alpha, rslora, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, lora_dropout=0.0,
                     init_lora_weights=True)
    model = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero in both libraries: give it values so the deltas matter
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_logits_equal_peft(rslora):
    base = tiny_llama(seed=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    pm = _peft_model(base, r=4, alpha=16, rslora=rslora)
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(r=4, alpha=16, scaling="rslora" if rslora else "standard"))
    peft_params = dict(pm.named_parameters())
    n = 0
    for path, layer in adapted_layers(ours):
        ad = layer.adapters["default"]
        with torch.no_grad():
            ad.A.copy_(peft_params[f"base_model.model.{path}.lora_A.default.weight"])
            ad.B.copy_(peft_params[f"base_model.model.{path}.lora_B.default.weight"])
        n += 1
    peft_layers = sum(1 for k in peft_params if k.endswith("lora_A.default.weight"))
    assert n == peft_layers == 14  # same targets for "all-linear" (lm_head excluded in both)
    with torch.no_grad():
        ref = pm(ids).logits
        got = ours(ids).logits
        base_logits = base(ids).logits
    assert (ref - base_logits).abs().max() > 1e-3  # the adapters really change the output
    assert torch.allclose(got, ref, atol=1e-5)
    # merged outputs agree as well
    pm_merged = pm.merge_and_unload()
    lorakit.merge(ours)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, pm_merged(ids).logits, atol=1e-5)
