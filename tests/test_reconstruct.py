import numpy as np
import pytest
import torch

from conftest import correlated_inputs
from sds.pruners import parse_pattern, prune
from sds.reconstruct import LinearStats, fista, masked_least_squares, reconstruction_error, relative_error


def _problem(rows=16, cols=32, tokens=1024, cross=False):
    g = torch.Generator().manual_seed(3)
    Wd = torch.randn(rows, cols, generator=g)
    X = correlated_inputs(tokens, cols, 1)
    Xt = X + 0.1 * torch.randn(tokens, cols, generator=g) if cross else X
    stats = LinearStats(X.T @ X / tokens, X.T @ Xt / tokens, Xt.T @ Xt / tokens)
    return Wd, X, Xt, stats


@pytest.mark.parametrize("cross", [False, True])
def test_error_formula_matches_direct_computation(cross):
    Wd, X, Xt, stats = _problem(cross=cross)
    W = torch.randn_like(Wd)
    direct = ((Xt @ Wd.T - X @ W.T) ** 2).sum() / X.shape[0]
    assert reconstruction_error(W, Wd, stats) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("cross", [False, True])
def test_masked_least_squares_is_the_per_row_optimum(cross):
    Wd, X, Xt, stats = _problem(cross=cross)
    mask = torch.rand(Wd.shape, generator=torch.Generator().manual_seed(5)) > 0.5
    W = masked_least_squares(Wd, stats, mask, percdamp=1e-9)
    assert ((W == 0) | mask).all()
    Y = (Xt @ Wd.T).double().numpy()
    Xn = X.double().numpy()
    for r in range(Wd.shape[0]):
        cols = mask[r].nonzero().flatten().numpy()
        sol, *_ = np.linalg.lstsq(Xn[:, cols], Y[:, r], rcond=None)
        np.testing.assert_allclose(W[r, cols].numpy(), sol, rtol=2e-3, atol=2e-3)


def test_fista_decreases_error_and_converges_to_exact_solution():
    Wd, _, _, stats = _problem(cross=True)
    mask = torch.rand(Wd.shape, generator=torch.Generator().manual_seed(6)) > 0.5
    start = Wd * mask
    exact = masked_least_squares(Wd, stats, mask, percdamp=1e-9)
    few = fista(start, Wd, stats, steps=20, mask=mask)
    many = fista(start, Wd, stats, steps=3000, mask=mask)
    e0, e_few, e_many, e_exact = (reconstruction_error(w, Wd, stats) for w in (start, few, many, exact))
    assert e0 > e_few > e_many
    assert e_many == pytest.approx(e_exact, rel=2e-2)
    assert ((many == 0) | mask).all()


def test_fista_without_regulariser_moves_towards_dense():
    Wd, _, _, stats = _problem()
    pruned, _ = prune("magnitude", Wd, parse_pattern("2:4"))
    out = fista(pruned, Wd, stats, steps=500)
    assert relative_error(out, Wd, stats) < 0.05 * relative_error(pruned, Wd, stats)


def test_l1_makes_weights_sparse_and_weighted_l1_targets_positions():
    Wd, _, _, stats = _problem()
    pruned, mask = prune("magnitude", Wd, parse_pattern("2:4"))
    plain = fista(pruned, Wd, stats, steps=200)
    sparse = fista(pruned, Wd, stats, steps=200, l1=0.5)
    assert (sparse == 0).float().mean() > (plain == 0).float().mean() + 0.1
    omega = torch.where(mask, torch.zeros_like(Wd), torch.full_like(Wd, 5.0))
    weighted = fista(pruned, Wd, stats, steps=200, l1=0.5, l1_weights=omega)
    # kept positions are not penalised, so they stay non-zero; removed ones are pushed back to zero
    assert (weighted[~mask] == 0).float().mean() > (weighted[mask] == 0).float().mean()
