"""ALPS (Meng et al., NeurIPS 2024, arXiv 2406.07831): ADMM on the layer objective with the sparsity
pattern as a hard constraint and a penalty that grows as the support settles, then preconditioned conjugate
gradients on the chosen support.

The objective is ADMM pruning's (admm.py), in the same input-norm-scaled space (W' = W·diag(d), d_j = √H_jj):
    min_W' ‖(W' − W_d')·A^½‖²  s.t. W' on the pattern,    A = H' + λI, C = W_d' A
split as W' = D, D constrained to the pattern (the L0 ball: projection = keep the largest |·|), with the
scaled dual V (= ρU):
    W ← (C − V + ρD)(A + ρI)⁻¹      (A = QΛQᵀ once: every ρ the schedule visits costs one product)
    D ← P(W + V/ρ)                  (the pattern's projection: the largest |·| per N:M group / matrix)
    V ← V + ρ(W − D)
Every `UPDATE_EVERY` steps, the support's change s (flipped positions / kept count) since the last check
sets the penalty: s > 10 %: ρ × growth[0]; s > 0.5 %: ρ × growth[1]; any change: ρ × growth[2] — until ρ
has first been raised, a ρ under which the support barely moves is too large for ADMM to explore, so ρ is
divided by 5 (and the iterates restart from W_d when the support did move a little); no change once ρ has
grown: the support has settled, stop (also after `SETTLE_AFTER` steps with s < 0.03 %). ρ is capped at 10⁶.
The mask is the pattern's projection of the last W iterate; the kept weights are then refit by `pcg_iters`
steps of conjugate gradients on the masked normal equations (W A)_S = C_S, batched over rows, with the
Jacobi preconditioner diag(A) (in the scaled space nearly 1 + λ, so the preconditioner matters mostly for
dead inputs). These constants are the paper's; `rho` (0.1), the growth factors (1.3, 1.2, 1.1), the
dampening (0.01) and 10 PCG steps are its defaults.

Dampening, `damping`: "scaled" (default) adds λ = percdamp·mean diag H' in the scaled space, as ADMM
pruning does (the same relative ridge on every input); "inputs" adds percdamp·mean diag H to H before the
scaling, as the reference code does, which is a much stronger ridge (towards W_d) on weak inputs. With
"inputs" this implementation reproduces the reference's masks (bench/solver_bench.py); "scaled" fits the
calibration and held-out outputs better on the synthetic layers measured there.

Dead inputs (H_jj = 0) score zero and so are removed first; kept ones keep their value (masks.py).
All tensors are created on the input's device; computation is float32 (the eigendecomposition float64).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..core.patterns import Pattern
from .admm import damped_scaled_problem
from .masks import dead_inputs, keep_dead_values, mask_from_scores

UPDATE_EVERY = 3       # steps between support checks (and ρ updates)
SETTLE_AFTER = 30      # after this many steps, a support change under SETTLED ends the iterations
SETTLED = 3e-4
RHO_MAX = 1e6


def _projector(pattern: Pattern, dead: torch.Tensor):
    """V → (V on the pattern, keep-mask): the largest |V| kept (N:M per group, unstructured per matrix),
    dead inputs removed first."""
    def project(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = V.abs()
        scores[:, dead] = 0
        keep = mask_from_scores(scores, pattern, per_row=False)
        return V * keep, keep
    return project


def next_rho(rho: float, change: float, grown: bool, growth: Sequence[float]) -> tuple[float, str]:
    """(ρ, action) after a support check with relative change `change` (0 = none); action is 'grow',
    'restart' (ρ lowered, iterates back to the start), 'lower' (ρ lowered) or 'stop'."""
    if change > 0.1:
        return min(rho * growth[0], RHO_MAX), "grow"
    if change > 0.005:
        return min(rho * growth[1], RHO_MAX), "grow"
    if change > 0:
        return (min(rho * growth[2], RHO_MAX), "grow") if grown else (rho / 5, "restart")
    return (rho, "stop") if grown else (rho / 5, "lower")


def masked_pcg(A: torch.Tensor, C: torch.Tensor, keep: torch.Tensor, X: torch.Tensor, *, iters: int) -> torch.Tensor:
    """`iters` steps of Jacobi-preconditioned conjugate gradients on min tr(X A Xᵀ) − 2 tr(X Cᵀ) with X zero
    outside `keep`, one independent system per row (the masked normal equations (X A)_S = C_S), from X."""
    X = X * keep
    inv_diag = 1.0 / torch.diagonal(A).clamp_min(1e-12)
    R = (C - X @ A) * keep
    Z = R * inv_diag
    P = Z
    rz = (R * Z).sum(1, keepdim=True)
    for _ in range(iters):
        AP = (P @ A) * keep
        curvature = (P * AP).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        X = X + alpha * P
        R = R - alpha * AP
        Z = R * inv_diag
        rz_next = (R * Z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))
        P = Z + beta * P
        rz = rz_next
    return X


def alps_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, iters: int, rho: float,
               rho_growth: Sequence[float], pcg_iters: int, percdamp: float, damping: str = "scaled",
               W_start: torch.Tensor | None = None, norm_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ALPS (module docstring): min ‖X(W − W_d)‖² + dampening s.t. W on `pattern`, by at most `iters` ADMM
    steps from penalty `rho` (growth factors `rho_growth`, three), then `pcg_iters` PCG steps on the
    final support, dampening `percdamp` where `damping` says. `W_start`: where the iterates start (W_d
    otherwise), the target staying W = W_d (as admm_prune). `norm_floor`: the floor on the scaled space's
    input norms (admm._input_norms: no weight blow-up on nearly silent inputs). Returns (W_new, keep_mask), W_new on the
    pattern exactly (see masks.py for dead inputs)."""
    if iters < 1:
        raise ValueError(f"ALPS needs iters >= 1, got {iters}")
    if rho <= 0 or len(rho_growth) != 3:
        raise ValueError(f"ALPS needs rho > 0 and three growth factors, got rho={rho}, growth={rho_growth}")
    Wd = W.detach().float()
    start = Wd if W_start is None else W_start.detach().float().to(Wd.device)
    H = H.detach().float().to(Wd.device)
    if damping == "scaled":
        A, C, d, dead = damped_scaled_problem(Wd, H, percdamp, norm_floor)
    elif damping == "inputs":
        ridge = percdamp * float(torch.diagonal(H).mean())
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        A, C, d, _ = damped_scaled_problem(Wd, H + ridge * eye, 0.0, norm_floor)
        dead = dead_inputs(H)
    else:
        raise ValueError(f"unknown ALPS damping {damping!r}; expected 'scaled' or 'inputs'")
    eigenvalues, Q = torch.linalg.eigh(A.double())
    eigenvalues, Q = eigenvalues.float().clamp_min(0), Q.float()
    project = _projector(pattern, dead)

    def system_inverse(penalty: float) -> torch.Tensor:
        return (Q / (eigenvalues + penalty)) @ Q.T

    B0 = start * d
    D0, keep0 = project(B0)
    kept = max(int(keep0.sum()), 1)
    B, D, V, keep_checked = B0, D0, torch.zeros_like(B0), keep0
    S = system_inverse(rho)
    grown = False
    for step in range(iters):
        B = (C - V + rho * D) @ S
        D, keep = project(B + V / rho)
        V = V + rho * (B - D)
        if (step + 1) % UPDATE_EVERY:
            continue
        change = float((keep != keep_checked).sum()) / kept
        keep_checked = keep
        rho, action = next_rho(rho, change, grown, rho_growth)
        if action == "stop" or (step >= SETTLE_AFTER and change < SETTLED):
            break
        grown = grown or action == "grow"
        if action == "restart":
            B, D, V = B0, D0, torch.zeros_like(B0)
        S = system_inverse(rho)
    B, keep = project(B)
    out = masked_pcg(A, C, keep, B, iters=pcg_iters) / d
    return keep_dead_values(out * keep, start, keep, dead), keep
