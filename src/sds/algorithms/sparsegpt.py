"""SparseGPT (Frantar & Alistarh 2023): OBS-style column-by-column pruning with error compensation."""
from __future__ import annotations

import torch

from ..core.patterns import Pattern
from .masks import dead_inputs, keep_dead_values, remove_lowest


def dampen(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + λI with λ = percdamp · mean(diag H); dead inputs (H_ii = 0) get H_ii = 1 first."""
    H = H.clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += percdamp * diag.mean()
    return H


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float, *, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, retrying with 10× stronger dampening while H is not
    numerically positive definite. Returns (factor, dampening used).

    With P the order reversal, P(H + λI)P = L Lᵀ gives (H + λI)⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) and P L⁻¹ P is
    upper triangular: one Cholesky and one triangular solve instead of Cholesky, inverse, Cholesky
    (~25 % less time at 3072 inputs)."""
    for attempt in range(max_tries):
        damp = percdamp * (10 ** attempt)
        L, info = torch.linalg.cholesky_ex(dampen(H, damp).flip(0, 1))
        if info == 0:
            eye = torch.eye(H.shape[0], dtype=L.dtype, device=L.device)
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            # a non-finite entry of the factor reaches its diagonal, so that check is enough
            if bool(torch.isfinite(torch.diagonal(U)).all()):
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


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, *, blocksize: int,
                    percdamp: float, inner_blocksize: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS-style pruning column by column with error compensation.

    Masks are chosen per column block by w² / [H⁻¹]_jj² (unstructured, exactly the layer's count over
    the blocks) or per group of M columns (N:M); after each column the pruning error is spread over the
    later columns. Same arithmetic as the reference, laid out for speed: the weights are held transposed
    (a column is a contiguous row) and the spreading is done in two levels — column by column only inside
    an inner block of `inner_blocksize` columns, one matrix product per inner block for the rest of the
    block, one per block for the columns after it — so the per-column (memory-bound) updates touch
    16 columns instead of up to 128.
    """
    rows, cols = W.shape
    source = W.detach().float()
    H = H.detach().float().to(W.device)
    dead = dead_inputs(H)
    WT = source.T.contiguous()  # (cols, rows): column j of W is row j here
    WT[dead] = 0  # no signal: scored zero, removed first
    U, _ = inverse_hessian_cholesky(H, percdamp)
    keepT = torch.ones_like(WT, dtype=torch.bool)
    nm = pattern.kind == "nm"
    if nm:
        if cols % pattern.m:
            raise ValueError(f"N:M pattern {pattern} needs in_features divisible by {pattern.m}, got {cols}")
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
        inner_blocksize = max(pattern.m, inner_blocksize - inner_blocksize % pattern.m)
    counts = _block_prune_counts(rows, cols, blocksize, pattern.ratio) if not nm else []
    err = torch.empty(min(blocksize, cols), rows, dtype=WT.dtype, device=WT.device)

    for block_index, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        W1, keep1, U1 = WT[start:end], keepT[start:end], U[start:end, start:end]
        d = torch.diagonal(U1)
        err1 = err[:end - start]
        if not nm:
            keep1.copy_(remove_lowest((W1 / d.unsqueeze(1)) ** 2, counts[block_index]))
        for inner in range(0, end - start, inner_blocksize):
            inner_end = min(inner + inner_blocksize, end - start)
            for j in range(inner, inner_end):
                if nm and j % pattern.m == 0:
                    group = (W1[j:j + pattern.m] / d[j:j + pattern.m].unsqueeze(1)) ** 2
                    drop = torch.topk(group, pattern.m - pattern.n, dim=0, largest=False).indices
                    keep1[j:j + pattern.m].scatter_(0, drop, False)
                w = W1[j]
                e = torch.where(keep1[j], 0.0, w) / d[j]  # (w − q) / d, q = w on kept rows, 0 elsewhere
                W1[j:inner_end].addr_(U1[j, j:inner_end], e, alpha=-1.0)
                err1[j] = e
            W1[inner_end:].addmm_(U1[inner:inner_end, inner_end:].T, err1[inner:inner_end], alpha=-1.0)
        WT[end:].addmm_(U[start:end, end:].T, err1, alpha=-1.0)
    WT *= keepT  # removed weights exactly zero (the update leaves them at rounding-level values)
    keep = keepT.T.contiguous()
    return keep_dead_values(WT.T.contiguous(), source, keep, dead), keep
