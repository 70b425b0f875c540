"""ADMM solvers for the layer-wise quadratic objectives: a pruner, the dense phase, the fixed-mask adjustment.

Every problem here is
    min_W  tr(W A Wᵀ) − 2 tr(W Cᵀ) + g(W)
with A a fixed positive semi-definite (in × in) matrix built from H = E[x xᵀ], C a target product, and g
simple (a mask constraint, a weighted L1 norm). ADMM splits W = Z and alternates
    W ← (C + ρ(Z − U)) (A + ρI)⁻¹      (the same matrix every step: factorised once)
    Z ← prox_g(W + U)                  (elementwise: projection on a mask, soft threshold)
    U ← U + W − Z
so each step costs one (out × in) @ (in × in) product, like a gradient step, but unlike a gradient
step it is not limited by the conditioning of H: real LLM inputs have a few columns with 10³–10⁴ times
the energy of others, which caps FISTA's step size at 1/λ_max(H) while the weak directions barely move.

Everything is solved in the input-norm-scaled space (Boža 2024, arXiv 2401.02938): with d_j = √H_jj,
W' = W·diag(d) and H' = diag(d)⁻¹ H diag(d)⁻¹, which has a unit diagonal, so one ρ fits every layer and
the magnitude |W'_ij| = |W_ij|·‖x_j‖ is the Wanda score the mask selection uses. Inputs with H_jj = 0
("dead", never active in the calibration data) get d_j = 1; they carry no signal (see masks.py).

`norm_floor` c lifts every live d_j to at least c·median(live d) (H' then has diagonal entries below 1
where d was lifted, and the scaled-space ridges λ‖(W − W_d)·diag(d)‖² hold those weights near the dense
ones: that is the point). Without it a nearly silent input (H_jj
tiny but > 0: SmolLM2-135M's RMSNorm has channels with d ≈ 1e-4 against a median of 0.14) gets its
weights divided by d_j on the way back, so a moderate scaled-space value becomes a weight up to 77× the
dense layer's largest; c = 0.1 removed that growth at the same calibration and held-out errors to four
digits (bench/norm_floor_probe.py), but the built-in OPT's fc2 (ReLU inputs, d down to 0.05 × median) still
reached 4.5× at 0.1 and 1.5× at 0.3 for a calibration error within 3 %, hence the pipeline's 0.3
(docs/performance.md). c = 0 is the scaled space of Boža's code.

All tensors are created on the input's device; computation is float32.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core.patterns import Pattern
from .least_squares import masked_least_squares
from .masks import dead_inputs, keep_dead_values, remove_lowest
from .objective import LinearStats, target_product


def _input_norms(H: torch.Tensor, norm_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, dead): d_j = max(√H_jj, norm_floor·median of the live inputs' √H_jj), 1 for dead inputs."""
    if norm_floor < 0:
        raise ValueError(f"the input-norm floor must be >= 0, got {norm_floor}")
    dead = dead_inputs(H)
    d = torch.diagonal(H).clamp_min(0).sqrt()
    if norm_floor > 0 and not bool(dead.all()):
        d = d.clamp_min(norm_floor * float(d[~dead].median()))
    return torch.where(dead, torch.ones_like(d), d), dead


def _scaled_hessian(H: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return H / d.unsqueeze(1) / d.unsqueeze(0)


def _inverse_spd(A: torch.Tensor, *, max_tries: int = 6) -> torch.Tensor:
    """A⁻¹ for a symmetric positive definite A, as an explicit matrix: the ADMM step then is one matrix
    product (faster than two triangular solves on CPU). If A is numerically indefinite (rounding in H),
    a growing multiple of mean(diag A) is added."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    extra = 0.0
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(A + extra * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
        extra = max(extra * 10, 1e-6 * float(torch.diagonal(A).mean().clamp_min(1e-12)))
    raise FloatingPointError(f"ADMM system not positive definite even with {extra:g} added to its diagonal")


def admm_iterate(A: torch.Tensor, C: torch.Tensor, W: torch.Tensor, prox: Callable[[torch.Tensor, int], torch.Tensor],
                 *, rho: float, iters: int, U: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`iters` ADMM steps on tr(W A Wᵀ) − 2 tr(W Cᵀ) + g(W), from W (Z = prox(W), U = 0 unless given).

    Order as in Boža's code: Z ← prox(W + U, step); U ← U + W − Z; W ← (C + ρ(Z − U))(A + ρI)⁻¹.
    `prox(V, step)` is g's proximal map for penalty ρ‖·‖² (it may change with the step: the gradual
    mask selection). Returns (W, Z, U) after the last W update; the caller's final answer is usually
    prox(W + U), which satisfies the constraint exactly."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    system_inverse = _inverse_spd(A + rho * eye)
    # Three (out × in) buffers reused in place: the same arithmetic, in the same order, as
    # V = W + U; Z = prox(V); U = V − Z; W = (C + ρ(Z − U)) S, without the temporaries (~8 % per step).
    U = torch.zeros_like(W) if U is None else U.clone()
    W = W.clone()
    rhs = torch.empty_like(W)
    Z = None
    for step in range(iters):
        V = W.add_(U)
        Z = prox(V, step)
        if Z is V:  # an identity prox (no penalty): V's buffer is overwritten below
            Z = V.clone()
        torch.sub(V, Z, out=U)
        torch.sub(Z, U, out=rhs).mul_(rho).add_(C)
        W = torch.matmul(rhs, system_inverse, out=V)
    if Z is None:
        Z = prox(W + U, iters)
    return W, Z, U


# --- the pruner ----------------------------------------------------------------------------------------------


def cubic_sparsity(step: int, steps: int, final: float) -> float:
    """Sparsity at gradual-selection step `step` of `steps`: s·(1 − (1 − (step+1)/steps)³), reaching s
    at the last step (Zhu & Gupta's cubic schedule, as in Boža's code)."""
    return final - final * (1.0 - min(step + 1, steps) / steps) ** 3


def select_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the `sparsity` fraction (floor, per matrix) of lowest scores on the way to
    `pattern`. N:M: the N highest of each group are never removed, the M−N others of every group compete
    matrix-wide, so at sparsity (M−N)/M exactly the N:M mask is left — for any N:M (Boža's code
    hard-codes 2:4)."""
    count = int(sparsity * scores.numel())
    if pattern.kind != "nm":
        return remove_lowest(scores, count)
    rows, cols = scores.shape
    if cols % pattern.m:
        raise ValueError(f"N:M pattern {pattern} needs in_features divisible by {pattern.m}, got {cols}")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    candidates = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False)
    removed = ~remove_lowest(candidates.values, min(count, candidates.values.numel()))
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, candidates.indices, ~removed)
    return keep.reshape(rows, cols)


