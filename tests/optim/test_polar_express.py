"""Polar Express against the exact polar factor U Vᵀ computed by a float64 SVD."""

import pytest
import torch

from chatlm.optim import POLAR_EXPRESS_COEFFS, polar_express, row_equalize


def _matrix(rows, cols, smallest_sv=0.05, seed=0):
    """A float64 matrix with known SVD: singular values spread over [smallest_sv, 1]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, dtype=torch.float64, generator=gen))
    s = torch.linspace(smallest_sv, 1.0, k, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, u, v


def test_coefficients_are_the_five_published_triples():
    assert len(POLAR_EXPRESS_COEFFS) == 5
    assert POLAR_EXPRESS_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert POLAR_EXPRESS_COEFFS[-1] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)
    assert len(set(POLAR_EXPRESS_COEFFS)) == 5  # five distinct triples, not one repeated


@pytest.mark.parametrize("shape", [(32, 16), (16, 32), (24, 24)])
@pytest.mark.parametrize("smallest_sv", [0.3, 0.01])
def test_polar_express_approximates_polar_factor(shape, smallest_sv):
    x, u, v = _matrix(*shape, smallest_sv=smallest_sv)
    y = polar_express(x[None] * 7.0)[0]  # input scale must not matter
    # singular values pushed into a band around 1 (an approximation, not exact orthogonality)
    sv = torch.linalg.svdvals(y)
    assert sv.min() > 0.7 and sv.max() < 1.2, sv
    # direction: an odd matrix polynomial keeps the singular vectors, so Uᵀ Y V is diagonal
    core = u.T @ y @ v
    off_diag = core - torch.diag(torch.diagonal(core))
    assert off_diag.abs().max() < 1e-8
    polar = u @ v.T
    cosine = (y * polar).sum() / (y.norm() * polar.norm())
    assert cosine > 0.99


def test_tall_and_wide_forms_agree():
    x, _, _ = _matrix(20, 8)
    tall = polar_express(x[None])[0]
    wide = polar_express(x.T[None])[0]
    torch.testing.assert_close(tall, wide.T, rtol=1e-10, atol=1e-10)


def test_stack_is_processed_matrix_by_matrix():
    xs = torch.stack([_matrix(12, 6, seed=s)[0] * (s + 1) for s in range(3)])
    stacked = polar_express(xs)
    for i in range(3):
        torch.testing.assert_close(stacked[i], polar_express(xs[i : i + 1])[0])


def test_bfloat16_stays_in_band():
    x, _, _ = _matrix(64, 32, smallest_sv=0.1)
    y = polar_express(x.to(torch.bfloat16)[None])[0]
    assert y.dtype == torch.bfloat16
    sv = torch.linalg.svdvals(y.double())
    assert sv.min() > 0.6 and sv.max() < 1.3


def test_row_equalize_gives_equal_rows_and_keeps_norm():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, generator=gen) * torch.arange(1.0, 6.0).view(1, 5, 1)
    y = row_equalize(x)
    rows = y.norm(dim=-1)
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows))
    torch.testing.assert_close(y.norm(dim=(-2, -1)), x.norm(dim=(-2, -1)))
