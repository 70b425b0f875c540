import numpy as np
import pytest
import torch

from conftest import DENSE_ADMM, MASKED_ADMM, PRUNE, PRUNE2, RECON, correlated_inputs
from sds.core.patterns import parse_pattern
from sds.algorithms.dispatch import prune
from sds.algorithms.objective import LinearStats, reconstruction_error, relative_error
from sds.algorithms.fista import fista
from sds.algorithms.least_squares import masked_least_squares


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
    pruned, _ = prune("magnitude", Wd, parse_pattern("2:4"), PRUNE)
    out = fista(pruned, Wd, stats, steps=500)
    assert relative_error(out, Wd, stats) < 0.05 * relative_error(pruned, Wd, stats)


def test_l1_makes_weights_sparse_and_weighted_l1_targets_positions():
    Wd, _, _, stats = _problem()
    pruned, mask = prune("magnitude", Wd, parse_pattern("2:4"), PRUNE)
    plain = fista(pruned, Wd, stats, steps=200)
    sparse = fista(pruned, Wd, stats, steps=200, l1=0.5)
    assert (sparse == 0).float().mean() > (plain == 0).float().mean() + 0.1
    omega = torch.where(mask, torch.zeros_like(Wd), torch.full_like(Wd, 5.0))
    weighted = fista(pruned, Wd, stats, steps=200, l1=0.5, l1_weights=omega)
    # kept positions are not penalised, so they stay non-zero; removed ones are pushed back to zero
    assert (weighted[~mask] == 0).float().mean() > (weighted[mask] == 0).float().mean()


# --- ADMM solvers, the dense objective, dead inputs ------------------------------------------------------------

from sds.algorithms.admm import dense_admm, masked_admm  # noqa: E402
from sds.algorithms.dispatch import adjust, dense_reconstruction
from sds.algorithms.objective import dense_objective

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _real_like_problem(rows=24, cols=48, tokens=2048):
    """Inputs with scales spread over two decades (like LLM activations): ill-conditioned for FISTA."""
    g = torch.Generator().manual_seed(7)
    Wd = torch.randn(rows, cols, generator=g)
    X = correlated_inputs(tokens, cols, 2)
    stats = LinearStats(X.T @ X / tokens, X.T @ X / tokens, X.T @ X / tokens)
    return Wd, stats


def test_dense_objective_is_error_plus_scaled_penalties():
    Wd, stats = _real_like_problem()
    W = Wd * 0.5
    omega = torch.rand(Wd.shape, generator=torch.Generator().manual_seed(1))
    expected = (reconstruction_error(W, Wd, stats)
                + stats.scale * (0.1 * float((omega * W.abs()).sum()) + 0.2 * float((W * W).sum())))
    assert dense_objective(W, Wd, stats, l1=0.1, l2=0.2, l1_weights=omega) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("l1,l2", [(0.05, 0.0), (0.01, 0.01), (0.0, 0.05)])
def test_dense_admm_reaches_the_long_fista_objective_in_few_steps(l1, l2):
    Wd, stats = _real_like_problem()
    start, mask = prune("magnitude", Wd, parse_pattern("2:4"), PRUNE)
    omega = torch.where(mask, torch.ones_like(Wd), torch.full_like(Wd, 3.0))
    kw = dict(l1=l1, l2=l2, l1_weights=omega)
    long_run = dense_objective(fista(start, Wd, stats, steps=3000, **kw), Wd, stats, **kw)
    short_fista = dense_objective(fista(start, Wd, stats, steps=40, **kw), Wd, stats, **kw)
    admm = dense_objective(dense_admm(start, Wd, stats, iters=40, rho=RECON["rho"], **kw), Wd, stats, **kw)
    assert admm <= long_run * 1.005
    assert admm < short_fista  # the same number of matrix products
    if l1:  # the soft threshold leaves exact zeros, as FISTA's proximal step does
        assert (dense_admm(start, Wd, stats, iters=40, rho=RECON["rho"], **kw) == 0).any()


def test_masked_admm_converges_to_the_exact_masked_least_squares():
    Wd, _, _, stats = _problem(cross=True)
    mask = torch.rand(Wd.shape, generator=torch.Generator().manual_seed(6)) > 0.5
    exact = masked_least_squares(Wd, stats, mask, percdamp=0.01)
    admm = masked_admm(Wd, stats, mask, Wd * mask, iters=200, percdamp=0.01, ridge_to="zero")
    assert torch.equal(admm != 0, mask)
    assert reconstruction_error(admm, Wd, stats) == pytest.approx(reconstruction_error(exact, Wd, stats), rel=1e-3)
    torch.testing.assert_close(admm, exact, rtol=0, atol=1e-3 * float(exact.abs().max()))


