"""LoRA-drop (methods.md §10, §17): importance on toy cases with known answers, selection, shared pairs
(forward, merge, save once, load), and the two-stage procedure with a user loop and with lorakit's Trainer."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.methods.lora_drop import LoraDropAdapter, group_key
from lorakit.train.recipes.lora_drop import layer_importance, run_lora_drop, select_layers
from lorakit.model import adapted_layers, registry

ATOL = 1e-5


class Parallel(nn.Module):
    """Two layers reading the same input: y = a(x) + b(x)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Blocks(nn.Module):
    """Three same-type layers; only block 0 matters much for the output."""

    def __init__(self, weights=(1.0, 0.01, 0.01)):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(8, 8)}) for _ in range(3)])
        self.weights = weights

    def forward(self, x):
        return sum(w * blk["proj"](x) for w, blk in zip(self.weights, self.blocks))


def set_pair(layer, a, b):
    layer.adapters["default"].set_factors(torch.tensor(a), torch.tensor(b))


def randomise(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for p in {id(p): p for _, layer in adapted_layers(model) for p in layer.adapters["default"].parameters()}.values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------------ importance
def test_importance_on_a_toy_case_with_a_known_answer():
    torch.manual_seed(0)
    net = Parallel()
    lorakit.attach(net, AdapterConfig(method="lora_drop", r=1, alpha=1, dropout=0.5))  # s = 1
    set_pair(net.a, [[1.0, 0.0]], [[2.0], [0.0]])  # ΔW_a x = (2·x0, 0)     -> ‖·‖² = 4·x0²
    set_pair(net.b, [[0.0, 1.0]], [[1.0], [1.0]])  # ΔW_b x = (x1, x1)      -> ‖·‖² = 2·x1²
    batches = [torch.tensor([[1.0, 1.0], [3.0, 0.0]]), torch.tensor([[[0.0, 2.0]]])]  # 2-D and 3-D inputs
    net.train()
    raw = layer_importance(net, batches)
    # a: 4·(1 + 9 + 0) = 40; b: 2·(1 + 0 + 4) = 10 — dropout (0.5) is off during measurement
    assert raw == pytest.approx({"a": 40.0, "b": 10.0})
    assert net.training and net.a.adapters["default"].training  # mode restored
    assert select_layers(raw, threshold=0.8) == ["a"]
    assert select_layers(raw, threshold=0.81) == ["a", "b"]


def test_importance_includes_the_scaling():
    net = Parallel()
    lorakit.attach(net, AdapterConfig(method="lora_drop", r=1, alpha=3, targets=["a"]))  # s = 3
    set_pair(net.a, [[1.0, 0.0]], [[1.0], [0.0]])
    assert layer_importance(net, [torch.tensor([[2.0, 5.0]])]) == pytest.approx({"a": (3 * 2.0) ** 2})


def test_select_layers_threshold_top_n_ties_and_errors():
    imp = {"l0": 0.05, "l1": 0.5, "l2": 0.15, "l3": 0.3}
    assert select_layers(imp, threshold=0.9) == ["l1", "l2", "l3"]  # 0.5 + 0.3 = 0.8 < 0.9, + 0.15 = 0.95
    assert select_layers(imp, threshold=0.8) == ["l1", "l3"]  # exactly reached
    assert select_layers(imp, threshold=1.0) == ["l0", "l1", "l2", "l3"]
    assert select_layers(imp, top_n=2) == ["l1", "l3"]
    assert select_layers({"x": 1.0, "y": 1.0, "z": 1.0}, top_n=1) == ["x"]  # ties keep model order
    with pytest.raises(ValueError, match="zero importance"):
        select_layers({"a": 0.0, "b": 0.0})


@pytest.mark.parametrize("field, value", [("drop_fraction", 0.0), ("drop_fraction", 1.5),
                                          ("drop_threshold", 0.0), ("drop_top_n", 0),
                                          ("drop_selected", "model.layers.0.q_proj"), ("init", "pissa")])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(method="lora_drop", **{field: value})


# ------------------------------------------------------------------------------------------------ shared pairs
def test_unselected_layers_of_a_type_share_one_pair_forward_and_merge(llama, token_batch):
    sel = ["model.layers.0.self_attn.q_proj"]
    cfg = AdapterConfig(method="lora_drop", r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"],
                        drop_selected=sel)
    base = copy.deepcopy(llama)
    lorakit.attach(llama, cfg)
    randomise(llama)
    shared = registry(llama).shared["default"]
    assert shared.members == {
        "q_proj-linear-64x64": ["model.layers.1.self_attn.q_proj"],
        "v_proj-linear-64x64": ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"],
        "down_proj-linear-64x128": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    }
    layers = dict(adapted_layers(llama))
    v0, v1 = (layers[f"model.layers.{i}.self_attn.v_proj"].adapters["default"] for i in (0, 1))
    assert v0.factors()[0] is v1.factors()[0] and v0.factors()[1] is v1.factors()[1]  # the same tensors
    q0 = layers[sel[0]].adapters["default"]
    assert q0.own and not v0.own and q0.factors()[0] is not layers["model.layers.1.self_attn.q_proj"].adapters[
        "default"].factors()[0]
    # trainable: own pair r(in+out) + one pair per module type
    expected = 2 * (64 + 64) + 2 * (64 + 64) * 2 + 2 * (128 + 64)
    assert lorakit.trainable_parameters(llama)[0] == expected

    # every layer computes base + s·B A x with its (own or shared) pair: check one shared layer plainly
    x = torch.randn(3, 64)
    a, b = v1.factors()
    layer = layers["model.layers.1.self_attn.v_proj"]
    assert torch.allclose(layer(x), base.model.layers[1].self_attn.v_proj(x) + 2.0 * (x @ a.T) @ b.T, atol=ATOL)

    y = llama(token_batch).logits
    assert not torch.allclose(y, base(token_batch).logits, atol=1e-3)
    lorakit.merge(llama)  # the shared delta goes into each of its layers
    for path in shared.members["v_proj-linear-64x64"]:
        merged_w = llama.get_submodule(path).base.weight
        assert torch.allclose(merged_w, base.get_submodule(path).weight + 2.0 * b @ a, atol=ATOL)
    assert torch.allclose(llama(token_batch).logits, y, atol=1e-4)
    lorakit.unmerge(llama)
    assert torch.allclose(llama(token_batch).logits, y, atol=1e-4)


def test_shared_pair_receives_gradient_from_every_layer_using_it():
    torch.manual_seed(0)
    net = Blocks(weights=(1.0, 1.0, 1.0))
    lorakit.attach(net, AdapterConfig(method="lora_drop", r=2, drop_selected=["blocks.0.proj"]))
    randomise(net)
    pair = registry(net).shared["default"].pairs["proj-linear-8x8"]
    x = torch.randn(4, 8)
    net(x).sum().backward()
    g_both = pair.A.grad.clone()
    pair.A.grad = None
    net.blocks[1]["proj"](x).sum().backward()  # block 1's contribution alone
    g1 = pair.A.grad.clone()
    pair.A.grad = None
    net.blocks[2]["proj"](x).sum().backward()
    assert torch.allclose(g_both, g1 + pair.A.grad, atol=1e-5) and g1.abs().sum() > 0


def test_shared_pair_saves_once_and_loads(llama, token_batch, tmp_path):
    fresh = copy.deepcopy(llama)
    cfg = AdapterConfig(method="lora_drop", r=2, targets=["q_proj", "v_proj"],
                        drop_selected=["model.layers.1.self_attn.v_proj"])
    lorakit.attach(llama, cfg)
    randomise(llama)
    y = llama(token_batch).logits
    folder = lorakit.save(llama, tmp_path / "drop")
    keys = sorted(load_file(str(folder / "lorakit_weights.safetensors")))
    assert keys == [
        "default|layer|model.layers.1.self_attn.v_proj|A", "default|layer|model.layers.1.self_attn.v_proj|B",
        "default|shared||pairs.q_proj-linear-64x64.A", "default|shared||pairs.q_proj-linear-64x64.B",
        "default|shared||pairs.v_proj-linear-64x64.A", "default|shared||pairs.v_proj-linear-64x64.B",
    ]
    lorakit.load(fresh, folder)
    assert torch.allclose(fresh(token_batch).logits, y, atol=ATOL)
    q0, q1 = (fresh.model.layers[i].self_attn.q_proj.adapters["default"] for i in (0, 1))
    assert q0.factors()[0] is q1.factors()[0]  # still one shared tensor after loading
    plain = lorakit.unload(fresh)
    assert torch.allclose(plain(token_batch).logits, y, atol=1e-4)


def test_selected_path_that_is_not_a_target_is_refused_before_changes(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match="not targets"):
        lorakit.attach(llama, AdapterConfig(method="lora_drop", targets=["q_proj"], drop_selected=["lm_head"]))
    assert lorakit.adapter_names(llama) == [] and all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


# ------------------------------------------------------------------------------------------------ the procedure
def sgd_loop(steps_seen):
    def train(model, examples):
        steps_seen.append(len(examples))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        hooks = lorakit.training_hooks(model)
        for _ in range(4):
            for x, y in torch.utils.data.DataLoader(examples, batch_size=8):
                F.mse_loss(model(x), y).backward()
                opt.step()
                hooks.after_step()
                opt.zero_grad()
        hooks.finish()
    return train


def test_run_lora_drop_selects_the_layer_that_matters(tmp_path):
    torch.manual_seed(0)
    net = Blocks()
    xs = torch.randn(64, 8)
    data = list(zip(xs, xs @ torch.randn(8, 8)))
    seen = []
    cfg = AdapterConfig(method="lora_drop", r=2, drop_fraction=0.25, seed=0)
    result = lorakit.run_lora_drop(net, cfg, data, sgd_loop(seen), report_path=tmp_path / "report.json")
    assert seen == [16, 64]  # stage 1 on a quarter of the data, stage 2 on all of it
    assert result.sample_size == 16
    assert result.selected == ["blocks.0.proj"]
    assert result.importance["blocks.0.proj"] > 0.99 and sum(result.importance.values()) == pytest.approx(1.0)
    assert result.shared == {"proj-linear-8x8": ["blocks.1.proj", "blocks.2.proj"]}
    cfg2 = registry(net).configs["default"]
    assert cfg2.drop_selected == ["blocks.0.proj"]
    p1, p2 = (net.blocks[i]["proj"].adapters["default"] for i in (1, 2))
    assert p1.factors()[0] is p2.factors()[0]
    assert json.loads((tmp_path / "report.json").read_text())["selected"] == ["blocks.0.proj"]
    lorakit.save(net, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "lorakit_config.json").read_text())["adapters"]["default"]
    assert meta["extra"]["lora_drop"]["selected"] == ["blocks.0.proj"]
    assert meta["extra"]["lora_drop"]["importance"] == pytest.approx(result.importance)


