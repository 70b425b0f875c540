"""The SDS method, one linear layer at a time: what each stage does to a weight matrix given its input
statistics. Pure functions on tensors (the stages read and write, `model.passes` drives the layers); the
per-linear maths itself is in the pruner and solver modules beside this one, reached through `dispatch`.

    first prune      W_d → (W₁, M₁)                      a one-shot pruner on the dense weights
    adjust ablation  (W₁, M₁) → W₁′                      refit the kept weights, mask fixed (no dense phase)
    reconstruction   (W₁, M₁) → W_r                      dense refit from W₁ with a sparsity-promoting L1
                                                         weighted Ω = l1_pruned_weight where M₁ removed
    second prune     W_r → (W₂, M₂) → W₂′                the same pruner then the adjustment, or an ADMM
                                                         mask grown from W_r (`selection: gradual`); with
                                                         `fallback`, (W₁, M₁) is kept if it fits better

Every objective is the layer's output error against the dense weights, E(W) = E‖W_d x′ − W x‖².
"""
from __future__ import annotations

import torch

from ..core.patterns import Pattern
from .dispatch import adjust, dense_reconstruction, prune
from .objective import LinearStats, relative_error, relative_errors


def _prune(method: str, W: torch.Tensor, stats: LinearStats, pattern: Pattern, prune_settings: dict, **extra):
    return prune(method, W, pattern, prune_settings, hessian=stats.H, **extra)


def first_prune(method: str, W: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats, pattern: Pattern,
                prune_settings: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    new_W, mask = _prune(method, W, stats, pattern, prune_settings)
    return new_W, mask, {"rel_error": relative_error(new_W, W_dense, stats),
                         "sparsity": 1 - float(mask.float().mean())}


def adjust_weights(prune2_settings: dict, W_dense: torch.Tensor, stats: LinearStats, mask: torch.Tensor,
                   W_init: torch.Tensor) -> torch.Tensor:
    """The post-prune adjustment with the mask fixed ('none': the pruned weights as they are)."""
    return adjust(W_dense, stats, mask, W_init, prune2_settings)


def adjusted_first_prune(prune2_settings: dict, W_first: torch.Tensor, mask: torch.Tensor, W_dense: torch.Tensor,
                         stats: LinearStats) -> tuple[torch.Tensor, torch.Tensor, dict]:
    new_W = adjust_weights(prune2_settings, W_dense, stats, mask, W_first)
    after, before = relative_errors([new_W, W_first], W_dense, stats)
    return new_W, mask, {"rel_error": after, "rel_error_before": before}


def l1_weights(mask_first: torch.Tensor, pruned_weight: float) -> torch.Tensor:
    """Ω: 1 on the weights the first prune kept, `pruned_weight` on the ones it removed, so the dense phase
    lets removed weights return only where they earn it."""
    ones = torch.ones(mask_first.shape, dtype=torch.float32, device=mask_first.device)
    return torch.where(mask_first, ones, ones * pruned_weight)


def reconstruct_linear(settings: dict, W_first: torch.Tensor, mask_first: torch.Tensor, W_dense: torch.Tensor,
                       stats: LinearStats) -> tuple[torch.Tensor, dict]:
    """The dense phase: every weight free again, fitted from the first prune's weights."""
    W = dense_reconstruction(W_first, W_dense, stats, settings,
                             l1_weights=l1_weights(mask_first, settings["l1_pruned_weight"]))
    before, after = relative_errors([W_first, W], W_dense, stats)
    return W, {"rel_error_before": before, "rel_error": after,
               "near_zero": float((W.abs() < 1e-8).float().mean())}


def second_prune(method: str, W_recon: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats, pattern: Pattern,
                 prune_settings: dict, prune2_settings: dict, first: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prunes the reconstructed weights to the first prune's pattern and fits the survivors to the dense
    layer: `selection: pruner` runs the first prune's pruner on them, then the adjustment; `gradual` grows
    the mask over ADMM steps starting from them (the fit is part of the steps). With `fallback`, the first
    prune's (weights, mask) are kept when they fit the calibration target better (the paper's early exit).
    `first`: the first prune's (weights, mask) of this linear."""
    p2 = prune2_settings
    if p2["selection"] == "gradual":
        new_W, mask = _prune("admm", W_dense, stats, pattern, prune_settings, W_start=W_recon)
        info = {"rel_error": relative_error(new_W, W_dense, stats), "fallback": False}
    else:
        pruned, mask = _prune(method, W_recon, stats, pattern, prune_settings)
        new_W = adjust_weights(p2, W_dense, stats, mask, pruned)
        pruned_error, error = relative_errors([pruned, new_W], W_dense, stats)
        info = {"rel_error_pruned": pruned_error, "rel_error": error, "fallback": False}
    if p2["fallback"] and first is not None:
        W_first, mask_first = first
        first_error = relative_error(W_first, W_dense, stats)
        info["rel_error_prune1"] = first_error
        if first_error < info["rel_error"]:
            new_W, mask = W_first.float(), mask_first.bool()
            info.update(rel_error=first_error, fallback=True)
    return new_W, mask, info