def damped_scaled_problem(Wd: torch.Tensor, H: torch.Tensor, percdamp: float, norm_floor: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, C, d, dead) of the pruners' objective ‖(W' − W_d')·A^½‖² in the scaled space (module docstring):
    A = H' + λI, λ = percdamp·mean diag H' (the dampening, pulling towards W_d), C = W_d' A. Shared by the
    ADMM and ALPS pruners; `norm_floor`: see _input_norms."""
    d, dead = _input_norms(H, norm_floor)
    Hs = _scaled_hessian(H, d)
    damp = percdamp * float(torch.diagonal(Hs).mean())
    A = Hs + damp * torch.eye(Hs.shape[0], dtype=Hs.dtype, device=Hs.device)
    return A, (Wd * d) @ A, d, dead


def admm_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, iters: int, gradual_iters: int,
               percdamp: float, rho: float = 1.0, W_start: torch.Tensor | None = None, gradual: bool = True,
               final: str = "project", norm_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM weight update with gradual mask selection (Boža 2024): min ‖X(W − W_d)‖² s.t. W on `pattern`.

    In the scaled space (module docstring) with A = H' + λI (λ = percdamp·mean diag H', the reference's
    dampening, pulling towards W_d), the first `gradual_iters` steps re-select the mask from |W' + U| at a
    cubically growing sparsity (`gradual`; else at the final sparsity every time, as the reference does
    for unstructured), then the mask stays fixed until `iters` (`gradual_iters=0`: one selection, from the
    starting weights, at the final sparsity). `W_start`: where the selection starts
    (W' = W_start' instead of W_d'), the target staying W = W_d — SDS's second prune from the
    reconstructed weights. `final`: "project" returns the last Z = (W' + U)⊙mask (the reference),
    "exact" the exact masked least squares on the final mask (costly on wide layers), with ridge `percdamp`.
    `norm_floor`: the floor on the input norms (module docstring). Returns (W_new, keep_mask), W_new on the
    pattern exactly (see masks.py for dead inputs).
    """
    if iters < 1:
        raise ValueError(f"ADMM pruning needs iters >= 1, got {iters}")
    Wd = W.detach().float()
    start = Wd if W_start is None else W_start.detach().float().to(Wd.device)
    H = H.detach().float().to(Wd.device)
    A, C, d, dead = damped_scaled_problem(Wd, H, percdamp, norm_floor)
    selection_steps = min(max(gradual_iters, 1), iters)
    mask_holder: list[torch.Tensor] = []

    def prox(V: torch.Tensor, step: int) -> torch.Tensor:
        if step < selection_steps:
            level = cubic_sparsity(step, selection_steps, pattern.sparsity) if gradual else pattern.sparsity
            scores = V.abs()
            scores[:, dead] = 0  # no signal: removed first
            mask_holder[:] = [select_mask(scores, pattern, level)]
        return V * mask_holder[0]

    Wn, _, U = admm_iterate(A, C, start * d, prox, rho=rho, iters=iters)
    keep = mask_holder[0]
    if final == "exact":
        out = masked_least_squares(Wd, LinearStats(H, H, H), keep, percdamp=percdamp)
    elif final == "project":
        out = ((Wn + U) * keep) / d
    else:
        raise ValueError(f"unknown final step {final!r}; expected 'project' or 'exact'")
    return keep_dead_values(out, start, keep, dead), keep


