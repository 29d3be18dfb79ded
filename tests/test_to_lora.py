"""lorakit.to_lora: every family member as a plain LoRA whose B·A is the member's exact weight change.

Each member trains a few steps on a tiny Llama; the new plain LoRA must give the member's outputs on the ORIGINAL
base (tol 1e-5), a rank-k conversion must equal the truncated SVD of the change (written below), and energy must pick
the smallest rank keeping that fraction of the squared singular values.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit
from lorakit import AdapterConfig
from lorakit.convert import member_delta, uniform_lora_factors
from lorakit.registry import adapted_layers

from conftest import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
MEMBERS = {
    "lora": dict(method="lora", r=2),
    "rslora": dict(method="lora", r=2, scaling="rslora", alpha=4),
    "pissa": dict(method="lora", r=2, init="pissa"),
    "dora": dict(method="dora", r=2),
    "vera": dict(method="vera", r=8),
    "lora_fa": dict(method="lora_fa", r=2),
    "adalora": dict(method="adalora", r=4, target_r=2, total_steps=6, t_init=1, t_final=1, delta_t=1),
    "sora": dict(method="sora", r=4, sora_xi=0.5),
    "lora_drop": dict(method="lora_drop", r=2, drop_selected=["model.layers.0.self_attn.q_proj"]),
    "delta_lora": dict(method="delta_lora", r=2, delta_start=1),
    "loftq": dict(method="lora", r=2, init="loftq"),
}
DATA = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(0))


def trained(member: str, steps: int = 5):
    """(model with the member trained a few steps, a copy of the original base model)."""
    model = tiny_llama(hidden=32)
    original = copy.deepcopy(model)
    lorakit.attach(model, AdapterConfig(targets=TARGETS, seed=0, **MEMBERS[member]))
    opt = lorakit.make_optimizer("adamw", model, lr=2e-2)
    hooks = lorakit.training_hooks(model)
    model.train()
    for step in range(steps):
        batch = DATA[(step % 2) * 2:(step % 2) * 2 + 2]
        loss = model(input_ids=batch, labels=batch).loss + lorakit.regularization_loss(model)
        loss.backward()
        opt.step()
        hooks.after_step()
        opt.zero_grad()
    if member == "sora":  # a sparse gate, as SoRA's soft-threshold leaves it after longer training
        for _, layer in adapted_layers(model):
            with torch.no_grad():
                layer.adapters["default"].gate[:2] = 0
    hooks.finish()
    return model.eval(), original


def logits(model, names=None):
    if names is not None:
        lorakit.set_active(model, names)
    with torch.no_grad():
        return model(input_ids=DATA).logits


@pytest.mark.parametrize("member", list(MEMBERS))
def test_exact_conversion_gives_the_members_outputs_on_the_original_base(member):
    model, original = trained(member)
    want = logits(model, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact conversion never warns
        report = lorakit.to_lora(model)
    assert report.exact and report.max_rel_error < 1e-5
    got = logits(model, "default_lora")
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # the new adapter's B·A is the member's change on the original base (delta plus its base shift)
    for path, layer in adapted_layers(model):
        member, plain = layer.adapters["default"], layer.adapters["default_lora"]
        expected = member.delta_weight(layer).float()
        if member.base_shift() is not None:
            expected = expected + member.base_shift()
        assert torch.allclose(plain.delta_weight(layer), expected, atol=1e-5), path
    if member in ("pissa", "delta_lora"):  # the base really moved: the plain LoRA is for the original weights
        assert "ORIGINAL" in report.base
        moved = [p for p, layer in adapted_layers(model)
                 if not torch.equal(layer.base.weight, original.get_submodule(p).weight)]
        assert moved


@pytest.mark.parametrize("member", ["pissa", "delta_lora", "dora"])
def test_saved_plain_lora_on_a_fresh_original_base_gives_the_members_outputs(member, tmp_path):
    model, original = trained(member)
    want = logits(model, "default")
    lorakit.to_lora(model, new_name="plain")
    folder = lorakit.save(model, tmp_path / "plain", names="plain")
    lorakit.load(original, folder)
    got = logits(original)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_loftq_conversion_is_relative_to_its_nf4_base_and_records_it():
    model, _ = trained("loftq")
    report = lorakit.to_lora(model)
    assert "nf4" in report.base
    assert lorakit.model.registry(model).extra["default_lora"]["base"]["quant_type"] == "nf4"


def reference_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart–Young: the best rank-k approximation keeps the top k singular triplets."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("member", ["dora", "delta_lora", "vera"])
def test_rank_k_conversion_is_the_truncated_svd_and_warns(member):
    model, _ = trained(member)
    deltas = {p: member_delta(layer, layer.adapters["default"]) for p, layer in adapted_layers(model)}
    with pytest.warns(UserWarning, match=r"not exact.*largest relative error .* at layer "):
        report = lorakit.to_lora(model, new_name="k1", rank=1)
    for path, layer in adapted_layers(model):
        ref = reference_rank_k(deltas[path], 1)
        got = layer.adapters["k1"].delta_weight(layer).double()
        assert torch.allclose(got, ref, atol=1e-5), path
        rel = float((deltas[path].double() - ref).norm() / deltas[path].double().norm())
        assert report.ranks[path] == 1
        assert abs(next(x.rel_error for x in report.layers if x.path == path) - rel) < 1e-4
    assert not report.exact and report.max_rel_error > 0


def test_energy_picks_the_smallest_rank_keeping_that_energy():
    model, _ = trained("dora")
    deltas = {p: member_delta(layer, layer.adapters["default"]) for p, layer in adapted_layers(model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lorakit.to_lora(model, new_name="e", energy=0.9)
    for path, delta in deltas.items():
        s2 = torch.linalg.svdvals(delta.double()) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        smallest = int((kept < 0.9 - 1e-12).sum()) + 1
        assert report.ranks[path] == smallest, path
        assert float(kept[smallest - 1]) >= 0.9 - 1e-9


def test_uniform_pads_every_layer_to_one_rank_and_keeps_the_outputs():
    model, _ = trained("adalora")
    want = logits(model, "default")
    factors, alpha, r = uniform_lora_factors(model)
    assert alpha == float(r) and {tuple(a.shape)[0] for a, _ in factors.values()} == {r}
    for path, layer in adapted_layers(model):
        a, b = factors[path]
        assert torch.allclose(b @ a, member_delta(layer, layer.adapters["default"]), atol=1e-5)
    report = lorakit.to_lora(model, uniform=True)
    config = lorakit.model.registry(model).configs["default_lora"]
    assert report.uniform_rank == r and config.r == r and not config.rank_pattern and not config.alpha_pattern
    assert torch.allclose(logits(model, "default_lora"), want, atol=1e-5, rtol=0)


def test_bad_input_is_refused_before_any_change():
    model, _ = trained("lora", steps=1)
    names = lorakit.adapter_names(model)
    for kwargs, match in [(dict(name="nope"), "unknown adapter 'nope'"), (dict(new_name="default"), "is taken"),
                          (dict(rank=0), "rank=0 is invalid"), (dict(energy=1.5), "energy=1.5 is invalid"),
                          (dict(rank=2, energy=0.9), "not both"), (dict(new_name="a.b"), "invalid")]:
        with pytest.raises(ValueError, match=match):
            lorakit.to_lora(model, **kwargs)
        assert lorakit.adapter_names(model) == names
    lorakit.merge(model, "default")
    with pytest.raises(ValueError, match="unmerge"):
        lorakit.to_lora(model)
    assert lorakit.adapter_names(model) == names


def test_report_table_names_every_layer():
    model, _ = trained("dora", steps=1)
    text = str(lorakit.to_lora(model))
    for path, _ in adapted_layers(model):
        assert path in text
    assert "rel error" in text and "dora" in text


def test_the_thin_factor_path_is_the_dense_rule():
    from lorakit.lowrank import factorize, factorize_product

    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 6, generator=gen), torch.randn(6, 30, generator=gen)
    b[:, 5] = b[:, 4]  # a rank-5 product of rank-6 factors
    a[5] = a[4]
    for kwargs in ({}, {"rank": 3}, {"energy": 0.9}, {"rank": 10}):
        thin, dense = factorize_product(b, a, **kwargs), factorize(b @ a, **kwargs)
        assert (thin.rank, thin.exact_rank) == (dense.rank, dense.exact_rank), kwargs
        assert abs(thin.rel_error - dense.rel_error) < 1e-5 and abs(thin.energy - dense.energy) < 1e-5
        assert torch.allclose(thin.B @ thin.A, dense.B @ dense.A, atol=1e-4), kwargs


def test_embedding_and_conv_layers_convert_exactly():
    from conftest import ConvNet

    for method, targets in (("lora", ["emb", "conv", "fc"]), ("dora", ["conv", "fc"])):  # DoRA refuses embeddings
        net = ConvNet().eval()
        lorakit.attach(net, AdapterConfig(method=method, r=2, targets=targets, seed=0))
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        ids, img = torch.randint(0, 20, (3, 4)), torch.randn(3, 3, 5, 5)
        with torch.no_grad():
            want = net(img, ids)
            lorakit.to_lora(net)
            lorakit.set_active(net, "default_lora")
            assert torch.allclose(net(img, ids), want, atol=1e-5), method
