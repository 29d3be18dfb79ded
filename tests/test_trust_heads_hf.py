"""Issue 11 item 7 on transformers classifiers: two adapters, each with its own classification head, in lorakit's
and PEFT's folder formats (PEFT itself keeps one head copy per adapter, so its outputs are the reference)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.model import adapted_layers

IDS = torch.randint(1, 96, (4, 9), generator=torch.Generator().manual_seed(0))
ATOL = 1e-5


def tiny_classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def attach_trained(model, name, targets, seed):
    """Attach ``name`` with the head in modules_to_save and give its B matrices and its head copy random values."""
    lorakit.attach(model, AdapterConfig(r=2, alpha=4, targets=targets, modules_to_save=["score"], seed=seed),
                   name=name)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for path, layer in adapted_layers(model):
            if name in layer.adapters:
                ad = layer.adapters[name]
                ad.B.copy_(torch.randn(ad.B.shape, generator=g) * 0.2)
                deltas[path] = ad.scaling * ad.B @ ad.A
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g))  # this adapter's copy
    return {"deltas": {p: d.clone() for p, d in deltas.items()}, "score": model.score.weight.detach().clone()}


def reference(base, snap):
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, delta in snap["deltas"].items():
            ref.get_submodule(path).weight.add_(delta)
        ref.score.weight.copy_(snap["score"])
    return ref


def two_adapters():
    base = tiny_classifier()
    model = copy.deepcopy(base)
    snaps = {"a": attach_trained(model, "a", ["q_proj", "v_proj"], 1), "b": attach_trained(model, "b", ["k_proj"], 2)}
    return base, model, snaps


def test_llama_classifier_heads_per_adapter_set_active_disabled_route():
    base, model, snaps = two_adapters()
    refs = {n: logits(reference(base, s)) for n, s in snaps.items()}
    for name in ("a", "b", "a"):
        lorakit.set_active(model, name)
        torch.testing.assert_close(logits(model), refs[name], atol=ATOL, rtol=0)
    with lorakit.disabled(model):
        assert torch.equal(logits(model), logits(base))
    names = ["b", None, "a", "b"]
    with lorakit.route(model, names):
        got = logits(model)
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], (refs[n] if n else logits(base))[i], atol=ATOL, rtol=0)
    # transformers' own accessors see the active adapter's head
    lorakit.set_active(model, "b")
    assert torch.equal(model.score.weight, snaps["b"]["score"])


@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
def test_llama_classifier_heads_survive_save_and_load(tmp_path, fmt):
    base, model, snaps = two_adapters()
    folder = lorakit.save(model, tmp_path / fmt, format=fmt)
    fresh = lorakit.load(copy.deepcopy(base), folder)
    assert sorted(lorakit.adapter_names(fresh)) == ["a", "b"]
    for name, snap in snaps.items():
        lorakit.set_active(fresh, name)
        torch.testing.assert_close(logits(fresh), logits(reference(base, snap)), atol=ATOL, rtol=0)
    with lorakit.disabled(fresh):
        assert torch.equal(logits(fresh), logits(base))


def test_unload_gives_plain_modules_with_the_right_head():
    base, model, snaps = two_adapters()
    lorakit.set_active(model, "a")
    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    assert type(merged.score) is nn.Linear and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(merged), logits(reference(base, snaps["a"])), atol=ATOL, rtol=0)
    assert merged.state_dict().keys() == base.state_dict().keys()
    plain = lorakit.unload(model, merge=False)
    assert type(plain.score) is nn.Linear
    assert torch.equal(logits(plain), logits(base))


def test_peft_multi_adapter_folder_with_a_head_per_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_classifier()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                        modules_to_save=["score"]))
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["score"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    expected = {}
    for name in ("default", "other"):
        pm.set_adapter(name)
        expected[name] = logits(pm)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    pm.save_pretrained(tmp_path / "multi")
    ours = lorakit.load(copy.deepcopy(base), tmp_path / "multi")
    for name in ("default", "other"):
        lorakit.set_active(ours, name)
        torch.testing.assert_close(logits(ours), expected[name], atol=ATOL, rtol=0)
    with lorakit.disabled(ours):
        assert torch.equal(logits(ours), logits(base))


def test_peft_head_with_submodules_loads_as_one_copy(tmp_path):
    """Roberta's classifier is a module with children (dense, out_proj): PEFT saves ``classifier.dense.weight``..."""
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    base = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, num_labels=3)).eval()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                        modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    ids = IDS.clamp(min=3)
    expected = logits(pm, ids)
    pm.save_pretrained(tmp_path / "roberta")
    ours = lorakit.load(copy.deepcopy(base), tmp_path / "roberta")
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)
    with lorakit.disabled(ours):
        assert torch.equal(logits(ours, ids), logits(base, ids))
    # and written back in PEFT's layout, PEFT reads it with the same outputs
    from peft import PeftModel

    folder = lorakit.save(ours, tmp_path / "again", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, atol=ATOL, rtol=0)