# --- the dense phase and the fixed-mask adjustment ------------------------------------------------------------


def _scaled_problem(W_dense: torch.Tensor, stats: LinearStats, ridge: float, norm_floor: float):
    """(A, C, d, dead) of E(W) + ridge·‖W‖² in the scaled space: ‖W‖² = ‖W' diag(d)⁻¹‖²."""
    H = stats.H.float()
    d, dead = _input_norms(H, norm_floor)
    A = _scaled_hessian(H, d)
    if ridge:
        A = A + torch.diag(ridge / d ** 2)
    C = target_product(W_dense.float().to(H.device), stats) / d
    return A, C, d, dead


def dense_admm(W_init: torch.Tensor, W_dense: torch.Tensor, stats: LinearStats, *, iters: int, rho: float,
               l1: float = 0.0, l2: float = 0.0, l1_weights: torch.Tensor | None = None,
               norm_floor: float = 0.0) -> torch.Tensor:
    """Minimises the dense phase's objective E(W) + s·(l1·‖Ω ⊙ W‖₁ + l2·‖W‖²) (the one `fista` minimises,
    s = stats.scale) by ADMM from W_init: one factorisation, `iters` steps of one matrix product each.
    The returned W is the last soft-thresholded iterate (exact zeros where the L1 term wins, as FISTA's).
    Dead input columns (H_jj = 0) keep W_dense's value: the fit does not depend on them.
    `rho` is in units of the scaled Hessian's unit diagonal; 0.3 with 30 steps reached FISTA-2000's
    objective within 0.1 % on SmolLM2-135M's linears for l1 from 0.002 to 0.05 (smaller l1 prefers a
    smaller rho). `norm_floor`: the floor on the input norms (module docstring)."""
    s = stats.scale
    A, C, d, dead = _scaled_problem(W_dense, stats, l2 * s, norm_floor)
    W0 = W_init.detach().float().to(A.device) * d
    if l1 > 0:
        weights = torch.ones_like(W0) if l1_weights is None else l1_weights.float().to(A.device)
        threshold = (s * l1 / (2 * rho)) * weights / d
        lower = -threshold

        def prox(V: torch.Tensor, _step: int) -> torch.Tensor:
            # soft thresholding, sign(V)·max(|V| − t, 0), as V − clamp(V, −t, t): two passes instead of four
            return V - torch.clamp(V, lower, threshold)
    else:
        def prox(V: torch.Tensor, _step: int) -> torch.Tensor:
            return V

    Wn, _, U = admm_iterate(A, C, W0, prox, rho=rho, iters=iters)
    out = prox(Wn + U, iters) / d
    if bool(dead.any()):
        out[:, dead] = W_dense.float().to(out.device)[:, dead]
    return out


def masked_admm(W_dense: torch.Tensor, stats: LinearStats, mask: torch.Tensor, W_init: torch.Tensor | None = None, *,
                iters: int, percdamp: float, rho: float = 0.3, ridge_to: str = "dense",
                norm_floor: float = 0.0) -> torch.Tensor:
    """The fixed-mask adjustment min E(W) + λ‖W − W₀‖² s.t. W = 0 outside `mask` by ADMM from W_init
    (default W_dense on the mask): one (in × in) factorisation for the whole matrix instead of one (k × k)
    system per row. `ridge_to` "zero": W₀ = 0, λ = percdamp·mean diag H, the objective of
    `masked_least_squares`; "dense": W₀ = W_dense with the scaled-space ridge λ·‖(W − W_dense)·diag(d)‖²,
    λ = percdamp (ADMM pruning's dampening). Kept positions of dead inputs get W_dense's value (the exact
    solution leaves them at 0, an extra zero). Measured on SmolLM2-135M (bench/solver_bench.py): 20 steps
    match the exact solution of the "zero" objective; the "dense" ridge generalises better to held-out
    inputs, hence the defaults. `norm_floor`: the floor on the input norms (module docstring)."""
    H = stats.H.float()
    keep = mask.to(H.device).bool()
    Wd = W_dense.detach().float().to(H.device)
    if ridge_to == "zero":
        A, C, d, dead = _scaled_problem(Wd, stats, percdamp * stats.scale, norm_floor)
    elif ridge_to == "dense":
        A, C, d, dead = _scaled_problem(Wd, stats, 0.0, norm_floor)
        damp = percdamp * float(torch.diagonal(A).mean())
        A = A + damp * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        C = C + damp * Wd * d
    else:
        raise ValueError(f"unknown ridge target {ridge_to!r}; expected 'zero' or 'dense'")
    start = Wd if W_init is None else W_init.detach().float().to(H.device)
    W0 = start * keep * d
    Wn, _, U = admm_iterate(A, C, W0, lambda V, _step: V * keep, rho=rho, iters=iters)
    out = ((Wn + U) * keep) / d
    return keep_dead_values(out, Wd, keep, dead)
