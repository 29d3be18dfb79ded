"""Task-vector mixing (TIES, DARE, magnitude prune, task arithmetic) against plain reference formulas and PEFT.

The task vector of an adapter is measured here from the outside: the layer's output on the identity matrix with only
that adapter active, minus the original layer's, is its exact change ΔW to the original weight. The rules are then
written out entry by entry (``ref_*``) and our mixed adapter's measured change must equal them.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import AdapterConfig
from lorakit.mixing import dare_generator, dare_keep_mask
from lorakit.model import adapted_layers

ATOL = 1e-5
LAYERS = (0, 2)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def randomise(model, name, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            for p in layer.adapters[name].parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def originals(net):
    return {i: (net[i].weight.detach().clone(), net[i].bias.detach().clone()) for i in LAYERS}


def measured_change(net, i, name, orig):
    """ΔW of adapter ``name`` on layer ``i``, read from the layer's outputs (only ``name`` active)."""
    w0, b0 = orig[i]
    lorakit.set_active(net, name)
    eye = torch.eye(w0.shape[1])
    with torch.no_grad():
        return (net[i](eye) - F.linear(eye, w0, b0)).T


# ---------------------------------------------------------------------------------------------------- references
def ref_trim(t, density):
    """Keep the round(density·n) entries with the largest |value| (sorted list, entry by entry)."""
    flat = t.flatten().tolist()
    k = round(density * len(flat))
    order = sorted(range(len(flat)), key=lambda j: -abs(flat[j]))
    kept = set(order[:k])
    return torch.tensor([v if j in kept else 0.0 for j, v in enumerate(flat)]).reshape(t.shape)


def ref_disjoint(taus, majority_sign):
    """TIES's elect + disjoint mean, one entry at a time."""
    out = torch.zeros_like(taus[0]).flatten()
    flats = [t.flatten().tolist() for t in taus]
    for j in range(out.numel()):
        vals = [f[j] for f in flats]
        score = sum(vals) if majority_sign == "total" else sum(math.copysign(1, v) for v in vals if v != 0)
        sign = 1.0 if score >= 0 else -1.0
        agree = [v for v in vals if v != 0 and math.copysign(1, v) == sign]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return out.reshape(taus[0].shape)


def reference(how, deltas, weights, density=None, majority_sign="total", masks=None):
    taus = [w * d for d, w in zip(deltas, weights)]
    if how == "task_arithmetic":
        return sum(taus)
    if how == "magnitude_prune":
        return sum(ref_trim(t, density) for t in taus)
    if how == "ties":
        return ref_disjoint([ref_trim(t, density) for t in taus], majority_sign)
    dropped = [w * torch.where(m, d / density, torch.zeros_like(d)) for d, w, m in zip(deltas, weights, masks)]
    if how == "dare_linear":
        return sum(dropped)
    assert how == "dare_ties"
    return ref_disjoint(dropped, majority_sign)


def ref_masks(seed, names, path, shape, density):
    return [dare_keep_mask(shape, density, dare_generator(seed, n, path)) for n in names]


# ------------------------------------------------------------------------------------------------ family members
def _member_net(kind):
    net = mlp()
    orig = originals(net)
    t = ["0", "2"]
    if kind == "lora":
        cfgs = {"a": AdapterConfig(r=2, alpha=4, targets=t), "b": AdapterConfig(r=3, alpha=3, targets=t)}
    elif kind == "rslora+alpha_pattern":
        cfgs = {"a": AdapterConfig(r=4, alpha=8, scaling="rslora", targets=t),
                "b": AdapterConfig(r=2, alpha=2, alpha_pattern={"2": 7.0}, rank_pattern={"2": 3}, targets=t)}
    elif kind == "dora":
        cfgs = {"a": AdapterConfig(method="dora", r=2, targets=t), "b": AdapterConfig(method="dora", r=3, targets=t)}
    elif kind == "vera":
        cfgs = {"a": AdapterConfig(method="vera", r=4, targets=t, seed=1),
                "b": AdapterConfig(method="vera", r=6, targets=t, seed=2)}
    else:  # three methods and ranks together
        cfgs = {"a": AdapterConfig(r=2, targets=t), "b": AdapterConfig(method="dora", r=3, targets=t),
                "c": AdapterConfig(method="vera", r=5, targets=t, seed=3)}
    for k, (n, cfg) in enumerate(cfgs.items()):
        lorakit.attach(net, cfg, name=n)
        randomise(net, n, seed=10 + k, scale=0.3)
    return net, orig, list(cfgs)


