"""Masks and the conventions every pruner shares.

- `W` is a linear layer's weight, shape (out_features, in_features); masks are bool, True = weight kept.
- A pattern is either `unstructured:<ratio>` (the fraction of weights removed) or `N:M` (at most N
  weights kept in every group of M consecutive input columns of a row; 2:4 keeps 2 of every 4).
- Statistics come from calibration inputs X (tokens × in_features): Wanda needs the per-column sum of
  squares ‖X_j‖², SparseGPT the Hessian H = XᵀX / n_tokens (any positive scale works: only ratios matter).
- Exact sparsity: a mask removes exactly the pattern's count (N:M: M−N per group; unstructured:
  floor(ratio·numel) per matrix, or per row for Wanda), and kept weights stay non-zero. Inputs that are
  never active in the calibration data ("dead", H_jj = 0, common after ReLU) carry no signal: their
  weights score zero, so they are removed first, and where one is still kept it keeps its value from W
  (any value gives the same calibration outputs, and zeroing it would add a zero the pattern did not ask
  for).
- Every tensor is created on W's device; computation is float32.
"""
from __future__ import annotations

import torch

from ..core.patterns import Pattern


def remove_lowest(scores: torch.Tensor, count: int, *, dim: int | None = None) -> torch.Tensor:
    """Keep-mask of `scores`'s shape with exactly `count` lowest entries removed: of the whole tensor
    (`dim=None`) or of each slice along `dim`. Of scores tied at the threshold the lowest indices are
    removed first, so the count is exact even when many scores are equal (e.g. zeros). kthvalue and a
    comparison: 3–5× faster than topk/sort for the large counts pruning needs."""
    if dim is None:
        return remove_lowest(scores.reshape(1, -1), count, dim=1).view_as(scores)
    size = scores.shape[dim]
    if count <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if count >= size:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(count, dim=dim, keepdim=True).values
    keep = scores > threshold
    # every slice removes count; ties at the threshold beyond that are kept, first-come (usually none)
    surplus = (size - count) - keep.sum(dim=dim, keepdim=True)
    if bool((surplus > 0).any()):
        ties = scores == threshold
        # slot of each tie counted from the end of its slice: the last `surplus` ties are kept
        from_end = ties.flip(dim).cumsum(dim=dim).flip(dim)
        keep |= ties & (from_end <= surplus)
    return keep


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the n highest of every m consecutive entries along the last dimension."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
    return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(rows, cols)


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
        return nm_keep(scores, pattern.n, pattern.m)
    if per_row:
        return remove_lowest(scores, int(pattern.ratio * cols), dim=1)
    return remove_lowest(scores, int(pattern.ratio * scores.numel()))


def dead_inputs(H: torch.Tensor) -> torch.Tensor:
    """Inputs never active in the calibration data: H_jj = 0 (bool per input column)."""
    return torch.diagonal(H) == 0


def keep_dead_values(W_new: torch.Tensor, W_source: torch.Tensor, keep: torch.Tensor,
                     dead: torch.Tensor) -> torch.Tensor:
    """W_new with kept positions of dead input columns set to W_source's value (removed ones stay 0).
    Such weights never touch a calibration output, so this changes no error, only the count of zeros."""
    if bool(dead.any()):
        W_new = W_new.clone()
        W_new[:, dead] = torch.where(keep[:, dead], W_source[:, dead].to(W_new.dtype), W_new.new_zeros(()))
    return W_new


def dense_on_dead_inputs(W: torch.Tensor, W_dense: torch.Tensor, H: torch.Tensor,
                       keep: torch.Tensor | None) -> torch.Tensor:
    """W with dead input columns at W_dense's value (on `keep` only, when given)."""
    dead = dead_inputs(H)
    if keep is None:
        keep = torch.ones_like(W, dtype=torch.bool)
    return keep_dead_values(W, W_dense.float().to(W.device), keep, dead)
