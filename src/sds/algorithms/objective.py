"""The per-linear objective every algorithm here shares: the input statistics (LinearStats) and the output
error E(W) = E_t ‖W_d x′_t − W x_t‖² they define.

x_t are the layer's inputs in the model being built, x′_t the inputs the target sees (x′ = x for the
paper's "dense weights on the same inputs" target; the dense model's own inputs for the "dense stream"
target) and W_d the dense weight. E is quadratic in W and needs only
    H = E[x xᵀ],   G = E[x x′ᵀ],   D = E[x′ x′ᵀ]
so no solver replays calibration tokens: each step costs one (out × in) @ (in × in) product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinearStats:
    """H = E[x xᵀ] of the inputs x the layer sees, G = E[x x′ᵀ] and D = E[x′ x′ᵀ] with the inputs x′ its
    target sees (the 'dense_stream' target); for the default target x′ = x and G, D alias H."""
    H: torch.Tensor
    G: torch.Tensor
    D: torch.Tensor

    @property
    def single_stream(self) -> bool:
        """True when G and D alias H (the default target), so errors can be formed from W − W_d alone."""
        return self.G is self.H and self.D is self.H

    @property
    def scale(self) -> float:
        """Mean input energy, used to make regulariser strengths independent of layer scale."""
        return float(torch.diagonal(self.H).mean().clamp_min(1e-12))


def target_product(W_dense: torch.Tensor, stats: LinearStats) -> torch.Tensor:
    """B = W_d Gᵀ, so that ∇E(W) = 2(W H − B)."""
    return W_dense.float() @ stats.G.T


def _error_and_norm(W: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats, with_norm: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """E(W) and, if asked, E_t‖W_d x′_t‖². With one stream (G = D = H) E(W) = tr(Δ H Δᵀ), Δ = W − W_d: one
    (out × in) @ (in × in) product instead of three, and no cancellation between large terms."""
    W, Wd = W.float(), W_dense.float()
    if stats.single_stream:
        delta = W - Wd
        value = ((delta @ stats.H) * delta).sum()
        norm = ((Wd @ stats.H) * Wd).sum() if with_norm else None
        return value, norm
    norm = ((Wd @ stats.D) * Wd).sum()
    value = ((W @ stats.H) * W).sum() - 2 * ((W @ stats.G) * Wd).sum() + norm
    return value, norm


def reconstruction_error(W: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats) -> float:
    """E(W) summed over output rows: tr(W H Wᵀ) − 2 tr(W G W_dᵀ) + tr(W_d D W_dᵀ)."""
    return float(_error_and_norm(W, W_dense, stats, with_norm=False)[0].clamp_min(0))


def relative_error(W: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats) -> float:
    """E(W) / E_t‖W_d x′_t‖²: 0 is perfect, 1 is as bad as outputting zeros."""
    value, norm = _error_and_norm(W, W_dense, stats, with_norm=True)
    return float(value.clamp_min(0)) / float(norm.clamp_min(1e-30))


def relative_errors(Ws: list[torch.Tensor], W_dense: torch.Tensor, stats: LinearStats) -> list[float]:
    """`relative_error` of each of `Ws` against the same target, the norm computed once."""
    values = [_error_and_norm(W, W_dense, stats, with_norm=i == 0) for i, W in enumerate(Ws)]
    norm = float(values[0][1].clamp_min(1e-30)) if values else 1.0
    return [float(value.clamp_min(0)) / norm for value, _ in values]


def dense_objective(W: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats, *, l1: float = 0.0, l2: float = 0.0,
                    l1_weights: torch.Tensor | None = None) -> float:
    """The dense phase's objective E(W) + s·(l1·‖Ω ⊙ W‖₁ + l2·‖W‖²), s = stats.scale (see `fista`)."""
    W = W.float()
    penalty = 0.0
    if l1:
        weighted = W.abs() if l1_weights is None else W.abs() * l1_weights.float()
        penalty += l1 * float(weighted.sum())
    if l2:
        penalty += l2 * float((W * W).sum())
    return reconstruction_error(W, W_dense, stats) + stats.scale * penalty
