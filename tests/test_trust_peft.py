"""Issue 11 "Trust", PEFT folders as users have them: embedding base copies (14), a loadable PEFT export (15),
refusals naming the cause (16) and LoftQ adapters refusing the wrong base (10)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterConfig
from lorakit.io import AdapterLoadError
from lorakit.layers import AdaptedLayer, UnsupportedLayer
from lorakit.peft_format import PeftFormatError

peft = pytest.importorskip("peft")
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def randomise(model, seed=1, scale=0.1):
    """Give every PEFT adapter tensor random values (PEFT inits B = 0, which would hide any mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def state(model):
    """Everything a failed load must leave alone: tensors, trainable flags, adapters."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, lorakit.adapter_names(model))


def assert_same_state(model, before):
    tensors, grads, names = before
    now = model.state_dict()
    assert sorted(now) == sorted(tensors)
    assert all(torch.equal(now[k], v) for k, v in tensors.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert lorakit.adapter_names(model) == names


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def peft_embedding_folder(tmp_path, base):
    """PEFT's default save of an adapter on embed_tokens + lm_head (+ q_proj): it also writes the base weights."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8,
                                                          target_modules=["embed_tokens", "lm_head", "q_proj"]))
    randomise(model)
    folder = tmp_path / "peft_emb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder, model.eval()


# ---------------------------------------------------------------------------------------------------------------
# 14. PEFT's save of an adapted embedding / lm_head carries <module>.base_layer.weight
# ---------------------------------------------------------------------------------------------------------------
def test_peft_embedding_folder_with_base_copies_loads_with_peft_outputs(tmp_path):
    base = tiny_llama()
    folder, peft_model = peft_embedding_folder(tmp_path, base)
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys  # what PEFT really writes
    assert "base_model.model.lm_head.base_layer.weight" in keys
    theirs = logits(PeftModel.from_pretrained(copy.deepcopy(base), folder).eval())
    ours = logits(lorakit.load(copy.deepcopy(base), folder).eval())
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, logits(base), atol=1e-3)  # the adapters do something


def test_peft_folder_with_a_different_base_embedding_is_refused(tmp_path):
    base = tiny_llama()
    folder, _ = peft_embedding_folder(tmp_path, base)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][5] += 0.25  # a fine-tuned base embedding
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    before, on_disk = state(model), files(folder)
    with pytest.raises(PeftFormatError, match=r"embed_tokens\.base_layer\.weight.*differs.*load that base first"):
        lorakit.load(model, folder)
    assert_same_state(model, before)
    assert files(folder) == on_disk


def test_peft_folder_from_a_resized_vocabulary_is_refused_with_the_cause(tmp_path):
    base = tiny_llama()
    folder, _ = peft_embedding_folder(tmp_path, base)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = torch.cat([tensors[key], torch.zeros(4, tensors[key].shape[1])])  # vocab 128 -> 132
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    before = state(model)
    with pytest.raises(PeftFormatError, match=r"lm_head\.base_layer\.weight.*resized"):
        lorakit.load(model, folder)
    assert_same_state(model, before)


# ---------------------------------------------------------------------------------------------------------------
# 15. our PEFT export names its base and task, so AutoPeftModelFor* loads it
# ---------------------------------------------------------------------------------------------------------------
def test_peft_export_loads_with_auto_peft_model_offline(tmp_path):
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    ours = logits(model)
    folder = lorakit.save(model, tmp_path / "adapter", format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base") and cfg["task_type"] == "CAUSAL_LM"
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    assert torch.allclose(logits(loaded), ours, atol=1e-5)
    assert not torch.allclose(ours, logits(LlamaForCausalLM.from_pretrained(tmp_path / "base")), atol=1e-3)


def test_peft_export_takes_base_and_task_explicitly(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lorakit.attach(net, AdapterConfig(r=2, targets=["0"]))
    folder = lorakit.save(net, tmp_path / "a", format="peft")  # nothing known: null, as before
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None and cfg["task_type"] is None
    folder = lorakit.save(net, tmp_path / "b", format="peft", base_model_name_or_path="org/base", task_type="SEQ_CLS")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["task_type"]) == ("org/base", "SEQ_CLS")
    folder = lorakit.save(net, tmp_path / "c", format="peft", base_model_name="org/old")  # the older keyword
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/old"
    with pytest.raises(ValueError, match="task_type='causal'.*CAUSAL_LM"):
        lorakit.save(net, tmp_path / "d", format="peft", task_type="causal")
    assert not (tmp_path / "d").exists()
    # inferred from the transformers class
    cls = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2, num_labels=3))
    lorakit.attach(cls, AdapterConfig(r=2, targets=["q_proj"]))
    folder = lorakit.save(cls, tmp_path / "e", format="peft")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


