"""``torch.compile(model, fullgraph=True)`` for every family member: one graph, no breaks, eager's numbers.

One tiny Llama carries every member at once, each on its own linear layer (LoRA with its inits and rsLoRA, DoRA,
VeRA, LoRA-FA, AdaLoRA, SoRA, Delta-LoRA, LoRA-drop, and on 4-bit NF4 bases QLoRA, QDoRA and LoftQ), all active, so
one trace covers the whole family (compiling is expensive on a small shared CPU). Training hooks (``after_step``)
run outside the compiled region, between steps, as the slow trajectory test does.

Fast tests use dynamo's ``explain`` (break count, graph count) and the ``aot_eager``/``eager`` backends (autograd and
dynamo without code generation); ``fullgraph=True`` makes any graph break an error there. The real inductor backend
runs in the slow tests.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lorakit

from conftest import tiny_llama

LAYER = "model.layers.{}.{}"
#: adapter name -> (decoder layer, module, AdapterConfig fields); layer 1's up/down projections are NF4 (4-bit)
MEMBERS = {
    "lora": (0, "self_attn.q_proj", dict(method="lora")),
    "dora": (0, "self_attn.k_proj", dict(method="dora", dropout=0.1)),
    "vera": (0, "self_attn.v_proj", dict(method="vera", r=8)),
    "lora_fa": (0, "self_attn.o_proj", dict(method="lora_fa")),
    "adalora": (0, "mlp.gate_proj", dict(method="adalora", target_r=2, total_steps=6, t_init=1, t_final=1,
                                         delta_t=1)),
    "sora": (0, "mlp.up_proj", dict(method="sora")),
    "delta_lora": (0, "mlp.down_proj", dict(method="delta_lora")),
    "rslora_gaussian": (1, "self_attn.q_proj", dict(method="lora", init="gaussian", scaling="rslora", dropout=0.1)),
    "pissa": (1, "self_attn.k_proj", dict(method="lora", init="pissa")),
    "orthogonal": (1, "self_attn.v_proj", dict(method="lora", init="orthogonal")),
    "lora_drop": (1, "self_attn.o_proj", dict(method="lora_drop")),
    "loftq": (1, "mlp.gate_proj", dict(method="lora", init="loftq")),
    "qlora": (1, "mlp.up_proj", dict(method="lora")),
    "qdora": (1, "mlp.down_proj", dict(method="dora", dora_detach_norm=False)),  # gradient through the norm
}
#: members whose layer function can be folded into the weights
MERGEABLE = [n for n in MEMBERS if n != "sora"]


def family_model() -> torch.nn.Module:
    """Every member on its own layer of a tiny Llama, all active and trainable, factors moved off their zero init."""
    model = tiny_llama(hidden=32, layers=2)
    lorakit.quantize(model.model.layers[1].mlp, compute_dtype=torch.float32, skip=["gate_proj"])
    for name, (index, module, fields) in MEMBERS.items():
        fields = {"r": 4, "seed": 1, **fields}
        lorakit.attach(model, lorakit.AdapterConfig(targets=[LAYER.format(index, module)], **fields), name=name)
    lorakit.set_active(model, list(MEMBERS))
    lorakit.set_trainable(model, list(MEMBERS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))


def train_step(model: torch.nn.Module, ids: torch.Tensor, params: dict[str, torch.Tensor]):
    """Loss and gradients of one forward/backward, dropout drawn from the same seed every time."""
    for p in params.values():
        p.grad = None
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}


def test_training_step_is_one_graph_with_eager_loss_and_gradients():
    model = family_model().train()
    ids = batch()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    loss_c, grads_c = train_step(compiled, ids, params)
    loss_e, grads_e = train_step(model, ids, params)
    assert counter.frame_count == 1
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for name in params:  # every trainable tensor of every member gets eager's gradient
        assert grads_e[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-7, msg=name)


def test_inference_routed_and_merged_models_compile_to_one_graph_each():
    model = family_model().eval()
    ids = batch()
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        # DoRA's compiled norm is the direct row norm (eager: the Gram form), equal to rounding
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 1
        names = ["lora", None, "qdora"]  # per-example adapters: only these examples get those members' changes
        with lorakit.route(model, names):
            routed = compiled(input_ids=ids).logits
            torch.testing.assert_close(routed, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 2  # the routed batch is its own graph, still one
        lorakit.merge(model, MERGEABLE)
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)
        assert counter.frame_count == 3


@pytest.mark.slow
@pytest.mark.parametrize("member", list(MEMBERS))
def test_each_member_on_every_linear_of_a_llama_is_one_training_graph(member):
    """The issue's measurement: one member on every linear layer of a tiny Llama (4-bit bases for the q* members)."""
    _, _, fields = MEMBERS[member]
    model = tiny_llama(hidden=32, layers=2)
    if member.startswith("q"):
        lorakit.quantize(model, compute_dtype=torch.float32)
    lorakit.attach(model, lorakit.AdapterConfig(targets="all-linear", **{"r": 4, "seed": 1, **fields}))
    model.train()
    ids = batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_inductor_training_matches_eager_and_hooks_run_between_compiled_steps():
    """Real code generation (inductor), forward and backward; then a few AdamW steps with the training hooks
    (AdaLoRA's budget, SoRA's gates, Delta-LoRA's base update) called between compiled steps, as documented: the
    trajectory equals eager's."""
    torch._dynamo.reset()
    ids = batch()
    runs = {}
    for mode in ("eager", "inductor"):
        model = family_model().train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        run = torch.compile(model, fullgraph=True, backend="inductor") if mode == "inductor" else model
        with torch._inductor.config.patch(fallback_random=True):  # dropout draws eager's masks
            first = train_step(run, ids, params)
            opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)  # SoRA gates never decay
            hooks = lorakit.training_hooks(model)
            losses = []
            for _ in range(4):
                opt.zero_grad()
                torch.manual_seed(7)
                loss = run(input_ids=ids, labels=ids).loss + lorakit.regularization_loss(model)
                loss.backward()
                opt.step()
                hooks.after_step()  # outside the compiled region
                losses.append(loss.item())
        runs[mode] = first, losses, {n: t.detach().clone() for n, t in model.state_dict().items()}
    (loss_e, grads_e), losses_e, state_e = runs["eager"]
    (loss_i, grads_i), losses_i, state_i = runs["inductor"]
    torch.testing.assert_close(loss_i, loss_e, rtol=1e-5, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_i[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert losses_i == pytest.approx(losses_e, rel=1e-4, abs=1e-5)
    for name in state_e:  # adapters, AdaLoRA's masks and Delta-LoRA's moved base weights
        torch.testing.assert_close(state_i[name].float(), state_e[name].float(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_inductor_inference_routed_and_merged_logits_match_eager():
    model = family_model().eval()
    ids = batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        with lorakit.route(model, ["qlora", "dora", None]):
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4,
                                       atol=1e-5)
    lorakit.merge(model, MERGEABLE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
