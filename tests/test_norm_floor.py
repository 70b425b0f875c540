"""The floor on ADMM's input norms: a nearly silent input channel (H_jj tiny but > 0, as SmolLM2's RMSNorm
channels) must not make ADMM's weights blow up on the way back from the input-norm-scaled space."""
import pytest
import torch

from conftest import PRUNE, PRUNE2, RECON
from sds.algorithms.admm import _input_norms
from sds.algorithms.dispatch import adjust, dense_reconstruction, prune
from sds.algorithms.method import l1_weights
from sds.algorithms.objective import LinearStats, relative_error
from sds.core.patterns import parse_pattern

PATTERN = parse_pattern("2:4")
SILENT = 9


def _near_silent_channel(silent_scale=1e-4, rows=32, cols=64, tokens=4096):
    """(W_dense, stats) of a linear whose input 9 is input 4 (plus a little noise) times `silent_scale`:
    √H_99 ≈ 1e-4 against a median ≈ 1. In the scaled space the two are near twins in different 2:4 groups,
    so where the mask removes input 4 the fit can lean on input 9, whose weight is then divided by its tiny
    norm (seeds 0–5 all blow up past 1000× without the floor)."""
    g = torch.Generator().manual_seed(3)
    mixing = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(tokens, cols, generator=g) @ mixing + 0.3 * torch.randn(tokens, cols, generator=g)
    X[:, SILENT] = silent_scale * (X[:, 4] + 0.1 * torch.randn(tokens, generator=g))
    H = X.T @ X / tokens
    return torch.randn(rows, cols, generator=g), LinearStats(H, H, H)


def _growth(W: torch.Tensor, W_dense: torch.Tensor) -> float:
    return float(W.abs().max() / W_dense.abs().max())


def _admm_paths(W_dense, stats, floor):
    """The ADMM pruner (prune1's and the gradual second prune's update) and the ADMM adjustment, through the
    pipeline's dispatch with the schema's settings and the given floor."""
    settings = PRUNE | {"admm_norm_floor": floor}
    pruned, mask = prune("admm", W_dense, PATTERN, settings, hessian=stats.H)
    second, _ = prune("admm", W_dense, PATTERN, settings, hessian=stats.H, W_start=pruned * 1.5)
    adjusted = adjust(W_dense, stats, mask, W_dense * mask, PRUNE2 | {"adjust": "admm", "admm_norm_floor": floor})
    return {"admm pruner": pruned, "gradual second prune": second, "admm adjustment": adjusted}


def test_the_schema_floors_every_admm_path():
    assert PRUNE["admm_norm_floor"] == PRUNE2["admm_norm_floor"] == RECON["norm_floor"] > 0


def test_without_the_floor_a_near_silent_channel_blows_up_with_it_the_weights_stay_near_the_dense_range():
    W_dense, stats = _near_silent_channel()
    d, _ = _input_norms(stats.H, 0.0)
    assert float(d[SILENT]) < 1e-3 * float(d.median())  # the channel is near silent, not dead
    unfloored = _admm_paths(W_dense, stats, 0.0)
    floored = _admm_paths(W_dense, stats, PRUNE["admm_norm_floor"])
    for path in unfloored:
        assert _growth(unfloored[path], W_dense) > 2, path  # the blow-up the floor is for
        assert _growth(floored[path], W_dense) < 2, path
        # at the same error: the blown-up weights bought nothing on the calibration inputs
        assert relative_error(floored[path], W_dense, stats) < 1.02 * relative_error(unfloored[path], W_dense, stats)


def test_the_dense_phase_with_the_floor_stays_near_the_dense_range():
    W_dense, stats = _near_silent_channel()
    first, mask = prune("admm", W_dense, PATTERN, PRUNE, hessian=stats.H)
    refit = dense_reconstruction(first, W_dense, stats, RECON | {"solver": "admm"},
                                 l1_weights=l1_weights(mask, RECON["l1_pruned_weight"]))
    assert _growth(refit, W_dense) < 2
    assert relative_error(refit, W_dense, stats) < relative_error(first, W_dense, stats)


def test_the_floor_lifts_only_norms_below_it_and_leaves_dead_inputs_at_one():
    H = torch.diag(torch.tensor([4.0, 1.0, 1e-8, 0.0, 9.0]))
    d, dead = _input_norms(H, 0.1)
    live_median = 1.0  # of √(4, 1, 1e-8, 9) = (2, 1, 1e-4, 3): torch takes the lower of the middle two
    assert dead.tolist() == [False, False, False, True, False]
    torch.testing.assert_close(d, torch.tensor([2.0, 1.0, 0.1 * live_median, 1.0, 3.0]))
    torch.testing.assert_close(_input_norms(H, 0.0)[0], torch.tensor([2.0, 1.0, 1e-4, 1.0, 3.0]))
    with pytest.raises(ValueError, match=">= 0"):
        _input_norms(H, -0.1)
