"""Wanda (Sun et al. 2023): |W_ij|·‖X_j‖₂ scores compared within each output row; no weight update."""
from __future__ import annotations

import torch

from ..core.patterns import Pattern
from .masks import mask_from_scores


def wanda_prune(W: torch.Tensor, column_sq_norms: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda: score |W_ij|·‖X_j‖₂, compared within each output row; no weight update."""
    scores = W.abs().float() * column_sq_norms.float().to(W.device).clamp_min(0).sqrt().unsqueeze(0)
    mask = mask_from_scores(scores, pattern, per_row=True)
    return W * mask, mask
