"""NF4 storage (bitsandbytes parity and plain formulas), Linear4bit, quantize(), QLoRA train/save/load/merge,
requantising merges, and every available method on a 4-bit base."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers import AdaptedLayer
from lorakit.quant import (
    NF4_CODE_VALUES,
    Linear4bit,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    dynamic_map,
    load_quantized,
    model_weight_bytes,
    nf4_bits_per_parameter,
    normal_map,
    quantize,
    quantize_blockwise_8bit,
    quantize_nf4,
    requantize,
    save_quantized,
)
from conftest import tiny_gpt2, tiny_llama

try:  # bitsandbytes is a dev dependency; its CPU backend is what the parity tests compare against
    import bitsandbytes.functional as bnbf

    bnbf.quantize_4bit(torch.ones(64), quant_type="nf4")
    HAVE_BNB = True
except Exception:  # pragma: no cover - reported by the skip reason
    HAVE_BNB = False
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes CPU backend unavailable: parity not checked "
                                                    "(the plain-formula tests below still run)")

CODE = torch.tensor(NF4_CODE_VALUES)


# ---------------------------------------------------------------------------------------------------------------
# plain-formula references (methods.md §13), written as loops over blocks
# ---------------------------------------------------------------------------------------------------------------
def ref_nf4(w: torch.Tensor, blocksize: int):
    """Block absmax, v = w·(1/absmax) clamped, nearest code (midpoint ties go down), high nibble first."""
    flat = w.reshape(-1).float()
    codes, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        amax = block.abs().max().clamp(min=1e-38)
        full = block.numel() == blocksize
        v = (block * (1.0 / amax) if full else block / amax).clamp(-1, 1)
        mids = (CODE[:-1] + CODE[1:]) / 2
        idx = (v[:, None] > mids[None, :]).sum(1)  # number of midpoints strictly below v
        codes.append(idx)
        absmax.append(amax)
    codes = torch.cat(codes)
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([7])])
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8)
    return packed, torch.stack(absmax)


def test_code_book_matches_definition_and_bitsandbytes():
    assert CODE.shape == (16,) and CODE[0] == -1 and CODE[7] == 0 and CODE[15] == 1
    assert torch.allclose(normal_map(), CODE, atol=2e-7)  # Φ⁻¹ construction of §13
    if HAVE_BNB:
        assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu"), CODE)
        assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())
    m = dynamic_map()
    assert m.shape == (256,) and bool((m[1:] > m[:-1]).all()) and m[-1] == 1.0 and (m == 0).sum() == 1


@pytest.mark.parametrize("shape,blocksize", [((16, 64), 64), ((7, 9), 64), ((3, 100), 32), ((1, 1), 64)])
def test_nf4_against_plain_formula(shape, blocksize):
    torch.manual_seed(0)
    w = torch.randn(shape) * 3
    q = quantize_nf4(w, blocksize)
    packed, absmax = ref_nf4(w, blocksize)
    assert torch.equal(q.packed.reshape(-1), packed)
    assert torch.equal(q.absmax, absmax)
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: w.numel()].long()
    expected = (CODE[codes] * absmax.repeat_interleave(blocksize)[: w.numel()]).reshape(shape)
    assert torch.equal(dequantize_nf4(q), expected)


def test_nf4_ties_go_to_lower_code():
    mid = float((CODE[8] + CODE[9]) / 2)  # exactly between codes 8 and 9 (absmax 1 via the first element)
    q = quantize_nf4(torch.tensor([1.0, mid]))
    assert q.packed.reshape(-1).tolist() == [15 * 16 + 8]


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((33, 70), 64), ((7, 9), 32), ((300, 257), 128),
                                             ((2, 64 * 256 + 3), 64)])
def test_bitsandbytes_parity(dtype, double_quant, shape, blocksize):
    torch.manual_seed(hash((shape, blocksize)) % 1000)
    w = (torch.randn(shape) * 2).to(dtype)
    w[0, :5] = 0  # zeros and a partial zero stretch
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    q = quantize_nf4(w, blocksize, double_quant)
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(q.absmax2, state.state2.absmax)
        assert state.state2.blocksize == 256
    for out_dtype in (torch.float32, torch.bfloat16):
        state.dtype = out_dtype
        assert torch.equal(dequantize_nf4(q, out_dtype), bnbf.dequantize_4bit(packed, state))


@needs_bnb
def test_8bit_blockwise_parity_with_bitsandbytes():
    torch.manual_seed(0)
    x = torch.randn(200_000) * torch.rand(200_000) ** 4  # many values near the dense middle of the map
    x[256:512] = 0  # an all-zero block
    q, state = bnbf.quantize_blockwise(x, blocksize=256)
    mine, absmax = quantize_blockwise_8bit(x, 256)
    assert torch.equal(mine, q) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_blockwise_8bit(mine, absmax), bnbf.dequantize_blockwise(q, state))


def test_8bit_blockwise_is_near_nearest():
    # plain formula: v = x/absmax, nearest map entry; the 65536-point grid may pick the other neighbour only when
    # v is within one grid step (2/65535) of a midpoint
    torch.manual_seed(1)
    x = torch.randn(5000)
    q, absmax = quantize_blockwise_8bit(x, 256)
    m = dynamic_map()
    v = x / absmax.repeat_interleave(256)[: x.numel()]
    nearest = (v[:, None] - m[None, :]).abs().argmin(1)
    off = q.long() != nearest
    mids = (m[nearest] + m[q.long()]) / 2
    assert bool(((v[off] - mids[off]).abs() <= 2 / 65535).all())


def test_bits_per_parameter():
    assert nf4_bits_per_parameter(64, double_quant=False) == 4.5
    assert nf4_bits_per_parameter(64, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(nf4_bits_per_parameter(64, True), 3) == 4.127
    w = torch.randn(256, 1024)
    assert quantize_nf4(w).bits_per_parameter() == 4.5
    # measured on a real tensor: packed + uint8 absmax + fp32 absmax2 + one fp32 offset
    n = w.numel()
    assert quantize_nf4(w, double_quant=True).bits_per_parameter() == 8 * (n / 2 + n / 64 + 4 * n / 64 / 256 + 4) / n


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="blocksize=100"):
        quantize_nf4(torch.randn(4, 4), blocksize=100)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------------
# Linear4bit
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_backward(compute):
    torch.manual_seed(0)
    dense = nn.Linear(128, 48)
    layer = Linear4bit.from_linear(dense, compute_dtype=compute)
    w = quantize_nf4(dense.weight.detach(), 64, double_quant=True).dequantize(compute)
    assert torch.equal(layer.dequantize(), w) and layer.dequantize().dtype == compute
    x = torch.randn(5, 128, requires_grad=True)
    y = layer(x)
    ref = F.linear(x.detach().to(compute), w, dense.bias.detach().to(compute)).float()
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, (g.to(compute) @ w).float(), atol=1e-6 if compute == torch.float32 else 1e-2)
    assert not any(b.requires_grad for b in layer.buffers())


def test_linear4bit_saves_no_dense_weight_for_backward():
    layer = Linear4bit.from_linear(nn.Linear(256, 256, bias=False), compute_dtype=torch.float32)
    saved = []
    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert sum(saved) < 256 * 256 / 8  # a dense weight would be 65536 values
    y.sum().backward()
    assert x.grad is not None


def test_linear4bit_to_linear_is_exact():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.float32)
    dense = layer.to_linear()
    assert type(dense) is nn.Linear and torch.equal(dense.weight, layer.dequantize())
    x = torch.randn(3, 64)
    assert torch.equal(dense(x), layer(x))
    # fp32 weights quantised with bf16 compute: dense layer stays fp32 (runs in an fp32 model) holding bf16 values
    layer16 = Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.bfloat16)
    d16 = layer16.to_linear()
    assert d16.weight.dtype == torch.float32 and torch.equal(d16.weight, layer16.dequantize().float())


# ---------------------------------------------------------------------------------------------------------------
# quantize(model)
# ---------------------------------------------------------------------------------------------------------------
def expected_bytes(n: int, double_quant: bool = True) -> int:
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + (blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks)


def test_quantize_llama_layers_norms_and_bytes():
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 8))
    linear_sizes = [m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for m in model.modules():  # start from bf16 norms to see them cast to fp32
        if "Norm" in type(m).__name__:
            m.to(torch.bfloat16)
    dense_bytes = model_weight_bytes(model) + sum(p.numel() * 2 for m in model.modules()
                                                  if "Norm" in type(m).__name__ for p in m.parameters())
    ref = model(x).logits
    out = quantize(model, compute_dtype=torch.float32)
    assert out is model
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == len(linear_sizes)
    assert all(p.dtype == torch.float32 for m in model.modules() if "Norm" in type(m).__name__
               for p in m.parameters())
    saved = sum(4 * n - expected_bytes(n) for n in linear_sizes)
    assert model_weight_bytes(model) == dense_bytes - saved
    assert lorakit.trainable_parameters(model)[1] == sum(p.numel() for p in tiny_llama().parameters())
    rel = (model(x).logits - ref).norm() / ref.norm()
    assert 0 < rel < 0.25  # 4-bit weights (random init, relative error ~0.1 per layer) change the function


def test_quantize_gpt2_conv1d():
    model = tiny_gpt2()
    x = torch.randint(0, 96, (2, 6))
    ref = model(x).logits
    conv = model.transformer.h[0].attn.c_attn
    quantize(model, compute_dtype=torch.float32, double_quant=False)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and (layer.out_features, layer.in_features) == tuple(conv.weight.t().shape)
    assert torch.equal(layer.dequantize(), quantize_nf4(conv.weight.detach().t()).dequantize())
    assert (model(x).logits - ref).norm() / ref.norm() < 0.1


def test_quantize_validates_before_changing():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, match in [({"bits": 8}, "bits=8"), ({"blocksize": 48}, "blocksize=48"),
                          ({"compute_dtype": torch.int8}, "compute_dtype"), ({"skip": [".*"]}, "no nn.Linear")]:
        with pytest.raises(ValueError, match=match):
            quantize(model, **kwargs)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# QLoRA end to end: train, save, reload, merge
# ---------------------------------------------------------------------------------------------------------------
def lm_loss(model, batch):
    return model(batch, labels=batch).loss


def train_steps(model, batch, steps=8, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: SoRA gates must not decay
    hooks = lorakit.training_hooks(model)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, batch) + lorakit.regularization_loss(model)
        loss.backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_qlora_train_save_load_merge(tmp_path, token_batch):
    model = quantize(tiny_llama(), compute_dtype=torch.float32)
    lorakit.attach(model, lorakit.AdapterConfig(r=4, alpha=8, seed=0))
    losses = train_steps(model, token_batch)
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    with torch.no_grad():
        ref = model(token_batch).logits
    save_quantized(model, tmp_path / "q")
    fresh = load_quantized(tiny_llama(seed=5), tmp_path / "q")
    assert isinstance(fresh.model.layers[1].mlp.down_proj.base, Linear4bit)
    with torch.no_grad():
        assert torch.equal(fresh(token_batch).logits, ref)
    # the file keeps the packed form: smaller than the fp32 linears alone
    n_lin = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    size = (tmp_path / "q" / "lorakit_quant.safetensors").stat().st_size
    assert size < model_weight_bytes(tiny_llama()) - 3 * n_lin
    # merge: dequantised plain Linear layers whose outputs equal the adapted model's
    lorakit.merge(fresh)
    assert type(fresh.model.layers[0].self_attn.q_proj.base) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(fresh(token_batch).logits, ref, atol=1e-5)
    plain = lorakit.unload(fresh)
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(isinstance(m, (Linear4bit, AdaptedLayer)) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(token_batch).logits, ref, atol=1e-5)


def test_save_quantized_without_adapters_and_errors(tmp_path, token_batch):
    model = quantize(tiny_gpt2(), compute_dtype=torch.float32)
    save_quantized(model, tmp_path / "q")
    fresh = load_quantized(tiny_gpt2(seed=3), tmp_path / "q")
    assert torch.equal(fresh(token_batch % 96).logits, model(token_batch % 96).logits)
    with pytest.raises(ValueError, match="no module|does not fit|shape"):
        load_quantized(tiny_llama(), tmp_path / "q")
    with pytest.raises(ValueError, match="no 4-bit layer"):
        save_quantized(tiny_gpt2(), tmp_path / "x")


def test_bf16_compute_merge_on_fp32_model(token_batch):
    model = quantize(tiny_llama(), compute_dtype=torch.bfloat16)
    lorakit.attach(model, lorakit.AdapterConfig(r=4, seed=0))
    train_steps(model, token_batch, steps=2)
    with torch.no_grad():
        ref = model(token_batch).logits
        lorakit.merge(model)
        merged = model(token_batch).logits
    assert model.model.layers[0].self_attn.q_proj.base.weight.dtype == torch.float32
    # the adapted model rounds activations to bf16 before the base matmul; the merged fp32 layer does not
    assert (merged - ref).abs().max() < 2e-2 * ref.abs().max()


def test_requantize_is_explicit_warns_and_reports(token_batch):
    model = quantize(tiny_llama(), compute_dtype=torch.float32)
    lorakit.attach(model, lorakit.AdapterConfig(r=4, seed=0))
    train_steps(model, token_batch, steps=3)
    with torch.no_grad():
        ref = model(token_batch).logits
    with pytest.warns(UserWarning, match="rounded to NF4 again"):
        report = requantize(model, sample=token_batch)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    with torch.no_grad():
        out = model(token_batch).logits
    assert report["max_abs_output_change"] == pytest.approx(float((out - ref).abs().max()), rel=1e-6)
    assert 0 < report["max_rel_weight_change"] < 0.2
    assert report["layers_requantized"] == 14
    with pytest.raises(ValueError, match="needs a model with lorakit adapters"):
        requantize(model)


# ---------------------------------------------------------------------------------------------------------------
# methods on a 4-bit base
# ---------------------------------------------------------------------------------------------------------------
METHOD_CONFIGS = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, scaling="rslora"),
    "dora": dict(method="dora", r=4),
    "vera": dict(method="vera", r=16),
    "lora_fa": dict(method="lora_fa", r=4),
    "adalora": dict(method="adalora", r=6, target_r=3, total_steps=10, t_init=1, t_final=2),
    "sora": dict(method="sora", r=4),
}


@pytest.mark.parametrize("key", list(METHOD_CONFIGS))
def test_method_on_4bit_base_trains_and_merges(key, token_batch):
    cfg = dict(METHOD_CONFIGS[key])
    model = quantize(tiny_llama(), compute_dtype=torch.float32)
    lorakit.attach(model, lorakit.AdapterConfig(seed=0, **cfg))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base, Linear4bit) and layer.ops.quantized
    losses = train_steps(model, token_batch, steps=6)
    assert losses[-1] < losses[0]
    assert not any(isinstance(m, Linear4bit) and m.weight_packed.requires_grad for m in model.modules())
    model.eval()
    with torch.no_grad():
        ref = model(token_batch).logits
        lorakit.merge(model)
        assert type(layer.base) is nn.Linear
        assert torch.allclose(model(token_batch).logits, ref, atol=2e-5)


def test_delta_lora_on_4bit_base_is_refused():
    model = quantize(tiny_llama(), compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"delta_lora.*4-bit|4-bit.*delta_lora"):
        lorakit.attach(model, lorakit.AdapterConfig(method="delta_lora", r=4))
    assert lorakit.adapter_names(model) == []
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_qpissa_on_4bit_base(token_batch):
    # init="pissa" on a 4-bit base: SVD of the dequantised weight, residual requantised (methods.md §12)
    model = quantize(tiny_llama(), compute_dtype=torch.float32)
    layer = model.model.layers[0].mlp.up_proj
    w4 = layer.dequantize(torch.float32)
    with torch.no_grad():
        ref = model(token_batch).logits
    lorakit.attach(model, lorakit.AdapterConfig(r=8, alpha=4, init="pissa", targets=["up_proj"]))
    adapted = model.model.layers[0].mlp.up_proj
    assert isinstance(adapted.base, Linear4bit)
    a, s = adapted.adapters["default"], 0.5
    u, sv, vh = torch.linalg.svd(w4, full_matrices=False)
    top = u[:, :8] @ torch.diag(sv[:8]) @ vh[:8]
    assert torch.allclose(s * a.B0 @ a.A0, top, atol=1e-4)  # scaling honoured: s·BA is the top-8 part
    # the new base is the NF4 rounding of the residual W4 - s·B0·A0, bit for bit (the residual from the adapter's own
    # factors: one computed from the test's SVD differs in the last bits and may round some entries differently)
    res = w4 - s * (a.B0.float() @ a.A0.float())
    assert (res - (w4 - top)).abs().max() < 1e-4
    assert torch.equal(adapted.base.dequantize(torch.float32), quantize_nf4(res, 64, True).dequantize())
    # the start point deviates from the 4-bit base only by the residual's rounding, smaller than W's own rounding
    w = tiny_llama().model.layers[0].mlp.up_proj.weight.detach()
    err = (w4 - adapted.base.dequantize(torch.float32) - s * a.B @ a.A).norm()
    assert err < (w - w4).norm()
    with torch.no_grad():
        out = model(token_batch).logits
    assert (out - ref).norm() / ref.norm() < 0.05