RULES = [("task_arithmetic", {}), ("magnitude_prune", {"density": 0.4}),
         ("ties", {"density": 0.5}), ("ties", {"density": 0.7, "majority_sign": "frequency"}),
         ("dare_linear", {"density": 0.6, "seed": 7}), ("dare_ties", {"density": 0.5, "seed": 3})]


@pytest.mark.parametrize("kind", ["lora", "rslora+alpha_pattern", "dora", "vera", "mixed"])
@pytest.mark.parametrize("how,opts", RULES, ids=[f"{h}-{o.get('density', 1)}" for h, o in RULES])
def test_mix_equals_the_reference_formula_on_the_measured_task_vectors(kind, how, opts):
    net, orig, names = _member_net(kind)
    weights = dict(zip(names, [0.8, -0.5, 0.6][:len(names)]))
    changes = {i: [measured_change(net, i, n, orig) for n in names] for i in LAYERS}
    lorakit.combine(net, weights, name="mix", how=how, **opts)
    report = lorakit.mix_report(net, "mix")
    assert report.exact and report.max_rel_error < 1e-5
    for i in LAYERS:
        masks = None
        if how.startswith("dare"):
            masks = ref_masks(opts["seed"], names, str(i), changes[i][0].shape, opts["density"])
        ref = reference(how, changes[i], list(weights.values()), opts.get("density"),
                        opts.get("majority_sign", "total"), masks)
        got = measured_change(net, i, "mix", orig)
        assert ref.abs().max() > 1e-2  # the mix is not trivially zero
        assert torch.allclose(got, ref, atol=ATOL), (i, (got - ref).abs().max())
        assert report.layers[str(i)].rank == torch.linalg.matrix_rank(ref).item()


def test_pruning_acts_on_the_weight_change_not_on_the_factors():
    """TIES at density 0.5 leaves exactly half of each task's ΔW entries (a factor-wise prune would not)."""
    net, orig, names = _member_net("lora")
    lorakit.combine(net, {"a": 1.0}, name="mix", how="magnitude_prune", density=0.5)
    got = measured_change(net, 0, "mix", orig)
    assert int((got.abs() > 1e-6).sum()) == got.numel() // 2


def test_pissa_and_delta_lora_mix_their_whole_change_to_the_original_base():
    """A shifted base is part of the task vector: the mix of one adapter with weight 1 is that adapter's function."""
    net = mlp()
    orig = originals(net)
    lorakit.attach(net, AdapterConfig(r=3, alpha=6, init="pissa", targets=["0", "2"]), name="p")
    lorakit.attach(net, AdapterConfig(method="delta_lora", r=2, delta_start=0, seed=0, targets=["0", "2"]), name="d")
    randomise(net, "d", seed=4, scale=0.3)
    for _, layer in adapted_layers(net):  # one Delta-LoRA update: the base moves by λ·s·B A
        layer.adapters["d"].after_step(layer, 1)
    assert net[0].adapters["d"].base_shift().abs().max() > 1e-3
    with torch.no_grad():
        for i in LAYERS:  # PiSSA trained a little: its change to W0 is no longer zero
            b = net[i].adapters["p"].B
            b.add_(0.2 * torch.randn(b.shape, generator=torch.Generator().manual_seed(i)))
    changes = {i: [measured_change(net, i, n, orig) for n in ("p", "d")] for i in LAYERS}
    assert min(c.abs().max() for i in LAYERS for c in changes[i]) > 1e-2
    lorakit.combine(net, {"p": 1.0}, name="p_only", how="task_arithmetic")
    lorakit.combine(net, {"p": 0.5, "d": 0.5}, name="ties", how="ties", density=0.6)
    for i in LAYERS:
        assert torch.allclose(measured_change(net, i, "p_only", orig), changes[i][0], atol=ATOL)
        ref = reference("ties", changes[i], [0.5, 0.5], 0.6)
        assert torch.allclose(measured_change(net, i, "ties", orig), ref, atol=ATOL)