def test_run_lora_drop_top_n_continues_stage_one_weights():
    torch.manual_seed(0)
    net = Blocks(weights=(1.0, 0.5, 0.01))
    xs = torch.randn(32, 8)
    data = list(zip(xs, xs @ torch.randn(8, 8)))
    snapshots = {}

    def train(model, examples):  # stage 1 trains and records B; stage 2 does nothing
        if snapshots:
            return
        sgd_loop([])(model, examples)
        snapshots.update({p: l.adapters["default"].factors()[1].detach().clone() for p, l in adapted_layers(model)})

    cfg = AdapterConfig(method="lora_drop", r=2, drop_fraction=0.5, drop_top_n=2, seed=0)
    result = run_lora_drop(net, cfg, data, train)
    assert result.selected == ["blocks.0.proj", "blocks.1.proj"]
    for path in result.selected:  # stage 2 starts from the stage-1 weights of selected layers
        assert torch.equal(net.get_submodule(path).adapters["default"].factors()[1], snapshots[path])
    shared_b = net.blocks[2]["proj"].adapters["default"].factors()[1]
    assert torch.count_nonzero(shared_b) == 0  # shared pairs start fresh (B = 0)


def test_run_lora_drop_with_lorakit_trainer_and_a_dataloader():
    from lorakit.train.trainer import TrainConfig, TrainResult

    torch.manual_seed(0)
    net = Blocks()
    xs = torch.randn(40, 8)
    rows = [{"x": x, "y": y} for x, y in zip(xs, xs @ torch.randn(8, 8))]
    loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True)
    cfg = AdapterConfig(method="lora_drop", r=2, drop_fraction=0.5, seed=0)
    result = run_lora_drop(net, cfg, loader, trainer_config=TrainConfig(steps=30, batch_size=4, lr=2e-2, progress=False,
                                                                       schedule="constant", max_grad_norm=None),
                           loss_fn=lambda m, b: F.mse_loss(m(b["x"]), b["y"]), forward_fn=lambda m, b: m(b["x"]))
    assert isinstance(result.stage1, TrainResult) and len(result.stage1.losses) == 15  # steps scaled by 0.5
    assert isinstance(result.stage2, TrainResult) and len(result.stage2.losses) == 30
    assert result.sample_size == 20
    assert "blocks.0.proj" in result.selected
    losses = result.stage2.losses
    assert sum(losses[-5:]) < sum(losses[:5])


