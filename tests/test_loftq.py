"""LoftQ (methods.md §14) and QPiSSA (§12) honouring the scaling, and QLoRA/QDoRA on real MiniLM weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers import AdaptedLayer
from lorakit.quant import (
    Linear4bit,
    dequantize_nf4,
    load_quantized,
    loftq_decompose,
    quantize,
    quantize_nf4,
    save_quantized,
)
from conftest import tiny_llama


def svd_r(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def qlora_error(w: torch.Tensor) -> torch.Tensor:
    """||W − deq(Q(W))||, the error QLoRA starts from (its adapter starts at zero); NF4 block 64, no DQ."""
    return (w - dequantize_nf4(quantize_nf4(w))).norm()


# ---------------------------------------------------------------------------------------------------------------
# the decomposition
# ---------------------------------------------------------------------------------------------------------------
def test_one_step_is_quantise_then_scaled_svd():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    r, s = 6, 0.25  # alpha = 1.5, r = 6
    q, a, b = loftq_decompose(w, r, s, iters=1)
    q_ref = quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(q.packed, q_ref.packed) and torch.equal(q.absmax, q_ref.absmax) and not q.double_quant
    residual = w - dequantize_nf4(q_ref)
    assert torch.allclose(s * b @ a, svd_r(residual, r), atol=1e-6)
    # A = √(S/s)·Vᵀ, B = U·√(S/s): balanced factors (equal row norms of A and column norms of B)
    assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 8.0, 32.0, 128.0])
def test_scaling_honoured_for_any_alpha(alpha):
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.02
    r = 8
    s = alpha / r
    q, a, b = loftq_decompose(w, r, s, iters=3)
    err = (w - dequantize_nf4(q) - s * b @ a).norm()
    q1, a1, b1 = loftq_decompose(w, r, 1.0, iters=3)  # alpha = r: the unscaled factors
    assert torch.allclose(err, (w - dequantize_nf4(q1) - b1 @ a1).norm(), rtol=1e-4)
    assert err < qlora_error(w)
    if s != 1:  # PEFT's choice (factors not divided by s) under- or overshoots the correction for alpha != r
        assert (w - dequantize_nf4(q1) - s * b1 @ a1).norm() > 1.2 * err


def test_qpissa_loop_starts_with_svd():
    torch.manual_seed(2)
    w = torch.randn(64, 64) * 0.02 + 0.1 * torch.randn(64, 1) @ torch.randn(1, 64)  # one strong direction
    q, a, b = loftq_decompose(w, 4, 2.0, iters=1, svd_first=True)
    top = svd_r(w, 4)
    assert torch.allclose(2.0 * b @ a, top, atol=1e-5)
    assert torch.equal(q.packed, quantize_nf4(w - top).packed)
    assert (w - dequantize_nf4(q) - 2.0 * b @ a).norm() < qlora_error(w)


def test_decompose_validates():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="r=9"):
        loftq_decompose(w, 9)
    with pytest.raises(ValueError, match="loftq_iter"):
        loftq_decompose(w, 2, iters=0)


# ---------------------------------------------------------------------------------------------------------------
# init="loftq" through attach
# ---------------------------------------------------------------------------------------------------------------
def test_attach_loftq_quantises_base_and_beats_qlora(token_batch):
    original = tiny_llama()
    with torch.no_grad():
        ref = original(token_batch).logits
    model = tiny_llama()
    cfg = lorakit.AdapterConfig(r=8, alpha=32, init="loftq", loftq_iter=2, targets="all-linear", seed=0)
    lorakit.attach(model, cfg)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer.base, Linear4bit) and not layer.base.double_quant
    assert layer.base.compute_dtype == torch.float32
    adapter, s = layer.adapters["default"], 4.0
    w = original.model.layers[1].mlp.down_proj.weight.detach()
    q, a, b = loftq_decompose(w, 8, s, iters=2)
    assert torch.equal(layer.base.weight_packed, q.packed)
    assert torch.allclose(adapter.A, a) and torch.allclose(adapter.B, b)
    x = torch.randn(3, w.shape[1])
    expected = F.linear(x, dequantize_nf4(q)) + s * F.linear(F.linear(x, a), b)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # the whole model starts closer to the original than a 4-bit (QLoRA) model does
    qlora = quantize(tiny_llama(), compute_dtype=torch.float32, double_quant=False)
    with torch.no_grad():
        err_loftq = (model(token_batch).logits - ref).norm()
        err_qlora = (qlora(token_batch).logits - ref).norm()
    assert err_loftq < err_qlora
    # the adapter trains and the model merges back to plain fp32 layers with the same outputs
    assert lorakit.trainable_parameters(model)[0] == sum(p.numel() for m in model.modules()
                                                         if isinstance(m, AdaptedLayer)
                                                         for p in m.adapters.parameters())
    with torch.no_grad():
        before = model(token_batch).logits
        lorakit.merge(model)
        assert type(layer.base) is nn.Linear
        assert torch.allclose(model(token_batch).logits, before, atol=1e-5)


def test_loftq_rslora_and_bf16_weights():
    model = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    w = model[0].weight.detach().float()
    lorakit.attach(model, lorakit.AdapterConfig(r=4, alpha=2, scaling="rslora", init="loftq"))
    layer = model[0]
    assert layer.base.compute_dtype == torch.bfloat16 and layer.adapters["default"].A.dtype == torch.float32
    s = 2 / 4 ** 0.5
    ad = layer.adapters["default"]
    approx = layer.base.dequantize(torch.float32) + s * ad.B @ ad.A
    assert (w - approx).norm() < qlora_error(w)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_loftq_needs_full_precision_base():
    model = quantize(tiny_llama(), compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="already 4-bit"):
        lorakit.attach(model, lorakit.AdapterConfig(r=4, init="loftq"))
    assert lorakit.adapter_names(model) == [] and not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_loftq_save_load_keeps_the_modified_backbone(tmp_path, token_batch):
    model = tiny_llama()
    lorakit.attach(model, lorakit.AdapterConfig(r=4, alpha=8, init="loftq", targets=["q_proj", "v_proj"], seed=0))
    with torch.no_grad():
        ref = model(token_batch).logits
    save_quantized(model, tmp_path / "loftq")
    fresh = load_quantized(tiny_llama(seed=9), tmp_path / "loftq")
    with torch.no_grad():
        assert torch.equal(fresh(token_batch).logits, ref)


def test_pissa_then_quantize_is_qpissa(token_batch):
    # the official QPiSSA recipe with one step: SVD of W first, then the residual is quantised
    original = tiny_llama()
    model = tiny_llama()
    lorakit.attach(model, lorakit.AdapterConfig(r=8, alpha=16, init="pissa", targets=["gate_proj"]))
    quantize(model, compute_dtype=torch.float32, double_quant=False)
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, AdaptedLayer) and isinstance(layer.base, Linear4bit) and layer.ops.quantized
    w = original.model.layers[0].mlp.gate_proj.weight.detach()
    q, a, b = loftq_decompose(w, 8, 2.0, iters=1, svd_first=True)
    assert torch.equal(layer.base.weight_packed, q.packed)
    ad = layer.adapters["default"]
    assert (w - layer.base.dequantize(torch.float32) - 2.0 * ad.B @ ad.A).norm() < qlora_error(w)


@pytest.mark.parametrize("order", ["pissa_then_quantize", "quantize_then_pissa"])
def test_qpissa_save_load_keeps_the_exact_residual(order, tmp_path, token_batch):
    # lorakit.load re-derives a PiSSA residual from the base it is given; load_quantized must end with the saved
    # 4-bit residual codes, not a requantised copy
    model = tiny_llama()
    if order == "quantize_then_pissa":
        quantize(model, compute_dtype=torch.float32)
    lorakit.attach(model, lorakit.AdapterConfig(r=4, init="pissa", targets=["q_proj", "up_proj"]))
    if order == "pissa_then_quantize":
        quantize(model, compute_dtype=torch.float32)
    with torch.no_grad():
        ref = model(token_batch).logits
    save_quantized(model, tmp_path / "qp")
    fresh = load_quantized(tiny_llama(seed=4), tmp_path / "qp")
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.base.weight_packed,
                       model.model.layers[0].mlp.up_proj.base.weight_packed)
    with torch.no_grad():
        assert torch.equal(fresh(token_batch).logits, ref)


# ---------------------------------------------------------------------------------------------------------------
# real pretrained weights (all-MiniLM-L6-v2)
# ---------------------------------------------------------------------------------------------------------------
def minilm_folder() -> str:
    """The real pretrained MiniLM (fetched and cached by lorakit.assets; these tests are marked slow)."""
    from lorakit.assets import minilm_path

    return minilm_path()


@pytest.mark.slow
def test_minilm_loftq_and_qpissa_error_below_qlora_per_layer():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_folder())
    r, alpha = 16, 32  # s = 2: the scaling must be honoured for the comparison to hold
    s = alpha / r
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight.detach().float()
        base = qlora_error(w)
        q, a, b = loftq_decompose(w, r, s, iters=1)
        loftq1 = (w - dequantize_nf4(q) - s * b @ a).norm()
        q, a, b = loftq_decompose(w, r, s, iters=5)
        loftq5 = (w - dequantize_nf4(q) - s * b @ a).norm()
        q, a, b = loftq_decompose(w, r, s, iters=5, svd_first=True)
        qpissa = (w - dequantize_nf4(q) - s * b @ a).norm()
        rows.append((name, float(base), float(loftq1), float(loftq5), float(qpissa)))
        assert loftq1 < base and loftq5 < base and qpissa < base, name
    assert len(rows) == 37  # 6 layers x 6 linears + pooler
    mean = [sum(1 - row[i] / row[1] for row in rows) / len(rows) for i in (2, 3, 4)]
    print(f"\nMiniLM r={r}: mean error reduction vs QLoRA: LoftQ(1) {mean[0]:.1%}, LoftQ(5) {mean[1]:.1%}, "
          f"QPiSSA(5) {mean[2]:.1%}")
    for row in rows[:7]:
        print(f"  {row[0]:<40} QLoRA {row[1]:.4f}  LoftQ1 {row[2]:.4f}  LoftQ5 {row[3]:.4f}  QPiSSA5 {row[4]:.4f}")
    assert mean[0] > 0.02


def _sentences():
    texts = ["a wonderful, moving film", "dull and far too long", "the best performance this year",
             "i want my two hours back", "charming from start to finish", "a mess of a plot",
             "beautifully shot and acted", "boring, predictable and flat"]
    return texts, torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_minilm_quantised_adapter_trains_saves_reloads_merges(method, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.methods import get_method

    get_method(method)  # every method ships in this build: a failing import must fail the test
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    texts, labels = _sentences()
    batch = dict(tok(texts, padding=True, return_tensors="pt"))

    def fresh():
        torch.manual_seed(0)  # same classifier init for the skeleton
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)

    model = quantize(fresh(), compute_dtype=torch.float32, skip=("classifier",))
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 37
    lorakit.attach(model, lorakit.AdapterConfig(method=method, r=8, alpha=16, modules_to_save=["classifier"],
                                                seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.7, losses
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    save_quantized(model, tmp_path / "m")
    loaded = load_quantized(fresh(), tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, ref, atol=1e-6)
        lorakit.merge(loaded)
        assert torch.allclose(loaded(**batch).logits, ref, atol=1e-4)
    plain = lorakit.unload(loaded)
    assert not any(isinstance(m, (Linear4bit, AdaptedLayer)) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ref, atol=1e-4)