# ---------------------------------------------------------------------------------------------------------------
# 16. refusals name the PEFT feature (or the layer type) and say lorakit does not support it
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_peft_folder(tmp_path_factory):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomise(model)
    folder = tmp_path_factory.mktemp("plain") / "peft"
    model.save_pretrained(folder)
    return folder


def edited_copy(src, dst, **changes):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


CASES = [  # (adapter_config.json key, a value PEFT writes when the feature is on, the feature's name)
    ("target_parameters", ["mlp.experts.gate_up_proj"], "LoRA on nn.Parameters"), ("use_qalora", True, "QA-LoRA"),
    ("lora_bias", True, "LoRA bias"), ("layer_replication", [[0, 2]], "layer replication"),
    ("use_bdlora", {"nblocks": 2}, "BD-LoRA"), ("alora_invocation_tokens", [1, 2], "Activated LoRA"),
    ("arrow_config", {"top_k": 2}, "Arrow routing"), ("trainable_token_indices", [3, 4], "trainable tokens"),
    ("velora_config", {"num_groups": 2}, "VeLoRA"), ("monteclora_config", {"num_samples": 2}, "MonteCLoRA"),
    ("kasa_config", {"beta": 1.0}, "KaSA")]


@pytest.mark.parametrize("option,value,feature", CASES, ids=[c[0] for c in CASES])
def test_unsupported_peft_lora_features_are_named(tmp_path, plain_peft_folder, option, value, feature):
    folder = edited_copy(plain_peft_folder, tmp_path / "x", **{option: value})
    model = tiny_llama()
    before = state(model)
    with pytest.raises(PeftFormatError, match=rf"PEFT's {feature}.*{option}=.*lorakit does not support"):
        lorakit.load(model, folder)
    assert_same_state(model, before)


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "OFT", "BOFT", "PROMPT_TUNING", "FOURIERFT"])
def test_unsupported_peft_types_are_named(tmp_path, plain_peft_folder, peft_type):
    folder = edited_copy(plain_peft_folder, tmp_path / "x", peft_type=peft_type)
    with pytest.raises(PeftFormatError, match=rf"PEFT method {peft_type} .*not supported by lorakit"):
        lorakit.load(tiny_llama(), folder)


@pytest.mark.parametrize("option, value", [("use_dora", "yes"), ("use_dora", 1), ("use_rslora", "false"),
                                           ("fan_in_fan_out", "true")])
def test_peft_switches_that_are_not_booleans_are_named(tmp_path, plain_peft_folder, option, value):
    # use_dora: "yes" was read as true and refused as "missing keys ...magnitude", a symptom instead of the cause
    folder = edited_copy(plain_peft_folder, tmp_path / "x", **{option: value})
    model = tiny_llama()
    before = state(model)
    with pytest.raises(PeftFormatError, match=rf"{option}={value!r} is invalid; PEFT writes true or false"):
        lorakit.load(model, folder)
    assert_same_state(model, before)


@pytest.mark.parametrize("init", ["olora", "corda", "lora_ga", "mica", "pissa_niter_4"])
def test_unsupported_peft_inits_are_named(tmp_path, plain_peft_folder, init):
    folder = edited_copy(plain_peft_folder, tmp_path / "x", init_lora_weights=init)
    with pytest.raises(PeftFormatError, match=rf"init_lora_weights='{init}'.*lorakit does not support"):
        lorakit.load(tiny_llama(), folder)


class MhaNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("targets", [["out_proj"], ["attn"], ["attn.out_proj", "fc"]])
def test_multihead_attention_is_refused_at_attach(targets):
    net = MhaNet()
    before = state(net)
    with pytest.raises(UnsupportedLayer, match="MultiheadAttention.*lorakit does not support"):
        lorakit.attach(net, AdapterConfig(r=2, targets=targets))
    assert_same_state(net, before)
    assert type(net.attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear


def test_all_linear_skips_the_out_proj_multihead_attention_never_calls():
    net = MhaNet()
    lorakit.attach(net, AdapterConfig(r=2))
    assert [n for n, m in net.named_modules() if isinstance(m, AdaptedLayer)] == ["fc"]
    net(torch.randn(2, 3, 8))


def test_peft_multihead_attention_adapter_is_refused_by_name(tmp_path):
    net = MhaNet()
    model = get_peft_model(copy.deepcopy(net), LoraConfig(r=2, target_modules=["attn"]))
    randomise(model)
    model.save_pretrained(tmp_path / "mha")
    fresh = MhaNet()
    before = state(fresh)
    with pytest.raises(PeftFormatError, match="PEFT's LoRA for nn.MultiheadAttention.*lorakit does not support"):
        lorakit.load(fresh, tmp_path / "mha")
    assert_same_state(fresh, before)


# ---------------------------------------------------------------------------------------------------------------
# 10. LoftQ adapters need the 4-bit NF4 base they were fitted to
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loftq_saved(tmp_path_factory):
    """A lorakit LoftQ adapter (all-linear, one alternation) saved in both formats, and the logits it gives."""
    model = tiny_llama()
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, init="loftq", loftq_iter=1, seed=0))
    root = tmp_path_factory.mktemp("loftq")
    return lorakit.save(model, root / "ours"), lorakit.save(model, root / "peft", format="peft"), logits(model)


@pytest.mark.parametrize("fmt", [0, 1], ids=["lorakit", "peft"])
def test_loftq_adapter_refuses_a_full_precision_base(loftq_saved, fmt):
    folder = loftq_saved[fmt]
    model = tiny_llama()
    before, on_disk = state(model), files(folder)
    with pytest.raises(AdapterLoadError, match=r"full precision.*LoftQ.*quantize_for_adapter\(model, folder\)"):
        lorakit.load(model, folder)
    assert_same_state(model, before)
    assert files(folder) == on_disk


@pytest.mark.parametrize("fmt", [0, 1], ids=["lorakit", "peft"])
def test_loftq_adapter_refuses_a_base_quantised_otherwise(loftq_saved, fmt):
    model = lorakit.quantize(tiny_llama(), compute_dtype=torch.float32)  # default: double quantisation
    before = state(model)
    with pytest.raises(AdapterLoadError, match=r"double_quant=True.*double_quant=False"):
        lorakit.load(model, loftq_saved[fmt])
    assert_same_state(model, before)


@pytest.mark.parametrize("fmt", [0, 1], ids=["lorakit", "peft"])
def test_loftq_adapter_loads_on_the_base_it_names(loftq_saved, fmt):
    model = lorakit.quantize(tiny_llama(), compute_dtype=torch.float32, double_quant=False)
    lorakit.load(model, loftq_saved[fmt])
    assert torch.allclose(logits(model), loftq_saved[2], atol=1e-5)
    if fmt == 0:
        assert torch.equal(logits(model), loftq_saved[2])
    # the helper the error message names quantises exactly the adapter's layers
    from lorakit.quant import quantize_for_adapter

    model = tiny_llama()
    assert len(quantize_for_adapter(model, loftq_saved[fmt])) == 14  # 2 blocks x 7 linear layers
    lorakit.load(model, loftq_saved[fmt])
    assert torch.allclose(logits(model), loftq_saved[2], atol=1e-5)


