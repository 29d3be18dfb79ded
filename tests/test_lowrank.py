"""lorakit.lowrank.factorize against the definition: truncated SVD, Eckart–Young error, energy rule."""
import math

import pytest
import torch

from lorakit.lowrank import factorize


def test_exact_when_the_change_has_low_rank():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, 3, generator=g) @ torch.randn(3, 9, generator=g)
    f = factorize(d)
    assert (f.rank, f.exact_rank, f.exact) == (3, 3, True)
    torch.testing.assert_close(f.B @ f.A, d, atol=1e-5, rtol=0)
    assert f.rel_error < 1e-6 and f.A.shape == (3, 9) and f.B.shape == (12, 3)
    assert factorize(d, rank=8).rank == 3  # never more than the change has


def test_rank_k_is_the_truncated_svd_and_its_error_is_the_tail():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(10, 8, generator=g)
    f = factorize(d, rank=3)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    reference = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]  # Eckart–Young: the best rank-3 approximation
    torch.testing.assert_close(f.B @ f.A, reference, atol=1e-5, rtol=0)
    measured = float(torch.linalg.norm(d - f.B @ f.A) / torch.linalg.norm(d))
    assert math.isclose(f.rel_error, measured, rel_tol=1e-4)
    assert math.isclose(f.rel_error, float((s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel_tol=1e-4)
    assert not f.exact


def test_energy_picks_the_smallest_rank_keeping_the_fraction():
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1, 0.05, 0.01, 0.001])
    d = u @ torch.diag(s) @ u.T
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    for e in (0.5, 0.9, 0.99, 0.9999, 1.0):
        expect = int((share < e - 1e-12).sum()) + 1
        assert factorize(d, energy=e).rank == expect, e
        assert factorize(d, energy=e).energy >= e - 1e-6


def test_a_zero_change_is_rank_one_zero():
    f = factorize(torch.zeros(4, 5))
    assert f.rank == 1 and f.exact_rank == 0 and f.rel_error == 0.0 and float((f.B @ f.A).abs().max()) == 0.0


@pytest.mark.parametrize("kw, words", [({"rank": 0}, "rank=0"), ({"rank": 2.5}, "rank=2.5"),
                                       ({"energy": 0}, "energy=0"), ({"energy": 1.5}, "energy=1.5"),
                                       ({"rank": 2, "energy": 0.9}, "not both")])
def test_bad_rank_or_energy_is_named(kw, words):
    with pytest.raises(ValueError, match=words):
        factorize(torch.ones(3, 3), **kw)
