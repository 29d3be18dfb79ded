"""Issue 12 (architecture), core moves: the method registry is open to members defined outside the package, the
config imports nothing of lorakit, and shared rules (names, norms) live in one place."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
import lorakit.methods as methods
from lorakit import AdapterConfig
from lorakit.config import name_matches
from lorakit.layers import is_norm
from lorakit.methods.lora import LoraAdapter

SRC = Path(lorakit.__file__).parent


class RowScaledLora(LoraAdapter):
    """A test-only family member: plain LoRA under its own name."""

    method = "row_scaled_lora"


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    monkeypatch.setattr(methods, "_REGISTERED", {})
    methods.register_method("row_scaled_lora", RowScaledLora)
    return RowScaledLora


def test_a_member_registered_from_outside_attaches_and_mixes_by_the_generic_rule(registered):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6))
    lorakit.attach(net, AdapterConfig(method="row_scaled_lora", r=2), name="a")
    lorakit.attach(net, AdapterConfig(method="row_scaled_lora", r=2), name="b")
    assert type(net[0].adapters["a"]) is RowScaledLora
    for adapter in net[0].adapters.values():
        with torch.no_grad():
            adapter.B.normal_()
    lorakit.combine(net, {"a": 0.5, "b": 2.0}, name="mix", how="cat")
    layer = net[0]
    expected = 0.5 * layer.adapters["a"].delta_weight(layer) + 2.0 * layer.adapters["b"].delta_weight(layer)
    assert torch.allclose(layer.adapters["mix"].delta_weight(layer), expected, atol=1e-5)
    assert "row_scaled_lora" in str(pytest.raises(ValueError, AdapterConfig, method="nope").value)


def test_register_method_refuses_a_taken_name_and_a_mismatched_class(registered):
    methods.register_method("row_scaled_lora", RowScaledLora)  # the same class again: fine
    with pytest.raises(ValueError, match="taken"):
        methods.register_method("lora", type("Other", (LoraAdapter,), {"method": "lora"}))
    with pytest.raises(ValueError, match="method = 'row_scaled_lora'"):
        methods.register_method("another", RowScaledLora)
    with pytest.raises(TypeError):
        methods.register_method("plain", nn.Linear)


def test_unknown_method_fails_at_construction_with_the_same_message():
    with pytest.raises(ValueError, match=r"AdapterConfig.method='nope' is invalid; allowed: adalora, .*lora"):
        AdapterConfig(method="nope")


@pytest.mark.parametrize("module", ["config.py", "methods/watch.py"])
def test_ground_floor_modules_import_nothing_of_lorakit(module):
    tree = ast.parse((SRC / module).read_text())
    type_only = {id(n) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING" for n in ast.walk(block)}

    def ours(node: ast.AST) -> bool:
        if isinstance(node, ast.ImportFrom):
            return node.level > 0 or (node.module or "").startswith("lorakit")
        return isinstance(node, ast.Import) and any(a.name.startswith("lorakit") for a in node.names)

    assert [ast.unparse(n) for n in ast.walk(tree) if id(n) not in type_only and ours(n)] == []


def test_one_name_rule_and_one_norm_rule():
    assert name_matches("q_proj", "model.layers.0.q_proj") and not name_matches("proj", "model.layers.0.q_proj")
    assert name_matches("model[.]layers[.][0-9]+[.]q_proj", "model.layers.3.q_proj")
    assert not name_matches("(", "x")  # an invalid regex matches nothing
    cfg = AdapterConfig(r=4, rank_pattern={"q_proj": 2, "layers[.]1[.].*": 3})
    assert [cfg.rank_for(p) for p in ("layers.0.q_proj", "layers.1.k_proj", "layers.0.k_proj")] == [2, 3, 4]

    class LlamaRMSNorm(nn.Module):
        pass

    class LayerNorm2d(nn.LayerNorm):
        pass

    assert all(is_norm(m) for m in (nn.LayerNorm(2), nn.BatchNorm1d(2), nn.GroupNorm(1, 2), LlamaRMSNorm(),
                                     LayerNorm2d(2)))
    assert not any(is_norm(m) for m in (nn.Linear(2, 2), nn.Embedding(2, 2)))