def test_masked_admm_dense_ridge_solves_its_objective():
    """ridge_to='dense': per row, (H_SS + λ diag(H)_SS) w_S = B_S + λ diag(H)_SS w_d,S (λ = percdamp·mean
    diag of the scaled H = percdamp), solved directly."""
    Wd, _, _, stats = _problem()
    mask = torch.rand(Wd.shape, generator=torch.Generator().manual_seed(8)) > 0.4
    out = masked_admm(Wd, stats, mask, iters=400, percdamp=0.1, ridge_to="dense")
    H = stats.H.double()
    B = (Wd.double() @ stats.G.double().T)
    ridge = 0.1 * torch.diagonal(H)
    for r in range(Wd.shape[0]):
        S = mask[r].nonzero().flatten()
        A = H[S][:, S] + torch.diag(ridge[S])
        w = torch.linalg.solve(A, B[r, S] + ridge[S] * Wd[r, S].double())
        torch.testing.assert_close(out[r, S].double(), w, rtol=0, atol=2e-3 * float(w.abs().max()))


def test_admm_adjustment_is_close_to_exact_and_fits_held_out_inputs_better():
    """Fitting on 256 tokens, judging on 4096 others: the dense-ward ridge of the ADMM adjustment
    generalises better than the exact fit, at a near-equal calibration error."""
    g = torch.Generator().manual_seed(11)
    Wd = torch.randn(32, 64, generator=g)
    X = correlated_inputs(256 + 4096, 64, 5)
    fit, held = X[:256], X[256:]
    stats = LinearStats(fit.T @ fit / 256, fit.T @ fit / 256, fit.T @ fit / 256)
    held_stats = LinearStats(*(held.T @ held / 4096,) * 3)
    pruned, mask = prune("sparsegpt", Wd, parse_pattern("2:4"), PRUNE, hessian=stats.H)
    exact = adjust(Wd, stats, mask, pruned, PRUNE2 | {"adjust": "exact", "percdamp": 0.01})
    admm = adjust(Wd, stats, mask, pruned, PRUNE2 | {"adjust": "admm"})
    assert relative_error(admm, Wd, stats) < 1.1 * relative_error(exact, Wd, stats)
    assert relative_error(admm, Wd, held_stats) < relative_error(exact, Wd, held_stats)


def test_dispatchers_name_their_options():
    Wd, _, _, stats = _problem()
    _, mask = prune("magnitude", Wd, parse_pattern("2:4"), PRUNE)
    with pytest.raises(ValueError, match="'exact', 'fista', 'admm' or 'none'"):
        adjust(Wd, stats, mask, Wd * mask, PRUNE2 | {"adjust": "lbfgs"})
    with pytest.raises(ValueError, match="'admm' or 'fista'"):
        dense_reconstruction(Wd * mask, Wd, stats, RECON | {"solver": "sgd"})
    by_name = dense_reconstruction(Wd * mask, Wd, stats, RECON | {"solver": "fista", "steps": 30, "l1": 0.01, "l2": 0.0})
    assert torch.equal(by_name, fista(Wd * mask, Wd, stats, steps=30, l1=0.01))


def _dead_problem():
    Wd, _, _, stats = _problem(rows=16, cols=32)
    H = stats.H.clone()
    dead = [2, 11, 12, 13, 14, 15, 20]  # 12–15: a whole group of 4; 11–15: most of a block of 8
    H[dead, :] = 0
    H[:, dead] = 0
    return Wd, LinearStats(H, H, H), dead


@pytest.mark.parametrize("text", ["2:4", "unstructured:0.5"])
@pytest.mark.parametrize("solver", ["exact", "fista", "admm"])
def test_adjustment_keeps_exact_sparsity_with_dead_inputs(solver, text):
    """A kept weight on a dead input does not affect the fit; the exact solve alone would leave it 0."""
    Wd, stats, dead = _dead_problem()
    pat = parse_pattern(text)
    pruned, mask = prune("sparsegpt", Wd, pat, PRUNE | {"blocksize": 8}, hessian=stats.H)
    out = adjust(Wd, stats, mask, pruned, PRUNE2 | {"adjust": solver, "adjust_steps": 100, "percdamp": 0.01})
    assert torch.isfinite(out).all()
    assert torch.equal(out != 0, mask), "zeros exactly where the mask removes"
    kept_dead = mask[:, dead]
    assert kept_dead.any()
    assert torch.equal(out[:, dead][kept_dead], Wd[:, dead][kept_dead])
    assert relative_error(out, Wd, stats) <= relative_error(pruned, Wd, stats)


@pytest.mark.parametrize("solver", ["admm", "fista"])
def test_dense_phase_leaves_dead_inputs_at_the_dense_weights(solver):
    Wd, stats, dead = _dead_problem()
    start, _ = prune("sparsegpt", Wd, parse_pattern("2:4"), PRUNE, hessian=stats.H)
    out = dense_reconstruction(start, Wd, stats, RECON | {"solver": solver, "l1": 0.5, "l2": 0.0, "steps": 100, "iters": 30})
    assert torch.equal(out[:, dead], Wd[:, dead])
    assert torch.isfinite(out).all()


