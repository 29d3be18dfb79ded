"""Issue 11 item 10, last part: a LoftQ adapter knows the exact 4-bit base it was fitted to.

With ``loftq_iter > 1`` LoftQ's backbone Q is not the NF4 rounding of W, so a base quantised by hand with
``lorakit.quantize`` has the right settings and the wrong codes: the adapter used to load onto it without a word
(outputs off by ~5e-2). Each saved LoftQ adapter now records a fingerprint of every adapted layer's 4-bit base
(``extra["base_fingerprints"]``; for PEFT folders in lorakit's side file), and a load onto another 4-bit base is
refused before anything changes."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import tiny_llama

import lorakit
from lorakit import AdapterConfig
from lorakit.io import AdapterLoadError
from lorakit.quant import Linear4bit, load_quantized, save_quantized

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, lorakit.adapter_names(model),
            [type(m).__name__ for m in model.modules()])


def assert_same_state(model, before):
    tensors, grads, names, kinds = before
    now = model.state_dict()
    assert sorted(now) == sorted(tensors)
    assert all(torch.equal(now[k], v) for k, v in tensors.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert lorakit.adapter_names(model) == names
    assert [type(m).__name__ for m in model.modules()] == kinds


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reference_fingerprint(layer: Linear4bit) -> str:
    """The definition, written plainly: sha256 over the layer's geometry and NF4 settings, then its packed codes
    (uint8) and block constants (fp32 absmax, or uint8 codes + fp32 second-level scales + fp32 offset), as CPU
    little-endian bytes; the first 16 hex digits."""
    h = hashlib.sha256()
    h.update(f"nf4:{layer.out_features}x{layer.in_features}:block={layer.blocksize}:"
             f"double_quant={layer.double_quant}".encode())
    h.update(layer.weight_packed.cpu().numpy().astype("u1").tobytes())
    if layer.double_quant:
        h.update(layer.absmax.cpu().numpy().astype("u1").tobytes())
        h.update(layer.absmax2.float().cpu().numpy().astype("<f4").tobytes())
        h.update(layer.absmax_offset.float().cpu().reshape(1).numpy().astype("<f4").tobytes())
    else:
        h.update(layer.absmax.float().cpu().numpy().astype("<f4").tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def loftq2(tmp_path_factory):
    """A loftq_iter=2 adapter saved in both formats, its backbone saved with save_quantized, and its logits."""
    model = tiny_llama()
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, init="loftq", loftq_iter=2, seed=0))
    root = tmp_path_factory.mktemp("loftq2")
    return {"lorakit": lorakit.save(model, root / "ours"), "peft": lorakit.save(model, root / "peft", format="peft"),
            "backbone": save_quantized(model, root / "backbone"), "logits": logits(model), "model": model}


def hand_quantised():
    """What a user does by hand: the settings LoftQ names (NF4, block 64, no double quantisation), fresh codes."""
    return lorakit.quantize(tiny_llama(), compute_dtype=torch.float32, double_quant=False, blocksize=64)


@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
def test_loftq_iter2_adapter_refuses_a_hand_quantised_base(loftq2, fmt):
    model = hand_quantised()
    before, on_disk = state(model), files(loftq2[fmt])
    with pytest.raises(AdapterLoadError, match=r"model\.layers\.0\.self_attn\.q_proj: its 4-bit base .*is not the "
                                               r"exact one this adapter was fitted to.*save_quantized.*load_quantized"
                                               r".*re-run LoftQ"):
        lorakit.load(model, loftq2[fmt])
    assert_same_state(model, before)
    assert files(loftq2[fmt]) == on_disk


def test_the_refusal_is_one_line(loftq2):
    with pytest.raises(AdapterLoadError) as info:
        lorakit.load(hand_quantised(), loftq2["lorakit"])
    assert "\n" not in str(info.value)


def test_loftq_iter2_adapter_on_its_saved_base_is_bit_exact(loftq2):
    restored = load_quantized(tiny_llama(), loftq2["backbone"])  # loads the adapters saved with it, checked
    assert torch.equal(logits(restored), loftq2["logits"])
    for fmt in ("lorakit", "peft"):  # the adapter folder alone, onto the saved base
        lorakit.delete(restored, "default")
        lorakit.load(restored, loftq2[fmt])
        assert torch.allclose(logits(restored), loftq2["logits"], atol=1e-5)
        if fmt == "lorakit":
            assert torch.equal(logits(restored), loftq2["logits"])


def test_fingerprints_are_recorded_per_layer_and_survive_a_round_trip(loftq2, tmp_path):
    meta = json.loads((loftq2["lorakit"] / "lorakit_config.json").read_text())
    recorded = meta["adapters"]["default"]["extra"]["base_fingerprints"]
    model = loftq2["model"]
    expected = {path: reference_fingerprint(module.base) for path, module in model.named_modules()
                if isinstance(getattr(module, "base", None), Linear4bit)}
    assert recorded == expected and len(expected) == 14  # 2 blocks x 7 linear layers
    # the base requirement itself is unchanged (0.1.0 readers compare it)
    assert meta["adapters"]["default"]["extra"]["base"] == {"bits": 4, "quant_type": "nf4", "blocksize": 64,
                                                            "double_quant": False}
    # loaded and saved again (load_quantized path), the record is the same
    restored = load_quantized(tiny_llama(), loftq2["backbone"])
    again = json.loads((lorakit.save(restored, tmp_path / "again") / "lorakit_config.json").read_text())
    assert again["adapters"]["default"]["extra"]["base_fingerprints"] == recorded


def test_fingerprint_does_not_depend_on_the_compute_dtype_or_device():
    linear = torch.nn.Linear(64, 16)
    fp32 = Linear4bit.from_linear(linear, compute_dtype=torch.float32, double_quant=False)
    bf16 = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16, double_quant=False)
    assert fp32.fingerprint() == bf16.fingerprint() == reference_fingerprint(fp32)
    dq = Linear4bit.from_linear(linear, compute_dtype=torch.float16, double_quant=True)
    assert dq.fingerprint() == reference_fingerprint(dq) != fp32.fingerprint()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    assert {Linear4bit.from_linear(linear.to(d), compute_dtype=torch.float32, double_quant=False).fingerprint()
            for d in devices} == {fp32.fingerprint()}
    # one changed code changes it
    with torch.no_grad():
        fp32.weight_packed[0] ^= 1
    assert fp32.fingerprint() != bf16.fingerprint()


def test_loftq_iter1_adapter_loads_on_a_matching_hand_quantised_base(tmp_path):
    # one alternation: the backbone is NF4(W) itself, so a hand quantisation with LoftQ's settings is that base
    # (any compute dtype) and the fingerprints agree
    model = tiny_llama()
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, init="loftq", loftq_iter=1, seed=0))
    folder = lorakit.save(model, tmp_path / "a")
    fresh = hand_quantised()
    lorakit.load(fresh, folder)
    assert torch.equal(logits(fresh), logits(model))
    lorakit.load(lorakit.quantize(tiny_llama(), compute_dtype=torch.bfloat16, double_quant=False), folder)


def test_to_lora_of_a_loftq_adapter_carries_the_fingerprints(loftq2, tmp_path):
    model = load_quantized(tiny_llama(), loftq2["backbone"])
    lorakit.to_lora(model, "default", new_name="plain")
    folder = lorakit.save(model, tmp_path / "plain", names=["plain"])
    meta = json.loads((folder / "lorakit_config.json").read_text())
    recorded = json.loads((loftq2["lorakit"] / "lorakit_config.json").read_text())["adapters"]["default"]["extra"]
    assert meta["adapters"]["plain"]["extra"]["base_fingerprints"] == recorded["base_fingerprints"]
    fresh = hand_quantised()
    before = state(fresh)
    with pytest.raises(AdapterLoadError, match="is not the exact one this adapter was fitted to"):
        lorakit.load(fresh, folder)
    assert_same_state(fresh, before)


def test_peft_side_file_belongs_to_its_weights(loftq2, tmp_path):
    # PEFT's adapter_config.json has no key for the fingerprints: lorakit writes them beside it, bound to the weights
    import shutil

    folder = shutil.copytree(loftq2["peft"], tmp_path / "peft")
    side = json.loads((folder / "lorakit_base.json").read_text())
    recorded = json.loads((loftq2["lorakit"] / "lorakit_config.json").read_text())["adapters"]["default"]["extra"]
    assert side["base_fingerprints"] == recorded["base_fingerprints"]
    assert side["weights_sha256"] == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    # another adapter saved over it later (no fingerprints): the old side file stays (lorakit never deletes files it
    # cannot tell are its own) but no longer applies, so the new adapter loads on any base
    other = tiny_llama()
    lorakit.attach(other, AdapterConfig(r=4, alpha=8, seed=1))
    expected = logits(other)
    lorakit.save(other, folder, format="peft")
    assert (folder / "lorakit_base.json").exists()
    fresh = lorakit.load(tiny_llama(), folder)
    assert torch.equal(logits(fresh), expected)
    (folder / "lorakit_base.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match=r"lorakit_base\.json: not valid JSON"):
        lorakit.load(tiny_llama(), folder)


def test_to_lora_of_a_loftq_adapter_refuses_a_full_precision_base(loftq2, tmp_path):
    """The converted LoRA carries LoftQ's change relative to its 4-bit base; on the full-precision model it would
    compute another function (it used to load there without a word)."""
    model = load_quantized(tiny_llama(), loftq2["backbone"])
    lorakit.to_lora(model, "default", new_name="plain")
    folder = lorakit.save(model, tmp_path / "plain", names=["plain"])
    full = tiny_llama()
    before = state(full)
    with pytest.raises(AdapterLoadError, match="full precision.*fitted to a 4-bit base"):
        lorakit.load(full, folder)
    assert_same_state(full, before)