def test_rank_and_energy_give_the_best_approximation_and_report_its_error():
    net, orig, names = _member_net("lora")
    changes = [measured_change(net, 0, n, orig) for n in names]
    ref = reference("ties", changes, [1.0, 1.0], 0.5)
    with pytest.warns(UserWarning, match="approximates the mix"):
        lorakit.combine(net, {"a": 1.0, "b": 1.0}, name="r2", how="ties", density=0.5, rank=2)
    u, s, vh = torch.linalg.svd(ref)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    got = measured_change(net, 0, "r2", orig)
    assert torch.allclose(got, best, atol=1e-4)
    fit = lorakit.mix_report(net, "r2").layers["0"]
    assert fit.rank == 2 and not fit.exact
    assert fit.rel_error == pytest.approx(float((ref - got).norm() / ref.norm()), rel=1e-3)
    with pytest.warns(UserWarning):
        lorakit.combine(net, {"a": 1.0, "b": 1.0}, name="e", how="ties", density=0.5, energy=0.9)
    fit = lorakit.mix_report(net, "e").layers["0"]
    kept = (s[:fit.rank] ** 2).sum() / (s ** 2).sum()
    assert kept >= 0.9 - 1e-6 and (s[:fit.rank - 1] ** 2).sum() / (s ** 2).sum() < 0.9


def test_dare_same_seed_same_mix_other_seed_other_mix_and_a_drawn_seed_is_recorded():
    net, orig, _ = _member_net("lora")
    w = {"a": 0.5, "b": 0.5}
    lorakit.combine(net, w, name="s1", how="dare_ties", density=0.5, seed=11)
    lorakit.combine(net, w, name="s1b", how="dare_ties", density=0.5, seed=11)
    lorakit.combine(net, w, name="s2", how="dare_ties", density=0.5, seed=12)
    lorakit.combine(net, w, name="free", how="dare_linear", density=0.5)
    seed = lorakit.mix_report(net, "free").seed
    assert isinstance(seed, int)
    lorakit.combine(net, w, name="again", how="dare_linear", density=0.5, seed=seed)
    for i in LAYERS:
        one = measured_change(net, i, "s1", orig)
        assert torch.equal(one, measured_change(net, i, "s1b", orig))
        assert not torch.allclose(one, measured_change(net, i, "s2", orig), atol=1e-3)
        assert torch.allclose(measured_change(net, i, "free", orig), measured_change(net, i, "again", orig),
                              atol=1e-6)
    # the mask depends on the name and the layer, not on the order of the weights
    lorakit.combine(net, {"b": 0.5, "a": 0.5}, name="swapped", how="dare_ties", density=0.5, seed=11)
    assert torch.allclose(measured_change(net, 0, "swapped", orig), measured_change(net, 0, "s1", orig), atol=1e-6)


def test_mixed_adapter_saves_and_loads(tmp_path):
    net, orig, _ = _member_net("mixed")
    lorakit.combine(net, {"a": 1.0, "b": 0.5, "c": 0.5}, name="mix", how="ties", density=0.5)
    want = measured_change(net, 2, "mix", orig)
    lorakit.save(net, tmp_path / "mix", names=["mix"])
    fresh = mlp()
    lorakit.load(fresh, tmp_path / "mix")
    assert torch.allclose(measured_change(fresh, 2, "mix", orig), want, atol=ATOL)


# ---------------------------------------------------------------------------------------------------- bad input
def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights={"zz": 1.0}, how="ties", density=0.5), "unknown adapter"),
    (dict(weights={"a": 1.0}, how="ties", density=0.0), r"density=0\.0.*0 < density <= 1"),
    (dict(weights={"a": 1.0}, how="ties", density=1.5), "0 < density <= 1"),
    (dict(weights={"a": 1.0}, how="dare_linear", density=float("nan"), seed=1), "0 < density <= 1"),
    (dict(weights={"a": 1.0}, how="ties"), "needs density"),
    (dict(weights={"a": 1.0}, how="task_arithmetic", density=0.5), "only applies"),
    (dict(weights={"a": 1.0}, how="task_arithmetic", rank=0), "rank=0 is invalid"),
    (dict(weights={"a": 1.0}, how="ties", density=0.5, energy=1.5), "energy=1.5 is invalid"),
    (dict(weights={"a": 1.0}, how="ties", density=0.5, seed=3), r"seed=\.\.\.\) only applies"),
    (dict(weights={"a": 1.0}, how="ties", density=0.5, majority_sign="most"), "majority_sign='most'"),
    (dict(weights={"a": 1.0}, how="ties", density=0.5, name="b"), "taken"),
    (dict(weights={"a": 1.0, "c": 1.0}, how="ties", density=0.5), r"same layers: 'c' does not adapt 0"),
])
def test_bad_input_is_one_clear_error_and_the_model_is_unchanged(kwargs, match):
    net, _, _ = _member_net("lora")
    lorakit.attach(net, AdapterConfig(r=2, targets=["2"]), name="c")
    before, names = _state(net), lorakit.adapter_names(net)
    with pytest.raises(ValueError, match=match):
        lorakit.combine(net, kwargs.pop("weights"), **{"name": "mix", **kwargs})
    assert lorakit.adapter_names(net) == names
    after = _state(net)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_merged_sources_are_refused():
    net, _, _ = _member_net("lora")
    lorakit.merge(net, ["a"])
    with pytest.raises(ValueError, match="merged into"):
        lorakit.combine(net, {"a": 1.0, "b": 1.0}, how="ties", density=0.5)
    assert "mix" not in lorakit.adapter_names(net)


