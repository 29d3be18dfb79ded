"""Issue 11 item 6: adapters on tied weights (input/output embeddings sharing one tensor).

Merging an adapter on a tied layer must change only that layer's function: the layer gets its own copy of the
weight (with a warning), the partner keeps the original, unmerge re-ties, and an exported model loads in plain
transformers with the same logits. Methods that move the base weight are refused on a tied layer at attach.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer

import lorakit
from lorakit import AdapterConfig


def _randomise_b(model, name="default", seed=5, scale=0.5):
    """Non-zero adapter deltas (B starts at zero for LoRA's kaiming init)."""
    g = torch.Generator().manual_seed(seed)
    for _, module in model.named_modules():
        if isinstance(module, lorakit.AdaptedLayer) and name in module.adapters:
            ad = module.adapters[name]
            with torch.no_grad():
                ad.A.copy_(torch.randn(ad.A.shape, generator=g) * scale)
                ad.B.copy_(torch.randn(ad.B.shape, generator=g) * scale)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def test_merge_lm_head_on_tied_llama_unties_and_matches_plain_reference():
    model = tiny_llama(tie=True)
    original = copy.deepcopy(model)
    e = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.attach(model, AdapterConfig(r=4, targets=["lm_head"]))
    _randomise_b(model)
    ad = model.lm_head.adapters["default"]
    delta = ad.scaling * (ad.B.detach() @ ad.A.detach())
    unmerged = _logits(model, IDS)

    # the reference, computed plainly: output embedding E + s·BA, input embedding still E
    ref = copy.deepcopy(original)
    ref.config.tie_word_embeddings = False
    ref.lm_head.weight = torch.nn.Parameter(e + delta)
    ref.model.embed_tokens.weight = torch.nn.Parameter(e.clone())
    expected = _logits(ref, IDS)
    assert torch.allclose(unmerged, expected, atol=1e-4)

    with pytest.warns(UserWarning, match=r"lm_head.*model\.embed_tokens"):
        lorakit.merge(model)
    merged = _logits(model, IDS)
    assert torch.allclose(merged, expected, atol=1e-4), (merged - expected).abs().max()
    assert torch.equal(model.model.embed_tokens.weight, e)  # the partner keeps the original
    assert model.config.tie_word_embeddings is False

    with lorakit.disabled(model):  # the base model inside, the merged model again after
        assert torch.equal(_logits(model, IDS), _logits(original, IDS))
    assert torch.allclose(_logits(model, IDS), expected, atol=1e-4)
    assert torch.equal(model.model.embed_tokens.weight, e)

    lorakit.unmerge(model)
    assert torch.equal(_logits(model, IDS), unmerged)
    assert model.lm_head.base.weight is model.model.embed_tokens.weight  # re-tied
    assert torch.equal(model.model.embed_tokens.weight, e)
    assert model.config.tie_word_embeddings is True
    with lorakit.disabled(model):
        assert torch.equal(_logits(model, IDS), _logits(original, IDS))


def test_unload_merge_true_on_tied_llama_gives_plain_untied_model():
    model = tiny_llama(tie=True)
    e = model.model.embed_tokens.weight.detach().clone()
    lorakit.attach(model, AdapterConfig(r=4, targets=["lm_head"]))
    _randomise_b(model)
    expected = _logits(model, IDS)
    with pytest.warns(UserWarning, match="own copy"):
        plain = lorakit.unload(model, merge=True)
    assert type(plain.lm_head) is torch.nn.Linear
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    assert torch.equal(plain.model.embed_tokens.weight, e)
    assert torch.allclose(_logits(plain, IDS), expected, atol=1e-4)
    assert plain.config.tie_word_embeddings is False


def test_embed_tokens_adapted_with_tied_lm_head():
    model = tiny_llama(tie=True)
    e = model.model.embed_tokens.weight.detach().clone()
    lorakit.attach(model, AdapterConfig(r=4, targets=["embed_tokens"]))
    _randomise_b(model)
    ad = model.model.embed_tokens.adapters["default"]
    new_e = e + (ad.scaling * (ad.B.detach() @ ad.A.detach())).t()  # [vocab, dim]
    unmerged = _logits(model, IDS)
    with pytest.warns(UserWarning, match=r"embed_tokens.*lm_head"):
        lorakit.merge(model)
    assert torch.allclose(_logits(model, IDS), unmerged, atol=1e-4)
    assert torch.equal(model.lm_head.weight, e)  # the output embedding keeps E
    assert torch.allclose(model.model.embed_tokens.base.weight, new_e, atol=1e-6)
    lorakit.unmerge(model)
    assert torch.equal(_logits(model, IDS), unmerged)
    assert model.model.embed_tokens.base.weight is model.lm_head.weight


def test_both_tied_sides_adapted_merge_matches_unmerged():
    model = tiny_llama(tie=True)
    lorakit.attach(model, AdapterConfig(r=4, targets=["embed_tokens", "lm_head"]))
    _randomise_b(model)
    unmerged = _logits(model, IDS)
    with pytest.warns(UserWarning, match="own copy"):
        plain = lorakit.unload(model, merge=True)
    assert torch.allclose(_logits(plain, IDS), unmerged, atol=1e-4)


def test_gpt2_tied_lm_head_merge_matches_unmerged():
    model = tiny_gpt2()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    wte = model.transformer.wte.weight.detach().clone()
    lorakit.attach(model, AdapterConfig(r=4, targets=["lm_head"]))
    _randomise_b(model)
    unmerged = _logits(model, ids)
    with pytest.warns(UserWarning, match="transformer.wte"):
        lorakit.merge(model)
    assert torch.allclose(_logits(model, ids), unmerged, atol=1e-4)
    assert torch.equal(model.transformer.wte.weight, wte)


def test_export_of_tied_model_loads_in_plain_transformers_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.train.job import export_merged

    folder = tmp_path / "tied"
    tok = tiny_tokenizer(folder, ["hello world this is a tiny corpus", "another line of words"])
    base = tiny_llama(vocab=len(tok), tie=True)
    base.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.attach(model, AdapterConfig(r=4, targets=["lm_head"]))
    _randomise_b(model, scale=1.0)
    ids = torch.randint(0, len(tok), (2, 6), generator=torch.Generator().manual_seed(1))
    expected = _logits(model, ids)
    with torch.no_grad():
        expected_tokens = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    lorakit.save(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_merged(tmp_path / "adapter", tmp_path / "merged", model=str(folder))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    got = _logits(plain, ids)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    with torch.no_grad():
        tokens = plain.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("config", [
    AdapterConfig(r=4, targets=["lm_head"], init="pissa"),
    AdapterConfig(r=4, targets=["embed_tokens"], init="pissa_fast"),
    AdapterConfig(method="delta_lora", r=4, targets=["lm_head"]),
    AdapterConfig(r=4, targets=["lm_head"], init="loftq"),
], ids=["pissa-lm_head", "pissa_fast-embed", "delta_lora", "loftq"])
def test_base_changing_methods_refused_on_tied_weight(config):
    model = tiny_llama(tie=True)
    before = copy.deepcopy(model.state_dict())
    out_before = _logits(model, IDS)
    with pytest.raises(ValueError, match=r"(?s)tied.*(lm_head|embed_tokens).*exclude"):
        lorakit.attach(model, config)
    assert lorakit.adapter_names(model) == []
    assert not any(isinstance(m, lorakit.AdaptedLayer) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(_logits(model, IDS), out_before)


def test_pissa_on_untied_lm_head_still_allowed():
    model = tiny_llama(tie=False)
    lorakit.attach(model, AdapterConfig(r=4, targets=["lm_head"], init="pissa"))
    assert lorakit.adapter_names(model) == ["default"]


def test_load_of_base_shifting_adapter_onto_tied_model_refused(tmp_path):
    untied = tiny_llama(tie=False)
    lorakit.attach(untied, AdapterConfig(r=4, targets=["lm_head"], init="pissa"))
    lorakit.save(untied, tmp_path / "a")
    model = tiny_llama(tie=True)
    out_before = _logits(model, IDS)
    with pytest.raises(ValueError, match="tied"):
        lorakit.load(model, tmp_path / "a")
    assert lorakit.adapter_names(model) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_logits(model, IDS), out_before)
