"""Property test over PEFT folders (issue 11): random and mutated ``adapter_config.json`` dicts and weight files.

One invariant: ``lorakit.load`` either succeeds or raises a lorakit error (AdapterLoadError / ValueError, never
another exception type), and on error the model (tensors, requires_grad, adapters) and the files are unchanged.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.io import AdapterLoadError

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def _make_folder(root: Path) -> Path:
    model = get_peft_model(small_net(), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(root / "peft")
    return root / "peft"


_ROOT = Path(tempfile.mkdtemp(prefix="lorakit-peft-props-"))
SOURCE = _make_folder(_ROOT)
BASE_CONFIG = json.loads((SOURCE / "adapter_config.json").read_text())
BASE_TENSORS = load_file(str(SOURCE / "adapter_model.safetensors"))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["", "none", "all", "loftq", "pissa", "LORA", "IA3", "0", "[", "(.*", "8"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.sampled_from(["0", "2", "x", "(", "r"]),
                                                                        inner, max_size=3)), max_leaves=6)
KEYS = ["r", "lora_alpha", "target_modules", "peft_type", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
        "modules_to_save", "lora_dropout", "bias", "init_lora_weights", "loftq_config", "fan_in_fan_out",
        "target_parameters", "layer_replication", "init_r", "task_type", "some_future_key"]
config_edits = st.dictionaries(st.sampled_from(KEYS), values, max_size=4)
removals = st.lists(st.sampled_from(KEYS[:12]), max_size=3)
TENSOR_KEYS = sorted(BASE_TENSORS)
file_faults = st.sampled_from(["none", "no_weights", "truncated", "config_list", "config_not_json", "drop_tensor",
                               "extra_tensor", "int_tensor", "wrong_shape", "no_config"])


def state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, lorakit.adapter_names(model))


def files(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_folder(folder: Path, cfg, fault: str, victim: str) -> None:
    folder.mkdir()
    tensors = dict(BASE_TENSORS)
    if fault == "drop_tensor":
        del tensors[victim]
    elif fault == "extra_tensor":
        tensors["base_model.model.0.lora_C.weight"] = torch.zeros(2, 2)
    elif fault == "int_tensor":
        tensors[victim] = torch.ones_like(tensors[victim], dtype=torch.int64)
    elif fault == "wrong_shape":
        tensors[victim] = torch.zeros(3, 5)
    if fault != "no_weights":
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        if fault == "truncated":
            data = (folder / "adapter_model.safetensors").read_bytes()
            (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    if fault == "config_list":
        (folder / "adapter_config.json").write_text(json.dumps([cfg]))
    elif fault == "config_not_json":
        (folder / "adapter_config.json").write_text("{'r': 2,")
    elif fault != "no_config":
        (folder / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=config_edits, removed=removals, fault=file_faults, victim=st.sampled_from(TENSOR_KEYS),
       with_adapter=st.booleans())
def test_peft_load_is_success_or_a_clear_error_with_nothing_changed(edits, removed, fault, victim, with_adapter):
    cfg = copy.deepcopy(BASE_CONFIG)
    for key in removed:
        cfg.pop(key, None)
    cfg.update(edits)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        write_folder(folder, cfg, fault, victim)
        model = small_net()
        if with_adapter:  # an adapter already there must survive a failed load untouched
            lorakit.attach(model, lorakit.AdapterConfig(r=2, targets=["0"], modules_to_save=["2"]), name="mine")
        before, on_disk = state(model), files(folder)
        try:
            lorakit.load(model, folder, name="loaded")
        except (AdapterLoadError, ValueError) as err:
            assert str(err)
            tensors, grads, names = before
            now = model.state_dict()
            assert sorted(now) == sorted(tensors)
            assert all(torch.equal(now[k], v) for k, v in tensors.items())
            assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
            assert lorakit.adapter_names(model) == names
        else:
            assert "loaded" in lorakit.adapter_names(model)
            out = model(torch.randn(2, 6))
            assert out.shape == (2, 3) and bool(torch.isfinite(out).all()) or not all(
                math.isfinite(float(v)) for v in [cfg.get("lora_alpha", 1)] if isinstance(v, (int, float)))
        assert files(folder) == on_disk
