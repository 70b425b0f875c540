"""Magnitude pruning: one threshold on |W| per matrix (the baseline every pruner is compared with)."""
from __future__ import annotations

import torch

from ..core.patterns import Pattern
from .masks import mask_from_scores


def magnitude_prune(W: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask_from_scores(W.abs().float(), pattern, per_row=False)
    return W * mask, mask
