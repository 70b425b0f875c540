"""One-shot pruners as pure functions on tensors: magnitude, Wanda and SparseGPT.

Conventions (shared by every pruner):
- `W` is a linear layer's weight, shape (out_features, in_features); masks are bool, True = weight kept.
- A pattern is either `unstructured:<ratio>` (the fraction of weights removed) or `N:M` (at most N
  weights kept in every group of M consecutive input columns of a row; 2:4 keeps 2 of every 4).
- Statistics come from calibration inputs X (tokens × in_features): Wanda needs the per-column sum of
  squares ‖X_j‖², SparseGPT the Hessian H = XᵀX / n_tokens (any positive scale works: only ratios matter).
"""
from __future__ import annotations

import torch

from .patterns import Pattern, parse_pattern, pattern_from_slug  # noqa: F401  (re-exported)

PRUNERS = ("magnitude", "wanda", "sparsegpt")


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of `scores`'s shape with exactly `count` lowest entries (flattened) removed."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        keep[torch.topk(scores.flatten(), count, largest=False).indices] = False
    return keep.view_as(scores)


def mask_from_scores(scores: torch.Tensor, pattern: Pattern, *, per_row: bool) -> torch.Tensor:
    """Keep-mask removing the lowest scores to `pattern`.

    Unstructured: floor(ratio · group) entries removed per group, the group being each row (`per_row`,
    Wanda's comparison) or the whole matrix (magnitude's one threshold per layer). N:M: in each group of
    M consecutive columns of each row, the M−N lowest are removed.
    """
    rows, cols = scores.shape
    if pattern.kind == "nm":
        if cols % pattern.m:
            raise ValueError(f"N:M pattern {pattern} needs in_features divisible by {pattern.m}, got {cols}")
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(rows, cols)
    if per_row:
        count = int(pattern.ratio * cols)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if count:
            keep.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, False)
        return keep
    return _prune_lowest(scores, int(pattern.ratio * scores.numel()))


def magnitude_prune(W: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask_from_scores(W.abs().float(), pattern, per_row=False)
    return W * mask, mask


def wanda_prune(W: torch.Tensor, column_sq_norms: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda: score |W_ij|·‖X_j‖₂, compared within each output row; no weight update."""
    scores = W.abs().float() * column_sq_norms.float().clamp_min(0).sqrt().unsqueeze(0)
    mask = mask_from_scores(scores, pattern, per_row=True)
    return W * mask, mask


def dampen(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + λI with λ = percdamp · mean(diag H); dead inputs (H_ii = 0) get H_ii = 1 first."""
    H = H.clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += percdamp * diag.mean()
    return H


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float, *, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, retrying with 10× stronger dampening while H is not
    numerically positive definite. Returns (factor, dampening used)."""
    for attempt in range(max_tries):
        damp = percdamp * (10 ** attempt)
        L, info = torch.linalg.cholesky_ex(dampen(H, damp))
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
    raise FloatingPointError(f"Hessian is not positive definite even with dampening {damp:g}·mean(diag)")


def _block_prune_counts(rows: int, cols: int, blocksize: int, ratio: float) -> list[int]:
    """Weights to remove in each column block so that the layer total is exactly floor(ratio·numel)."""
    counts, prev = [], 0
    for end in range(blocksize, cols + blocksize, blocksize):
        upto = int(ratio * rows * min(end, cols))
        counts.append(upto - prev)
        prev = upto
    return counts


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS-style pruning column by column with error compensation.

    Works in float32 on W's device. Masks are chosen per column block by w² / [H⁻¹]_jj² (unstructured)
    or per group of M columns (N:M); after each column the pruning error is spread over the block's
    remaining columns, and each block's accumulated error over all later columns.
    """
    rows, cols = W.shape
    W = W.detach().float().clone()
    H = H.detach().float().to(W.device)
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    U, _ = inverse_hessian_cholesky(H, percdamp)
    keep = torch.ones_like(W, dtype=torch.bool)
    if pattern.kind == "nm" and blocksize % pattern.m:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    counts = _block_prune_counts(rows, cols, blocksize, pattern.ratio) if pattern.kind == "unstructured" else []

    for block_index, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        W1 = W[:, start:end].clone()
        U1 = U[start:end, start:end]
        d = torch.diagonal(U1)
        err = torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            keep1 = _prune_lowest(W1 ** 2 / d.unsqueeze(0) ** 2, counts[block_index])
        for j in range(end - start):
            if pattern.kind == "nm" and j % pattern.m == 0:
                group = W1[:, j:j + pattern.m] ** 2 / d[j:j + pattern.m].unsqueeze(0) ** 2
                keep1[:, j:j + pattern.m] = mask_from_scores(group, pattern, per_row=True)
            w = W1[:, j]
            q = w * keep1[:, j]
            e = (w - q) / d[j]
            W1[:, j:] -= e.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            W1[:, j] = q
            err[:, j] = e
        W[:, start:end] = W1
        keep[:, start:end] = keep1
        W[:, end:] -= err @ U[start:end, end:]
    return W * keep, keep


def prune(method: str, W: torch.Tensor, pattern: Pattern, *, hessian: torch.Tensor | None = None,
          blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatches to one pruner. `hessian` is E[x xᵀ] of the layer's inputs (Wanda uses its diagonal)."""
    if method == "magnitude":
        return magnitude_prune(W, pattern)
    if hessian is None:
        raise ValueError(f"pruner {method!r} needs calibration statistics")
    if method == "wanda":
        return wanda_prune(W, torch.diagonal(hessian), pattern)
    if method == "sparsegpt":
        return sparsegpt_prune(W, hessian, pattern, blocksize=blocksize, percdamp=percdamp)
    raise ValueError(f"unknown pruner {method!r}; expected one of {', '.join(PRUNERS)}")
