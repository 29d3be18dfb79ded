"""lorakit.export / check_export / the CLI's export --for and convert, on tiny models.

check_export must flag each server rule on a folder that breaks it (and nothing on a clean one); what export writes
for peft/vllm/sglang must load in PEFT itself with the member's outputs (within the error export reports) and pass
the target's checker.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit
from lorakit import AdapterConfig

from conftest import tiny_llama
from test_cli import run

DATA = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def adapted(seed: int = 0, **cfg):
    """(tiny Llama with one adapter whose weights are non-trivial, a copy of the original base)."""
    model = tiny_llama(hidden=32)
    original = copy.deepcopy(model)
    cfg.setdefault("targets", TARGETS)
    lorakit.attach(model, AdapterConfig(seed=seed, **cfg))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # as if trained: every trainable tensor moved away from its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval(), original


def logits(model):
    with torch.no_grad():
        return model(input_ids=DATA).logits


def peft_folder(tmp_path, label, **cfg):
    model, _ = adapted(**cfg)
    return lorakit.save(model, tmp_path / label, format="peft")


def edit(folder, **changes):
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# check_export: each rule on a folder that breaks it
# ---------------------------------------------------------------------------------------------------------------
def test_a_plain_lora_folder_passes_every_target(tmp_path):
    folder = peft_folder(tmp_path, "plain", method="lora", r=4)
    for target in ("peft", "vllm", "sglang", "llama.cpp"):
        assert lorakit.check_export(folder, target) == [], target


def test_each_rule_is_flagged(tmp_path):
    dora = peft_folder(tmp_path, "dora", method="dora", r=4)
    for target in ("vllm", "sglang", "llama.cpp"):
        assert any(p.startswith("use_dora") for p in lorakit.check_export(dora, target)), target
    assert any("not LoRA A/B" in p for p in lorakit.check_export(dora, "vllm"))  # the magnitude tensors

    rslora = peft_folder(tmp_path, "rslora", method="lora", r=4, scaling="rslora")
    assert any(p.startswith("use_rslora") and "√r" in p for p in lorakit.check_export(rslora, "llama.cpp"))
    assert any(p.startswith("use_rslora") for p in lorakit.check_export(rslora, "sglang"))
    assert lorakit.check_export(rslora, "vllm") == []  # vLLM reads use_rslora (peft_helper.py)

    heads = peft_folder(tmp_path, "heads", method="lora", r=4, modules_to_save=["lm_head"])
    assert any(p.startswith("modules_to_save") for p in lorakit.check_export(heads, "vllm"))
    assert any("not LoRA A/B" in p and "lm_head" in p for p in lorakit.check_export(heads, "llama.cpp"))

    mixed = peft_folder(tmp_path, "mixed", method="lora", r=4, rank_pattern={"down_proj": 2},
                        alpha_pattern={"down_proj": 16})
    vllm = lorakit.check_export(mixed, "vllm")
    assert any(p.startswith("rank_pattern") for p in vllm) and any(p.startswith("alpha_pattern") for p in vllm)
    assert [p for p in lorakit.check_export(mixed, "llama.cpp") if p.startswith("alpha_pattern")]

    pissa = edit(peft_folder(tmp_path, "pissa", method="lora", r=4), init_lora_weights="pissa")
    assert any("init_lora_weights='pissa'" in p for p in lorakit.check_export(pissa, "vllm"))
    biased = edit(peft_folder(tmp_path, "bias", method="lora", r=4), bias="lora_only")
    assert any(p.startswith("bias=") for p in lorakit.check_export(biased, "vllm"))
    huge = edit(peft_folder(tmp_path, "huge", method="lora", r=4), r=1024)
    assert any("max-lora-rank" in p for p in lorakit.check_export(huge, "vllm"))

    no_q = peft_folder(tmp_path, "no_q", method="lora", r=4, targets=["k_proj"])
    assert any("q_proj" in p for p in lorakit.check_export(no_q, "sglang"))
    assert lorakit.check_export(no_q, "vllm") == []

    assert "not a PEFT adapter folder" in lorakit.check_export(tmp_path, "vllm")[0]
    with pytest.raises(ValueError, match="not an export target"):
        lorakit.check_export(plain_path := dora, "tgi")  # noqa: F841


# ---------------------------------------------------------------------------------------------------------------
# export: what is written loads in PEFT with the member's outputs
# ---------------------------------------------------------------------------------------------------------------
MEMBERS = {
    "dora": dict(method="dora", r=4),
    "vera": dict(method="vera", r=8),
    "rslora": dict(method="lora", r=4, alpha=8, scaling="rslora"),
    "mixed": dict(method="lora", r=4, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}),
}


@pytest.mark.parametrize("target", ["peft", "vllm", "sglang"])
@pytest.mark.parametrize("member", list(MEMBERS))
def test_export_loads_in_peft_with_the_same_outputs(member, target, tmp_path):
    from peft import PeftModel

    model, original = adapted(**MEMBERS[member])
    want = logits(model)
    report = lorakit.export(model, tmp_path / "out", target=target)
    assert lorakit.adapter_names(model) == ["default"]  # nothing left behind
    assert report.max_logit_diff is not None and report.max_logit_diff < 1e-4
    peft_model = PeftModel.from_pretrained(original, str(tmp_path / "out")).eval()
    got = logits(peft_model)
    assert (got - want).abs().max() <= report.max_logit_diff + 1e-5
    if target != "peft":
        cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] and not cfg["use_rslora"] and not cfg["use_dora"]
        assert not cfg["rank_pattern"] and not cfg["alpha_pattern"]
        assert lorakit.check_export(tmp_path / "out", target) == []
        assert "converted from" in str(report) and "one rank" in str(report)


def test_delta_lora_goes_to_peft_as_plain_lora_for_the_original_base(tmp_path):
    from peft import PeftModel

    model, original = adapted(method="delta_lora", r=2, delta_start=0)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():  # the base moved, as Delta-LoRA's steps move it
        shift = torch.randn(layer.base.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05
        layer.adapters["default"].shift += shift
        layer.base.weight += shift
    want = logits(model)
    report = lorakit.export(model, tmp_path / "out", target="peft")
    assert "ORIGINAL" in str(report)
    got = logits(PeftModel.from_pretrained(original, str(tmp_path / "out")).eval())
    assert (got - want).abs().max() <= report.max_logit_diff + 1e-5


def test_refusals_write_nothing_and_leave_the_model(tmp_path):
    model, _ = adapted(method="lora", r=4, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save"):
        lorakit.export(model, tmp_path / "out", target="vllm")
    with pytest.raises(ValueError, match="not an export target"):
        lorakit.export(model, tmp_path / "out", target="tgi")
    with pytest.raises(ValueError, match="unknown adapter"):
        lorakit.export(model, tmp_path / "out", target="peft", name="nope")
    assert not (tmp_path / "out").exists() and lorakit.adapter_names(model) == ["default"]


def test_rank_bound_export_reports_its_error(tmp_path):
    model, _ = adapted(method="dora", r=4)
    with pytest.warns(UserWarning, match="not exact"):
        report = lorakit.export(model, tmp_path / "out", target="vllm", rank=1)
    assert report.conversion.max_rel_error > 0 and report.max_logit_diff > 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 1


# ---------------------------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------------------------
def saved_adapter(tmp_path, tiny_chat_folder, **cfg):
    from transformers import LlamaForCausalLM

    model_dir, _ = tiny_chat_folder
    model = LlamaForCausalLM.from_pretrained(model_dir)
    lorakit.attach(model, AdapterConfig(targets=TARGETS, seed=0, **cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    folder = lorakit.save(model, tmp_path / "adapter")
    (folder / "lorakit_run.json").write_text(json.dumps({"model": str(model_dir), "task": "lm"}))
    return folder, model.eval()


def test_cli_convert_and_export_for_vllm(tmp_path, tiny_chat_folder, capsys):
    folder, model = saved_adapter(tmp_path, tiny_chat_folder, method="dora", r=4)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    code, out, err = run(["convert", str(folder), "--to", "lora", "--out", str(tmp_path / "lora")], capsys)
    assert code == 0, err
    assert "dora" in out and "written to" in out
    from lorakit.train.job import load_adapted

    plain, _, _ = load_adapted(tmp_path / "lora")
    assert lorakit.model.registry(plain).configs["default_lora"].method == "lora"
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - want).abs().max() < 1e-5

    code, out, err = run(["export", str(folder), "--for", "vllm", "--out", str(tmp_path / "vllm")], capsys)
    assert code == 0, err
    assert "converted from dora" in out and "max |Δlogit|" in out
    assert lorakit.check_export(tmp_path / "vllm", "vllm") == []

    code, _, err = run(["export", str(folder), "--for", "tgi", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.startswith("error: ") and "not an export target" in err
    code, _, err = run(["convert", str(folder), "--to", "lora", "--rank", "0", "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "rank=0 is invalid" in err and not (tmp_path / "y").exists()


def test_merged_target_writes_a_transformers_folder_with_the_adapters_outputs(tmp_path):
    from transformers import LlamaForCausalLM

    model, _ = adapted(method="dora", r=4)
    want = logits(model)
    report = lorakit.export(model, tmp_path / "merged", target="merged")
    assert lorakit.check_export(tmp_path / "merged", "merged") == []
    assert lorakit.adapter_names(model) == ["default"] and report.max_logit_diff < 1e-4
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(plain) - want).abs().max() <= report.max_logit_diff + 1e-5


def test_check_export_reads_a_gguf_adapter(tmp_path):
    import gguf
    import numpy as np

    def write(folder, adapter_type, extra_tensor=False):
        folder.mkdir()
        writer = gguf.GGUFWriter(str(folder / "adapter.gguf"), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, adapter_type)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
        writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 8), dtype=np.float32))
        writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((8, 4), dtype=np.float32))
        if extra_tensor:
            writer.add_tensor("blk.0.attn_q.magnitude", np.zeros(8, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return folder

    assert lorakit.check_export(write(tmp_path / "good", "lora"), "llama.cpp") == []
    bad = lorakit.check_export(write(tmp_path / "bad", "control_vector", extra_tensor=True), "llama.cpp")
    assert any("not a GGUF LoRA adapter" in p for p in bad) and any("magnitude" in p for p in bad)


def test_rank_with_a_merging_target_is_refused(tmp_path):
    model, _ = adapted(method="lora", r=4)
    with pytest.raises(ValueError, match="merges the adapter exactly"):
        lorakit.export(model, tmp_path / "m", target="merged", rank=2)
    with pytest.raises(ValueError, match="rank=0 is invalid"):
        lorakit.export(model, tmp_path / "m", target="vllm", rank=0)
    assert not (tmp_path / "m").exists()
