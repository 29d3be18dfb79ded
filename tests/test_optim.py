"""lorakit.optim (LoRA+ groups, optimisers by name) and the 8-bit AdamW, against plain formulas, PEFT and bitsandbytes."""
from __future__ import annotations

import copy
import doctest
import io
import json
import warnings
from collections import Counter

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.optim import PagedOptimizerFallbackWarning, loraplus_param_groups, make_optimizer, parameter_lrs
from lorakit.quant import adamw8bit as q8
from lorakit.quant.adamw8bit import AdamW8bit, dequantize_blockwise, dynamic_map, quantize_blockwise, state_bytes

LR, RATIO, WD = 1e-3, 16.0, 0.1


class Net(nn.Module):
    """Embedding, a hidden Linear, a LayerNorm and a Linear head: every kind of parameter LoRA+ must place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, tok):
        return self.head(self.norm(torch.relu(self.lin(self.emb(tok).mean(1)))))


def adapted_net(method="lora", **extra):
    net = Net()
    lorakit.attach(net, AdapterConfig(method=method, r=4, targets=["emb", "lin"], modules_to_save=["head", "norm"],
                                      **extra))
    return net


def decays(model, groups):
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    return {n: wd_of[id(p)] for n, p in model.named_parameters() if id(p) in wd_of}


# ------------------------------------------------------------------------------------------------ LoRA+ groups
def test_default_rates_b_high_everything_else_base():
    net = adapted_net()
    groups = loraplus_param_groups(net, lr=LR, ratio=RATIO, weight_decay=WD)
    lrs = parameter_lrs(net, groups)
    # the table of lorakit's default (methods.md §17): only B matrices of non-embedding layers get lr·ratio
    assert lrs == {
        "emb.adapters.default.A": LR, "emb.adapters.default.B": LR,  # embedding adapter: embedding_lr = lr
        "lin.adapters.default.A": LR, "lin.adapters.default.B": LR * RATIO,
        "norm.copies.default.weight": LR, "norm.copies.default.bias": LR,  # modules_to_save LayerNorm
        "head.copies.default.weight": LR, "head.copies.default.bias": LR,  # modules_to_save head
    }
    # biases and normalisation weights never decay; everything else gets weight_decay
    assert decays(net, groups) == {
        "emb.adapters.default.A": WD, "emb.adapters.default.B": WD, "lin.adapters.default.A": WD,
        "lin.adapters.default.B": WD, "norm.copies.default.weight": 0.0, "norm.copies.default.bias": 0.0,
        "head.copies.default.weight": WD, "head.copies.default.bias": 0.0,
    }
    # only trainable tensors, each exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in net.parameters() if p.requires_grad) == 8
    assert all(not p.requires_grad for n, p in net.named_parameters() if ".base." in n)


def test_peft_compatible_switch_gives_every_1d_tensor_the_high_rate():
    net = adapted_net()
    lrs = parameter_lrs(net, loraplus_param_groups(net, lr=LR, ratio=RATIO, vector_rate="high", embedding_lr=1e-6))
    assert lrs == {
        "emb.adapters.default.A": 1e-6, "emb.adapters.default.B": 1e-6,
        "lin.adapters.default.A": LR, "lin.adapters.default.B": LR * RATIO,
        "norm.copies.default.weight": LR * RATIO, "norm.copies.default.bias": LR * RATIO,
        "head.copies.default.weight": LR, "head.copies.default.bias": LR * RATIO,
    }


def test_embedding_lr_and_plain_ratio_one():
    net = adapted_net()
    lrs = parameter_lrs(net, loraplus_param_groups(net, lr=LR, ratio=RATIO, embedding_lr=5e-5))
    assert lrs["emb.adapters.default.A"] == lrs["emb.adapters.default.B"] == 5e-5
    assert lrs["lin.adapters.default.B"] == LR * RATIO
    # make_optimizer without loraplus_ratio: every tensor at lr
    opt = make_optimizer("adamw", net, lr=LR, weight_decay=WD)
    assert set(parameter_lrs(net, opt).values()) == {LR}
    assert isinstance(opt, torch.optim.AdamW)


@pytest.mark.parametrize("method, vectors", [("dora", ["magnitude"]), ("vera", ["lambda_d", "lambda_b"])])
def test_dora_magnitude_and_vera_vectors(method, vectors):
    model = tiny_llama(hidden=32, layers=1)
    lorakit.attach(model, AdapterConfig(method=method, r=4, targets=["q_proj", "v_proj"]))
    base = parameter_lrs(model, loraplus_param_groups(model, lr=LR, ratio=RATIO))
    high = parameter_lrs(model, loraplus_param_groups(model, lr=LR, ratio=RATIO, vector_rate="high"))
    vec = [n for n in base if n.rsplit(".", 1)[-1] in vectors]
    assert len(vec) == 2 * len(vectors)
    for n in vec:  # 1-D adapter tensors: base rate by default, lr·ratio with PEFT's rule
        assert base[n] == LR and high[n] == LR * RATIO
    for n in base:
        if n.endswith(".B"):
            assert base[n] == high[n] == LR * RATIO
        if n.endswith(".A"):
            assert base[n] == high[n] == LR


def test_sora_gates_get_their_own_group_without_decay():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lorakit.attach(net, AdapterConfig(method="sora", r=4, targets=["0"], sora_lr=0.3))
    groups = loraplus_param_groups(net, lr=LR, ratio=RATIO, weight_decay=WD)
    lrs, wds = parameter_lrs(net, groups), decays(net, groups)
    assert lrs == {"0.adapters.default.A": LR, "0.adapters.default.B": LR * RATIO, "0.adapters.default.gate": 0.3}
    assert wds["0.adapters.default.gate"] == 0.0 and wds["0.adapters.default.A"] == WD
    gate_group = [g for g in groups if any(p is net[0].adapters["default"].gate for p in g["params"])]
    assert len(gate_group) == 1 and len(gate_group[0]["params"]) == 1


def test_adalora_lambda_keeps_the_base_rate():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lorakit.attach(net, AdapterConfig(method="adalora", r=4, target_r=2, total_steps=10, targets=["0"]))
    lrs = parameter_lrs(net, loraplus_param_groups(net, lr=LR, ratio=RATIO))
    assert lrs == {"0.adapters.default.A": LR, "0.adapters.default.E": LR, "0.adapters.default.B": LR * RATIO}


def test_lora_drop_shared_pair_is_grouped_once():
    net = nn.Sequential(*[nn.Sequential() for _ in range(3)])
    for block in net:
        block.add_module("fc", nn.Linear(8, 8))  # same module type in every block
    lorakit.attach(net, AdapterConfig(method="lora_drop", r=2, targets=["fc"], drop_selected=["0.fc"]))
    opt = make_optimizer("adamw", net, lr=LR, loraplus_ratio=RATIO)  # torch raises if a tensor sits in two groups
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    by_shape = Counter((tuple(p.shape), g["lr"]) for g in opt.param_groups for p in g["params"])
    assert by_shape == {((2, 8), LR): 2, ((8, 2), LR * RATIO): 2}  # own pair of 0.fc + one pair shared by 1.fc, 2.fc


def test_model_without_adapters_full_finetuning():
    net = Net()
    lrs = parameter_lrs(net, loraplus_param_groups(net, lr=LR, ratio=RATIO))
    assert set(lrs.values()) == {LR} and len(lrs) == 7


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(ratio=-1.0), "ratio"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(vector_rate="peft"), "vector_rate"),
    (dict(embedding_lr=-1.0), "embedding_lr"),
])
def test_bad_group_arguments_raise(kwargs, field):
    net = adapted_net()
    args = dict(lr=LR, ratio=RATIO) | kwargs
    with pytest.raises(ValueError, match=field):
        loraplus_param_groups(net, **args)


def test_bad_optimizer_name_and_nothing_trainable():
    net = adapted_net()
    with pytest.raises(ValueError, match="optimizer='adam9'.*adamw8bit"):
        make_optimizer("adam9", net, lr=LR)
    frozen = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer("adamw", frozen, lr=LR)


# ------------------------------------------------------------------------------------------------ PEFT parity
def _peft_key(name):
    """(layer path, kind) of a PEFT parameter name."""
    name = name.replace("base_model.model.", "").replace(".modules_to_save.default", "").replace(".base_layer", "")
    for marker in (".lora_", ".vera_"):
        if marker in name:
            return name.split(marker)[0]
    return name


def _ours_key(name):
    return name.split(".adapters.")[0].replace(".base.", ".").replace(".copies.default.", ".")


def _table(model, groups, key):
    info = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return Counter((key(n), tuple(p.shape)) + info[id(p)] for n, p in model.named_parameters() if id(p) in info)


def _peft_case(method):
    from peft import LoraConfig, VeraConfig

    if method == "vera":
        return tiny_llama(hidden=32, layers=1), dict(method="vera", r=4, targets=["q_proj", "v_proj"],
                                                     modules_to_save=["lm_head"]), \
            VeraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    targets = ["c_attn", "c_fc", "wte"]
    cfg = dict(method=method, r=4, alpha=8, targets=targets, modules_to_save=["ln_f"])
    if method == "dora":
        targets = ["c_attn", "c_fc"]
        cfg["targets"] = targets
    return tiny_gpt2(), cfg, LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["ln_f"],
                                        fan_in_fan_out=True, use_dora=method == "dora")


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_vector_rate_high_equals_peft_create_loraplus_optimizer(method):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    base, ours_cfg, peft_cfg = _peft_case(method)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    ours = copy.deepcopy(base)
    lorakit.attach(ours, AdapterConfig(**ours_cfg))
    for model in (pm, ours):  # a plain trainable bias of a layer nobody adapts: PEFT's 1-D rule reaches it too
        for n, p in model.named_parameters():
            if n.endswith(("h.0.mlp.c_proj.bias", "layers.0.mlp.down_proj.weight")):
                p.requires_grad_(True)
    popt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WD)
    oopt = make_optimizer("adamw", ours, lr=LR, weight_decay=WD, loraplus_ratio=RATIO, vector_rate="high",
                          embedding_lr=1e-6)
    theirs, mine = _table(pm, popt.param_groups, _peft_key), _table(ours, oopt.param_groups, _ours_key)
    assert mine == theirs
    lrs = {lr for (_, _, lr, _) in mine}
    assert LR * RATIO in lrs and (method == "vera" or LR in lrs)  # the comparison covers both rates
    # and lorakit's default differs from PEFT exactly on the 1-D tensors
    default = _table(ours, loraplus_param_groups(ours, lr=LR, ratio=RATIO, weight_decay=WD, embedding_lr=1e-6),
                     _ours_key)
    moved = (default - mine)
    assert moved and all(len(shape) == 1 and lr == LR for (_, shape, lr, _) in moved)


# ------------------------------------------------------------------------------------------------ 8-bit maps
def _reference_nearest(x, code):
    """Plain nearest-code rounding: argmin |x - code| (first minimum on ties)."""
    return torch.argmin((x.reshape(-1, 1) - code.reshape(1, -1)).abs(), dim=1).to(torch.uint8).reshape(x.shape)


def test_dynamic_maps_equal_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        ours = dynamic_map(signed)
        assert torch.equal(ours, bnbf.create_dynamic_map(signed=signed))
        assert ours.numel() == 256 and torch.all(ours[1:] > ours[:-1])  # sorted, no duplicates
    assert dynamic_map(False).min() == 0.0 and (dynamic_map(True) < 0).sum() == 127


def test_blockwise_quantisation_is_nearest_code_per_block():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5 * 256 + 77, generator=g) * torch.rand(5 * 256 + 77, generator=g) ** 4
    x[256:512] = 0.0  # an all-zero block
    for signed, values in ((True, x), (False, x * x)):
        code = dynamic_map(signed)
        q, absmax = quantize_blockwise(values, code, 256)
        assert q.dtype == torch.uint8 and q.shape == values.shape and absmax.shape == (6,)
        padded = torch.nn.functional.pad(values, (0, 6 * 256 - values.numel())).view(6, 256)
        assert torch.equal(absmax, padded.abs().amax(1))
        scale = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))
        ref = _reference_nearest((padded * scale[:, None]).reshape(-1)[: values.numel()], code)
        assert torch.equal(q, ref)
        deq = dequantize_blockwise(q, absmax, code, 256)
        assert torch.equal(deq, (code[q.long()].reshape(-1) * absmax.repeat_interleave(256)[: values.numel()]))
        assert torch.all(deq[256:512] == 0)


def test_lookup_rounding_equals_bucketize_at_every_midpoint():
    for signed in (True, False):
        code = dynamic_map(signed)
        mids = (code[1:] + code[:-1]) / 2
        up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
        values = torch.cat([mids, up, down, code, torch.tensor([0.0, -0.0, 1e-38, -1e-38, 1e-45])])
        # ties go to the lower entry, as torch.bucketize(right=False) and bitsandbytes' reference path
        assert torch.equal(q8._nearest(values, code).long(), torch.bucketize(values, mids))


def test_quantisation_bit_identical_to_bitsandbytes_reference_kernel():
    pytest.importorskip("bitsandbytes")
    ops = torch.ops.bitsandbytes
    # bitsandbytes' pure-PyTorch reference kernels (its "default" backend), not its approximate CPU C kernel
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40_003, generator=g) * torch.rand(40_003, generator=g) ** 6
    for signed, values in ((True, x), (False, x * x)):
        code = dynamic_map(signed)
        # bitsandbytes is a pinned dev dependency: if its reference kernel is missing, this fails loudly
        ref_q, ref_absmax = ops.quantize_blockwise.default.redispatch(keys, values, code, 256)
        q, absmax = quantize_blockwise(values, code, 256)
        assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
        ref_deq = ops.dequantize_blockwise.default.redispatch(keys, ref_q, ref_absmax, code, 256, torch.float32)
        assert torch.equal(dequantize_blockwise(q, absmax, code, 256), ref_deq)


# ------------------------------------------------------------------------------------------------ 8-bit AdamW
def _reference_step(p, grad, st, step, lr, betas, eps, wd):
    """Plain AdamW on dequantised moments, then requantised: the update bitsandbytes' 8-bit AdamW makes."""
    m = dequantize_blockwise(st["m_q"], st["m_s"], dynamic_map(True))
    v = dequantize_blockwise(st["v_q"], st["v_s"], dynamic_map(False))
    m = betas[0] * m + (1 - betas[0]) * grad
    v = betas[1] * v + (1 - betas[1]) * grad * grad
    m_hat = m / (1 - betas[0] ** step)
    v_hat_sqrt = v.sqrt() / (1 - betas[1] ** step) ** 0.5
    p = p * (1 - lr * wd) - lr * m_hat / (v_hat_sqrt + eps)
    st["m_q"], st["m_s"] = quantize_blockwise(m, dynamic_map(True))
    st["v_q"], st["v_s"] = quantize_blockwise(v, dynamic_map(False))
    return p


