"""Property tests over shapes, ranks, dtypes and layer kinds: merge == unmerged, unmerge restores, route == single."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit import AdapterConfig

DTYPES = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 6e-2), "float64": (torch.float64, 1e-10)}


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".adapters." in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 24), n_out=st.integers(1, 24), r=st.integers(1, 6), batch=st.integers(1, 4),
    dtype=st.sampled_from(sorted(DTYPES)), rslora=st.booleans(), alpha=st.floats(0.5, 32), seed=st.integers(0, 99),
)
def test_linear_merge_matches_unmerged_and_unmerge_restores(n_in, n_out, r, batch, dtype, rslora, alpha, seed):
    dt, tol = DTYPES[dtype]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, n_out)).to(dt)
    w0 = net[0].weight.detach().clone()
    lorakit.attach(net, AdapterConfig(r=r, alpha=alpha, scaling="rslora" if rslora else "standard", seed=seed))
    _randomise(net, seed)
    x = torch.randn(batch, n_in).to(dt)
    ad = net[0].adapters["default"]
    # reference: x W^T + b + s (x A^T) B^T, computed in float64
    ref = (x.double() @ w0.double().T + net[0].base.bias.double()
           + ad.scaling * (x.double() @ ad.A.double().T) @ ad.B.double().T)
    y = net(x)
    assert torch.allclose(y.double(), ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
    lorakit.merge(net)
    assert torch.allclose(net(x).double(), ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
    lorakit.unmerge(net)
    if dt != torch.bfloat16:  # exact up to rounding in fp32/fp64; bf16 round-trips are documented as lossy
        assert torch.allclose(net[0].base.weight, w0, atol=tol * 10)


@settings(max_examples=15, deadline=None)
@given(
    c_in=st.integers(1, 4), c_out=st.integers(1, 5), k=st.sampled_from([1, 3]), r=st.integers(1, 4),
    stride=st.sampled_from([1, 2]), seed=st.integers(0, 99),
)
def test_conv2d_merge_matches_unmerged(c_in, c_out, k, r, stride, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2))
    lorakit.attach(net, AdapterConfig(r=r, targets=["0"], seed=seed))
    _randomise(net, seed)
    x = torch.randn(2, c_in, 6, 6)
    y = net(x)
    lorakit.merge(net)
    assert torch.allclose(net(x), y, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(num=st.integers(2, 30), dim=st.integers(1, 12), r=st.integers(1, 4), seed=st.integers(0, 99))
def test_embedding_merge_matches_unmerged(num, dim, r, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Embedding(num, dim))
    lorakit.attach(net, AdapterConfig(r=r, targets=["0"], seed=seed))
    _randomise(net, seed)
    tok = torch.randint(0, num, (3, 5))
    y = net(tok)
    lorakit.merge(net)
    assert torch.allclose(net(tok), y, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(names=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_route_equals_single_adapter_runs(names, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    for n, r in (("a", 1), ("b", 2), ("c", 3)):
        lorakit.attach(net, AdapterConfig(r=r, targets=["0", "2"] if n != "c" else ["2"]), name=n)
    _randomise(net, seed)
    x = torch.randn(len(names), 6)
    with lorakit.route(net, names):
        routed = net(x)
    for i, n in enumerate(names):
        if n is None:
            with lorakit.disabled(net):
                ref = net(x[i:i + 1])
        else:
            lorakit.set_active(net, n)
            ref = net(x[i:i + 1])
        assert torch.allclose(routed[i:i + 1], ref, atol=1e-5)