def test_admm_solvers_are_deterministic():
    Wd, stats = _real_like_problem()
    start, mask = prune("magnitude", Wd, parse_pattern("2:4"), PRUNE)
    assert torch.equal(dense_admm(start, Wd, stats, **DENSE_ADMM, l1=0.01), dense_admm(start, Wd, stats, **DENSE_ADMM, l1=0.01))
    assert torch.equal(masked_admm(Wd, stats, mask, start, **MASKED_ADMM), masked_admm(Wd, stats, mask, start, **MASKED_ADMM))


@pytest.mark.parametrize("device", DEVICES)
def test_solver_outputs_live_on_the_input_device(device):
    Wd, _, _, stats = _problem(rows=8, cols=16)
    Wd = Wd.to(device)
    stats = LinearStats(*(t.to(device) for t in (stats.H, stats.G, stats.D)))
    start, mask = prune("magnitude", Wd, parse_pattern("2:4"), PRUNE)
    outs = [dense_reconstruction(start, Wd, stats, RECON | {"solver": s, "l1": 0.01, "l2": 0.0, "steps": 5, "iters": 5})
            for s in ("admm", "fista")]
    outs += [adjust(Wd, stats, mask, start, PRUNE2 | {"adjust": s, "adjust_steps": 5, "adjust_iters": 5})
             for s in ("exact", "fista", "admm")]
    assert all(o.device.type == device and o.dtype == torch.float32 for o in outs)


@pytest.mark.parametrize("penalty", ["none", "l1", "mask"])
def test_admm_steps_in_place_equal_the_textbook_iteration_bit_for_bit(penalty):
    """admm_iterate reuses its buffers; each step must still be V = W + U, Z = prox(V), U = V − Z,
    W = (C + ρ(Z − U)) S exactly, also with an identity prox (whose Z is V itself)."""
    from sds.algorithms.admm import _inverse_spd, admm_iterate

    torch.manual_seed(0)
    X = torch.randn(256, 24)
    A = X.T @ X / 256 + 0.1 * torch.eye(24)
    C, W0 = torch.randn(8, 24), torch.randn(8, 24)
    keep = torch.rand(8, 24) > 0.5
    prox = {"none": lambda V, _s: V, "l1": lambda V, _s: V - torch.clamp(V, -0.05, 0.05),
            "mask": lambda V, _s: V * keep}[penalty]
    rho, steps = 0.3, 7
    start = W0.clone()
    S = _inverse_spd(A + rho * torch.eye(24))
    W, U = W0.clone(), torch.zeros_like(W0)
    for step in range(steps):
        Z = prox(W + U, step)
        U = U + W - Z
        W = (C + rho * (Z - U)) @ S
    got_W, got_Z, got_U = admm_iterate(A, C, W0, prox, rho=rho, iters=steps)
    assert torch.equal(got_W, W) and torch.equal(got_U, U) and torch.equal(got_Z, Z)
    assert torch.equal(W0, start)  # the caller's start is left alone


def test_reconstruction_from_saved_upper_triangles_equals_the_old_whole_form_bit_for_bit(tmp_path):
    """prune1's statistics saved as upper triangles give the very numbers the whole-H files gave."""
    import json

    from sds.algorithms import method as sds_method
    from sds.model.statistics import StatsAccumulator
    from sds.storage.safetensors import load_tensors_with_metadata, save_tensors

    acc = StatsAccumulator(cross=False)
    for seed in range(3):
        acc.add({"fc1": correlated_inputs(256, 48, seed)}, None)
    save_tensors(tmp_path / "triu.safetensors", *acc.to_tensors())
    save_tensors(tmp_path / "whole.safetensors", {"fc1": acc._sums["fc1"][0] / acc.tokens},
                 {"groups": json.dumps(acc._groups), "tokens": str(acc.tokens)})
    g = torch.Generator().manual_seed(5)
    Wd = torch.randn(24, 48, generator=g)
    mask = torch.rand(24, 48, generator=g) > 0.5
    results = []
    for name in ("triu", "whole"):
        saved = StatsAccumulator.from_tensors(*load_tensors_with_metadata(tmp_path / f"{name}.safetensors"))
        results.append(sds_method.reconstruct_linear(RECON, Wd * mask, mask, Wd, saved.stats("fc1")))
    (W_triu, info_triu), (W_whole, info_whole) = results
    assert torch.equal(W_triu, W_whole) and info_triu == info_whole
    assert (tmp_path / "triu.safetensors").stat().st_size < 0.55 * (tmp_path / "whole.safetensors").stat().st_size
