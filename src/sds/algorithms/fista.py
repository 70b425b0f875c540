"""FISTA (accelerated proximal gradient) on the per-linear objective: the dense phase's first-order solver and
the projected (fixed-mask) adjustment."""
from __future__ import annotations

import torch

from .masks import dense_on_dead_inputs
from .objective import LinearStats, target_product


def _lipschitz(H: torch.Tensor, iters: int = 30, margin: float = 1.1) -> float:
    """2·λ_max(H), the gradient's Lipschitz constant, by power iteration: a few (in × in) @ vector products
    on the device instead of a full eigendecomposition. Power iteration approaches λ_max from below, so the
    estimate gets a 10 % margin; second-moment matrices of activations have a dominant direction, which it
    finds in a few steps."""
    v = torch.diagonal(H).clamp_min(0).sqrt() + 1e-6  # a deterministic start close to the top direction
    v = v / v.norm()
    estimate = torch.zeros((), dtype=H.dtype, device=H.device)
    for _ in range(iters):
        w = H @ v
        estimate = v @ w
        v = w / w.norm().clamp_min(1e-30)
    return 2.0 * margin * float(estimate.clamp_min(1e-12))


def fista(W_init: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats, *, steps: int, l1: float = 0.0,
          l2: float = 0.0, l1_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Minimises E(W) + s·(l1·‖Ω ⊙ W‖₁ + l2·‖W‖²) by FISTA (accelerated proximal gradient), from W_init.

    s = mean(diag H) makes l1/l2 unitless. Ω (`l1_weights`) weights the L1 term per entry, e.g. more
    on the positions the first prune removed. With `mask`, W stays zero outside it (projected steps).
    Step size 1/L with L the gradient's Lipschitz constant, so every step decreases the objective.
    """
    s = stats.scale
    H = stats.H.float()
    B = target_product(W_dense, stats)
    L = _lipschitz(H) + 2.0 * l2 * s
    step = 1.0 / L
    threshold = step * l1 * s
    if l1_weights is not None:
        threshold = threshold * l1_weights.float()
    keep = mask.to(H.device) if mask is not None else None

    W = W_init.detach().float().clone()
    if keep is not None:
        W = W * keep
    Y, W_prev, t = W.clone(), W.clone(), 1.0
    for _ in range(steps):
        grad = 2.0 * (Y @ H - B) + 2.0 * l2 * s * Y
        Z = Y - step * grad
        if l1 > 0:
            Z = torch.sign(Z) * (Z.abs() - threshold).clamp_min(0)
        if keep is not None:
            Z = Z * keep
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        Y = Z + ((t - 1.0) / t_next) * (Z - W_prev)
        W_prev, t = Z, t_next
    return dense_on_dead_inputs(W_prev, W_dense, H, keep)