def test_step_equals_plain_formula_on_quantised_moments():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(48, 128, generator=g)
    p = nn.Parameter(w0.clone())
    opt = AdamW8bit([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = w0.clone()
    st = {"m_q": torch.full(w0.shape, 127, dtype=torch.uint8), "m_s": torch.zeros(24),
          "v_q": torch.zeros(w0.shape, dtype=torch.uint8), "v_s": torch.zeros(24)}
    assert dynamic_map(True)[127] == 0 and dynamic_map(False)[0] == 0
    for step in range(1, 6):
        grad = torch.randn(w0.shape, generator=g)
        p.grad = grad.clone()
        opt.step()
        ref = _reference_step(ref, grad, st, step, 1e-2, (0.9, 0.99), 1e-8, 0.1)
        assert torch.allclose(p.detach(), ref, atol=1e-6, rtol=0)
        # the stored codes differ only where fp32 rounding of the update moved a value across a midpoint
        assert (opt.state[p]["exp_avg_q"] == st["m_q"]).float().mean() > 0.999
        assert (opt.state[p]["exp_avg_sq_q"] == st["v_q"]).float().mean() > 0.999
    assert opt.state[p]["step"] == 5


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=g)
    y = x @ (torch.randn(64, 128, generator=g) / 8).T + 0.01 * torch.randn(256, 64, generator=g)
    return x, y


def _run(make_opt, steps=60):
    x, y = _regression()
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)  # weight 8192 elements: 8-bit; bias 64: fp32 like bitsandbytes
    opt = make_opt(lin.parameters())
    losses, traj = [], []
    for _ in range(steps):
        loss = ((lin(x) - y) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        traj.append(lin.weight.detach().clone())
    return losses, torch.stack(traj), opt


def test_trajectory_stays_close_to_torch_adamw():
    ref_losses, ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01))
    losses, traj, opt = _run(lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.01))
    assert "exp_avg_q" in opt.state[opt.param_groups[0]["params"][0]]
    # distance between the two weight trajectories, relative to the weights, at every step
    rel = (traj - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert rel.max() < 0.05, rel.max()
    assert losses[-1] < 0.01 * losses[0]  # it solves the problem ...
    assert abs(losses[-1] - ref_losses[-1]) < 0.2 * ref_losses[-1] + 1e-4  # ... about as well as fp32 AdamW


def test_close_to_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    _, ref, ref_opt = _run(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.01), steps=30)
    _, traj, _ = _run(lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.01), steps=30)
    assert ref_opt.state[ref_opt.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8
    # bitsandbytes' CPU C kernel rounds approximately (we round exactly to the nearest code), so close, not equal
    rel = (traj - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert rel.max() < 0.02, rel.max()


def test_state_bytes_at_most_0_3x_of_fp32_adamw():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    lorakit.attach(model, AdapterConfig(r=16, targets=["0", "2"]))  # A, B: 16x256 = 4096 elements each
    x = torch.randn(4, 256)

    def after_one_step(name):
        opt = make_optimizer(name, model, lr=1e-3)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        return opt

    fp32, eight = after_one_step("adamw"), after_one_step("adamw8bit")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert state_bytes(fp32) >= 8 * n
    assert state_bytes(eight) <= 0.3 * state_bytes(fp32)
    assert state_bytes(eight) == 2 * n + 2 * 4 * (n // 256)  # uint8 codes + fp32 block scales (step is an int)


def test_small_tensors_keep_fp32_state_and_optim_bits_override():
    small, big, forced = nn.Parameter(torch.zeros(4095)), nn.Parameter(torch.zeros(4096)), nn.Parameter(torch.zeros(8192))
    opt = AdamW8bit([{"params": [small, big]}, {"params": [forced], "optim_bits": 32}])
    for p in (small, big, forced):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"} and opt.state[small]["exp_avg"].dtype == torch.float32
    assert opt.state[big]["exp_avg_q"].dtype == torch.uint8 and opt.state[big]["exp_avg_absmax"].shape == (16,)
    assert "exp_avg" in opt.state[forced]
    # block 2048 (bitsandbytes' older block size)
    p = nn.Parameter(torch.zeros(8192))
    p.grad = torch.ones_like(p)
    opt = AdamW8bit([p], block_size=2048)
    opt.step()
    assert opt.state[p]["exp_avg_absmax"].shape == (4,)


def test_make_optimizer_keeps_fp32_state_for_embedding_weights():
    model = tiny_llama(hidden=64, layers=1)  # embed_tokens 128x64 = 8192 elements
    lorakit.attach(model, AdapterConfig(r=4, targets=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    opt = make_optimizer("adamw8bit", model, lr=1e-3)
    model(torch.randint(0, 128, (2, 6))).logits.pow(2).mean().backward()
    opt.step()
    assert "exp_avg" in opt.state[model.model.embed_tokens.weight]
    assert "exp_avg_q" in opt.state[model.lm_head.weight]


def test_bf16_parameters_update_in_fp32():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    grad = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    p16, p32 = nn.Parameter(w.to(torch.bfloat16)), nn.Parameter(w.to(torch.bfloat16).float())
    for p in (p16, p32):
        p.grad = grad.to(p.dtype)
    AdamW8bit([p16], lr=1e-3).step()
    AdamW8bit([p32], lr=1e-3).step()
    assert p16.dtype == torch.bfloat16 and torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))


def _steps(runs, steps=3, seed=4):
    """The same gradients for every (optimizer, params) run."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in runs[0][1]]
        for opt, params in runs:
            for p, gr in zip(params, grads):
                p.grad = gr.to(p.dtype)
            opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_exactly(dtype):
    from lorakit.train.checkpoint import flatten_state, unflatten_state

    torch.manual_seed(5)
    a = [nn.Parameter(torch.randn(64, 96).to(dtype)), nn.Parameter(torch.randn(32).to(dtype))]
    opt_a = AdamW8bit([{"params": a[:1]}, {"params": a[1:], "lr": 3e-3}], lr=1e-2, weight_decay=0.05)
    _steps([(opt_a, a)], steps=2)
    saved = opt_a.state_dict()
    # through torch.save and through the trainer's checkpoint format (safetensors-style tensors + JSON)
    buf = io.BytesIO()
    torch.save(saved, buf)
    tensors = {}
    meta = json.loads(json.dumps(flatten_state(saved, tensors)))
    runs = [(opt_a, a)]
    for loaded in (torch.load(io.BytesIO(buf.getvalue())), unflatten_state(meta, tensors)):
        b = [nn.Parameter(p.detach().clone()) for p in a]
        opt_b = AdamW8bit([{"params": b[:1]}, {"params": b[1:]}], lr=1.0)
        opt_b.load_state_dict(loaded)
        st = opt_b.state[b[0]]
        assert st["exp_avg_q"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
        assert torch.equal(st["exp_avg_q"], opt_a.state[a[0]]["exp_avg_q"])
        assert torch.equal(st["exp_avg_absmax"], opt_a.state[a[0]]["exp_avg_absmax"])
        assert opt_b.state[b[1]]["exp_avg"].dtype == torch.float32  # fp32 moments even for bf16 parameters
        assert opt_b.state[b[0]]["step"] == 2
        assert opt_b.param_groups[1]["lr"] == 3e-3 and opt_b.param_groups[0]["betas"] == (0.9, 0.999)
        runs.append((opt_b, b))
    _steps(runs)  # the original and both reloaded copies continue identically
    for _, params in runs[1:]:
        for x, y in zip(a, params):
            assert torch.equal(x, y)


def test_tiny_llama_trains_with_adamw8bit_and_loraplus():
    def train(name, **kw):
        model = tiny_llama(hidden=32, layers=1)
        lorakit.attach(model, AdapterConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "up_proj"]))
        opt = make_optimizer(name, model, lr=2e-2, loraplus_ratio=4, **kw)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(12):
            loss = model(ids, labels=ids).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        return losses, opt

    losses, opt = train("adamw8bit", min_8bit_size=256)  # the r x 32 / 64 x r tensors get 8-bit state
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == 6 and all("exp_avg_q" in opt.state[p] for g in opt.param_groups for p in g["params"])
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.93 * losses[0], losses
    ref, _ = train("adamw")
    assert abs(losses[-1] - ref[-1]) < 0.01 * ref[-1]  # as good as fp32 AdamW


def test_trainer_resume_with_adamw8bit_is_exact(tmp_path):
    from lorakit.train.trainer import TrainConfig, Trainer

    def make_model():  # lm_head (128x64) trains too: its state is 8-bit
        model = tiny_llama(seed=0)
        lorakit.attach(model, AdapterConfig(r=4, alpha=8, seed=0, modules_to_save=["lm_head"]))
        return model

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(24):
        ids = (torch.arange(12) + int(torch.randint(0, 128, (1,), generator=g))) % 128
        data.append({"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids})
    base = dict(steps=6, batch_size=4, lr=3e-3, optimizer="adamw8bit", loraplus_ratio=4.0, weight_decay=0.01,
                save_every=3, progress=False, log_every=1)
    full = Trainer(make_model(), TrainConfig(**base, output_dir=str(tmp_path / "a")), data).train()
    resumed = Trainer(make_model(),
                      TrainConfig(**base, output_dir=str(tmp_path / "b"), resume=str(tmp_path / "a" / "ckpt-3")),
                      data).train()
    assert resumed.losses == full.losses


def test_bad_adamw8bit_arguments():
    p = [nn.Parameter(torch.zeros(4))]
    for kwargs, field in ((dict(block_size=100), "block_size"), (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
                          (dict(min_8bit_size=-1), "min_8bit_size"), (dict(eps=float("inf")), "eps")):
        with pytest.raises(ValueError, match=field):
            AdamW8bit(p, **kwargs)


# ------------------------------------------------------------------------------------------------ paged
def test_paged_on_cpu_falls_back_with_one_clear_warning():
    net = adapted_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt8 = make_optimizer("paged_adamw8bit", net, lr=LR, loraplus_ratio=RATIO)
    relevant = [w for w in caught if issubclass(w.category, PagedOptimizerFallbackWarning)]
    assert len(relevant) == 1
    text = str(relevant[0].message)
    assert "unified memory" in text and "CUDA" in text and "'adamw8bit'" in text
    assert isinstance(opt8, AdamW8bit) and parameter_lrs(net, opt8)["lin.adapters.default.B"] == LR * RATIO
    with pytest.warns(PagedOptimizerFallbackWarning, match="'adamw'"):
        opt32 = make_optimizer("paged_adamw_32bit", net, lr=LR)
    assert type(opt32) is torch.optim.AdamW


def test_paged_on_cuda_uses_bitsandbytes(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    import lorakit.optim as optim

    net = adapted_net()
    monkeypatch.setattr(optim, "_on_cuda", lambda groups: True)  # what a CUDA model sees (no GPU here)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PagedOptimizerFallbackWarning)
        opt = make_optimizer("paged_adamw8bit", net, lr=LR, loraplus_ratio=RATIO)
        opt32 = make_optimizer("paged_adamw", net, lr=LR)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit) and isinstance(opt32, bnb.optim.PagedAdamW)
    assert parameter_lrs(net, opt) == parameter_lrs(net, loraplus_param_groups(net, lr=LR, ratio=RATIO))
    monkeypatch.setattr(optim, "_bitsandbytes", lambda: None)  # CUDA without bitsandbytes
    with pytest.warns(PagedOptimizerFallbackWarning, match="bitsandbytes is not installed"):
        assert isinstance(make_optimizer("paged_adamw8bit", net, lr=LR), AdamW8bit)


def test_sgd_and_trainer_signature():
    net = adapted_net()
    opt = make_optimizer("sgd", net, lr=LR, weight_decay=0.0, loraplus_ratio=None, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    for name in ("adamw", "adamw8bit", "ADAMW", "adamw_8bit"):
        assert make_optimizer(name, net, lr=LR, weight_decay=0.01, loraplus_ratio=None) is not None


def test_docstring_examples_run():
    import lorakit.optim

    for module in (lorakit.optim, q8):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