def test_loftq_adapter_records_its_base(loftq_saved):
    ours, exported = loftq_saved[0], loftq_saved[1]
    meta = json.loads((ours / "lorakit_config.json").read_text())
    assert meta["adapters"]["default"]["extra"]["base"] == {"bits": 4, "quant_type": "nf4", "blocksize": 64,
                                                            "double_quant": False}
    cfg = json.loads((exported / "adapter_config.json").read_text())
    assert cfg["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    assert cfg["init_lora_weights"] is True  # PEFT must not re-run LoftQ when it loads the folder


@pytest.mark.parametrize("fmt", ["lorakit", "peft"])
def test_loftq_with_several_iterations_is_never_put_on_a_fresh_quantisation(tmp_path, fmt):
    # with loftq_iter > 1 the fitted base is NF4(W - s·BA), not NF4(W): quantize_for_adapter (the fix the load
    # error names, and what lorakit predict/export run) used to build NF4(W) and the adapter then loaded on it with
    # outputs off by ~5e-2, without a word
    from lorakit.quant import load_quantized, quantize_for_adapter, save_quantized

    model = tiny_llama()
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, init="loftq", loftq_iter=3, targets=["q_proj", "v_proj"],
                                        seed=0))
    expected = logits(model)
    folder = lorakit.save(model, tmp_path / "adapter", format=fmt)
    fresh = tiny_llama()
    before = state(fresh)
    with pytest.raises(ValueError, match=r"loftq_iter=3.*not a fresh quantisation.*save_quantized"):
        quantize_for_adapter(fresh, folder)
    assert_same_state(fresh, before)
    # the way that works: the base LoftQ computed, kept with its adapter
    backbone = save_quantized(model, tmp_path / "backbone")
    restored = load_quantized(tiny_llama(), backbone)
    assert quantize_for_adapter(restored, folder) == []  # already 4-bit: nothing to do, no error
    assert torch.equal(logits(restored), expected)


def test_peft_loftq_folder_refuses_full_precision_and_loads_on_nf4(tmp_path):
    # PEFT's LoftQ init runs on CUDA only, so its folder is built as PEFT's flow leaves it: the targeted base
    # weights become deq(NF4(W)) (block 64, no double quantisation: one alternation), the adapter is trained on
    # that base, and save_pretrained writes init_lora_weights="loftq" with the loftq_config.
    from lorakit.quant import dequantize_nf4, quantize_nf4

    base = tiny_llama()
    nf4_base = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in nf4_base.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(dequantize_nf4(quantize_nf4(module.weight, 64, False)))
    pm = get_peft_model(copy.deepcopy(nf4_base), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    randomise(pm)
    pm.save_pretrained(tmp_path / "plain")
    theirs = logits(PeftModel.from_pretrained(copy.deepcopy(nf4_base), tmp_path / "plain").eval())
    folder = edited_copy(tmp_path / "plain", tmp_path / "loftq", init_lora_weights="loftq",
                         loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    model = tiny_llama()
    before = state(model)
    with pytest.raises(PeftFormatError, match=r"full precision.*LoftQ.*PEFT's LoftQ flow loads .* in 4-bit"):
        lorakit.load(model, folder)
    assert_same_state(model, before)
    model = lorakit.quantize(tiny_llama(), compute_dtype=torch.float32, double_quant=False)
    lorakit.load(model, folder)
    assert torch.allclose(logits(model), theirs, atol=1e-5)
    assert not torch.allclose(logits(lorakit.load(tiny_llama(), tmp_path / "plain")), theirs, atol=1e-3)


def test_peft_loftq_with_other_bits_is_refused(tmp_path, plain_peft_folder):
    folder = edited_copy(plain_peft_folder, tmp_path / "x", init_lora_weights="loftq",
                         loftq_config={"loftq_bits": 2, "loftq_iter": 1})
    with pytest.raises(PeftFormatError, match="loftq_bits=2.*4-bit NF4 only.*does not support"):
        lorakit.load(lorakit.quantize(tiny_llama(), double_quant=False), folder)


def test_cli_predict_path_quantises_the_base_a_loftq_run_needs(tmp_path, tiny_chat_folder):
    # lorakit predict/export rebuild the model with load_adapted: a LoftQ adapter must get its NF4 base back
    from transformers import LlamaForCausalLM

    from lorakit.train.job import load_adapted

    folder, _ = tiny_chat_folder
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    lorakit.attach(model, AdapterConfig(r=4, alpha=8, init="loftq", targets=["q_proj", "v_proj"], seed=0))
    ids = torch.randint(0, 10, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    adapter = lorakit.save(model, tmp_path / "adapter")
    adapted, _, _ = load_adapted(adapter, model=str(folder))
    assert torch.equal(logits(adapted, ids), ref)
