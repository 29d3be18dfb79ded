"""LoRA's fused Linear path (one autograd node for base + branch) equals the plain formula, values and gradients,
and steps aside wherever it does not apply."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterConfig


def _adapted(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 6, bias=bias))
    w, b0 = net[0].weight.detach().clone(), (net[0].bias.detach().clone() if bias else None)
    lorakit.attach(net, AdapterConfig(r=4, alpha=8, targets=["0"]))
    ad = net[0].adapters["default"]
    with torch.no_grad():
        ad.B.normal_()  # B = 0 at init would hide mistakes in the branch
    return net, ad, w, b0


def _reference(x, w, b0, a, b, s=2.0):
    y = x @ w.t() + s * (x @ a.t()) @ b.t()  # y = x Wᵀ + bias + s·(x Aᵀ)Bᵀ
    return y + b0 if b0 is not None else y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8), (8,)])
def test_fused_values_and_gradients_equal_formula(bias, shape):
    net, ad, w, b0 = _adapted(bias)
    assert net[0]._fast  # the fused path is the one being tested
    x = torch.randn(*shape, requires_grad=True)
    y = net(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, ad.A, ad.B))
    yr = _reference(xr, w, b0, ar, br)
    yr.backward(g)
    assert torch.allclose(y, yr, atol=1e-5)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(ad.A.grad, ar.grad, atol=1e-5)
    assert torch.allclose(ad.B.grad, br.grad, atol=1e-5)
    with torch.no_grad():  # the inference branch of the fused path
        assert torch.allclose(net(x), yr, atol=1e-5)


def test_frozen_A_gets_no_gradient_and_keeps_no_input():
    net, ad, w, b0 = _adapted(False)
    ad.A.requires_grad_(False)
    x = torch.randn(4, 8)  # input needs no gradient either: only B trains
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = net(x)
    assert not any(t.data_ptr() == x.data_ptr() for t in seen)  # the layer input is not kept alive
    y.sum().backward()
    br = ad.B.detach().clone().requires_grad_()
    _reference(x, w, b0, ad.A.detach(), br).sum().backward()
    assert ad.A.grad is None and torch.allclose(ad.B.grad, br.grad, atol=1e-5)


def test_generic_path_where_fused_does_not_apply():
    net, ad, w, b0 = _adapted(True)
    calls = []
    net[0].base.register_forward_hook(lambda m, i, o: calls.append(1))  # hooks on the base must still run
    x = torch.randn(3, 8)
    assert torch.allclose(net(x), _reference(x, w, b0, ad.A.detach(), ad.B.detach()), atol=1e-5)
    assert calls == [1]
    net2, ad2, w2, b2 = _adapted(True, seed=1)
    net2[0].base.weight.requires_grad_(True)  # a trainable base weight needs its own gradient: generic path
    x = torch.randn(3, 8)
    net2(x).sum().backward()
    assert net2[0].base.weight.grad is not None
    with lorakit.disabled(net2):  # disabled adapters: base output only
        assert torch.allclose(net2(x), x @ w2.t() + b2, atol=1e-6)


@pytest.mark.parametrize("method", ["adalora", "sora", "lora_drop"])
def test_gated_methods_fused_path_equals_their_formula(method):
    """AdaLoRA (s·B diag(λ) A), SoRA (s·B diag(g) A) and LoRA-drop (s·B A) ride LoRA's fused node."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6))
    w, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    extra = {"total_steps": 10, "target_r": 2} if method == "adalora" else {}
    lorakit.attach(net, AdapterConfig(method=method, r=4, alpha=8, targets=["0"], **extra))
    ad = net[0].adapters["default"]
    A, B = ad.factors() if method == "lora_drop" else (ad.A, ad.B)
    mid = {"adalora": lambda: ad.E.view(-1), "sora": lambda: ad.gate}.get(method, lambda: None)()
    with torch.no_grad():
        B.normal_()
        if mid is not None:
            mid.copy_(torch.randn(4))  # λ starts at 0 and g at 1: random values test the diagonal
    assert net[0]._fast and net[0]._fast[0].fused_forward(net[0], torch.randn(2, 8)) is not None
    x = torch.randn(3, 8, requires_grad=True)
    y = net(x)
    g = torch.randn_like(y)
    y.backward(g)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B) + ((mid,) if mid is not None else ())]
    xr, ar, br = leaves[:3]
    z = xr @ ar.t()
    if mid is not None:
        z = z * leaves[3]
    yr = xr @ w.t() + b0 + ad.scaling * z @ br.t()
    yr.backward(g)
    assert torch.allclose(y, yr, atol=1e-5) and torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(A.grad, ar.grad, atol=1e-5) and torch.allclose(B.grad, br.grad, atol=1e-5)
    if mid is not None:
        mid_grad = ad.E.grad.view(-1) if method == "adalora" else ad.gate.grad
        assert torch.allclose(mid_grad, leaves[3].grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(net(x), yr, atol=1e-5)