def test_old_rules_refuse_the_new_options():
    net, _, _ = _member_net("lora")
    with pytest.raises(ValueError, match="takes no density"):
        lorakit.combine(net, {"a": 1.0}, how="cat", density=0.5)
    with pytest.raises(ValueError, match="no mix report"):
        lorakit.mix_report(net, "a")


# --------------------------------------------------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")


def _peft_and_ours(weights_alpha):
    """The same two LoRA adapters in PEFT and in lorakit on an 8x8 MLP (full rank 8, so PEFT's SVD is exact)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=weights_alpha["a"][0], lora_alpha=weights_alpha["a"][1],
                                                         target_modules=["0", "2"]), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=weights_alpha["b"][0], lora_alpha=weights_alpha["b"][1],
                                   target_modules=["0", "2"]))
    ours = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    for n, (r, alpha) in weights_alpha.items():
        lorakit.attach(ours, AdapterConfig(r=r, alpha=alpha, targets=["0", "2"]), name=n)
        for i in LAYERS:
            peft_layer = pm.base_model.model[i]
            with torch.no_grad():
                peft_layer.lora_B[n].weight.copy_(torch.randn(peft_layer.lora_B[n].weight.shape, generator=g))
                ours[i].adapters[n].A.copy_(peft_layer.lora_A[n].weight)
                ours[i].adapters[n].B.copy_(peft_layer.lora_B[n].weight)
    return pm, ours


@pytest.mark.parametrize("how,opts", [("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.25}),
                                      ("ties", {"density": 0.75, "majority_sign": "frequency"}),
                                      ("dare_linear", {"density": 0.5, "seed": 2}),
                                      ("dare_ties", {"density": 0.5, "seed": 9})])
def test_equal_to_peft_svd_variants_on_identical_weights(how, opts, monkeypatch):
    """PEFT's ``*_svd`` rules work on the dense change too; with equal weights its definition is ours."""
    pm, ours = _peft_and_ours({"a": (2, 4), "b": (3, 9)})  # different ranks and scalings
    weights = [0.6, 0.6]
    if how.startswith("dare"):  # PEFT draws masks with torch.bernoulli: hand it the masks our seed gives
        queue = [m.float() for i in LAYERS for m in ref_masks(opts["seed"], ["a", "b"], str(i), (8, 8),
                                                               opts["density"])]
        monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: queue.pop(0))
    pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=how + "_svd", svd_rank=8,
                            density=opts["density"], majority_sign_method=opts.get("majority_sign", "total"))
    monkeypatch.undo()
    lorakit.combine(ours, {"a": 0.6, "b": 0.6}, name="m", how=how, **opts)
    for i in LAYERS:
        ref = pm.base_model.model[i].get_delta_weight("m")
        got = ours[i].adapters["m"].delta_weight(ours[i])
        assert ref.abs().max() > 1e-2
        assert torch.allclose(got, ref, atol=1e-4), (how, i, (got - ref).abs().max())


def test_peft_ties_elects_signs_before_weighting_ours_after():
    """Where the definitions part: unequal weights. Ours follows the task vectors τ = w·ΔW (the reference)."""
    pm, ours = _peft_and_ours({"a": (2, 2), "b": (2, 2)})
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.1], "m", combination_type="ties_svd", svd_rank=8, density=1.0)
    lorakit.combine(ours, {"a": 1.0, "b": 0.1}, name="m", how="ties", density=1.0)
    changes = [ours[0].adapters[n].delta_weight(ours[0]) for n in "ab"]
    got = ours[0].adapters["m"].delta_weight(ours[0])
    assert torch.allclose(got, reference("ties", changes, [1.0, 0.1], 1.0), atol=1e-5)
    assert not torch.allclose(got, pm.base_model.model[0].get_delta_weight("m"), atol=1e-3)