def test_run_lora_drop_refuses_bad_calls_before_changing_the_model():
    net = Blocks()
    with pytest.raises(ValueError, match="method='lora_drop'"):
        run_lora_drop(net, AdapterConfig(method="lora"), [], lambda m, d: None)
    with pytest.raises(ValueError, match="drop_selected"):
        run_lora_drop(net, AdapterConfig(method="lora_drop", drop_selected=["blocks.0.proj"]), [],
                      lambda m, d: None)
    with pytest.raises(TypeError, match="data must be"):
        run_lora_drop(net, AdapterConfig(method="lora_drop"), iter([1, 2]), lambda m, d: None)
    assert lorakit.adapter_names(net) == []
    with pytest.raises(ValueError, match="zero importance"):  # a train_fn that never steps
        run_lora_drop(net, AdapterConfig(method="lora_drop"), [(torch.randn(8), torch.randn(8))] * 4,
                      lambda m, d: None)
    assert lorakit.adapter_names(net) == []


def test_tiny_llama_two_stages_through_plain_loop_hooks(tmp_path):
    model = tiny_llama(hidden=32)
    original = copy.deepcopy(model)
    seqs = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [s for s in seqs]
    losses = {}

    def train(m, examples):
        stage = 1 if not losses else 2
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        hooks = lorakit.training_hooks(m)
        m.train()
        out = losses.setdefault(stage, [])
        for _ in range(2 if stage == 1 else 5):
            for batch in torch.utils.data.DataLoader(examples, batch_size=4):
                loss = m(input_ids=batch, labels=batch).loss + lorakit.regularization_loss(m)
                loss.backward()
                opt.step()
                hooks.after_step()
                opt.zero_grad()
                out.append(loss.item())
        hooks.finish()

    cfg = AdapterConfig(method="lora_drop", r=4, targets=["q_proj", "v_proj", "up_proj"], drop_fraction=0.25,
                        drop_top_n=2, seed=0)
    result = run_lora_drop(model, cfg, data, train)
    assert len(result.selected) == 2 and len(result.importance) == 6
    assert sum(len(v) for v in result.shared.values()) == 4
    assert all(group_key(p, model.get_submodule(p).ops) in result.shared for p in result.importance
               if p not in result.selected)
    assert sum(losses[2][-4:]) < sum(losses[2][:4]) - 0.1
    model.eval()
    y = model(seqs).logits
    lorakit.save(model, tmp_path / "drop")
    fresh = copy.deepcopy(original)
    lorakit.load(fresh, tmp_path / "drop")
    assert torch.allclose(fresh(seqs).logits, y, atol=ATOL)
    lorakit.merge(fresh)
    assert torch.allclose(fresh(seqs).logits, y, atol=1e-4)
    assert all(isinstance(l.adapters["default"], LoraDropAdapter) for _, l in adapted_layers(model))
    assert math.isclose(sum(result.importance.values()), 1.0)
