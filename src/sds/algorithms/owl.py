"""OWL: outlier-weighted layerwise sparsity (Yin et al., ICML 2024, arXiv 2310.05175). Pure functions.

A decoder layer's outlier ratio (its "layer outlier distribution", LOD) is the fraction of its Wanda scores
A_ij = |W_ij| · ‖X_j‖ (pooled over every linear of the layer, one mean for the pool) greater than M times
their mean (the paper's M = 5). Layers with more outliers are pruned less:

    n_l  = (LOD_l − min LOD) / (max LOD − min LOD)              ∈ [0, 1]
    s_l  = S + a · (mean(n) − n_l)                              a = min(2λ, λ / max_l |mean(n) − n_l|)

so the layer with the most outliers gets the lowest sparsity, the plain mean of s_l over the layers is the
target S exactly (the paper's renormalisation: every decoder layer of a model has the same parameter count,
so the parameter-weighted mean is the same number), and every s_l lies in [S − λ, S + λ]. The paper's
mapping is a = 2λ (ratios spread over a range 2λ wide, shifted so their mean is S); where a skewed
distribution of outlier ratios would then push a layer past S ± λ, the spread is narrowed just enough to
keep it within (a = λ / max|mean(n) − n_l|), the ordering unchanged. Equal outlier ratios give the uniform
profile. Unstructured patterns only (an N:M pattern fixes every layer's sparsity).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..core.patterns import Pattern


def outlier_fraction(weights: Mapping[str, torch.Tensor], input_norms: Mapping[str, torch.Tensor],
                     threshold: float) -> float:
    """The fraction of the layer's Wanda scores |W_ij|·‖X_j‖ above `threshold` × their mean, pooled over the
    linears named in `weights` (out × in each) with their inputs' norms ‖X_j‖ (in each, or a positive
    multiple common to the layer's linears: √diag(H) with H = XᵀX / tokens)."""
    if not weights:
        raise ValueError("a layer without linears has no outlier fraction")
    scores = [(W.float().abs() * input_norms[name].float().to(W.device).reshape(1, -1)).flatten()
              for name, W in weights.items()]
    pooled = torch.cat(scores)
    return float((pooled > threshold * pooled.mean()).double().mean())


def input_norms_from_hessian(H: torch.Tensor) -> torch.Tensor:
    """‖X_j‖ up to a common factor: √diag(H) (H = XᵀX / tokens; the negative rounding noise clamped)."""
    return torch.diagonal(H).float().clamp_min(0).sqrt()


def owl_ratios(fractions: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsities from per-layer outlier fractions (see the module's docstring): mean exactly
    `target`, each within [target − lam, target + lam], more outliers → lower sparsity."""
    if not 0 < target < 1:
        raise ValueError(f"target sparsity {target} is not in (0, 1)")
    if lam < 0 or target - lam < 0 or target + lam >= 1:
        raise ValueError(f"OWL lambda {lam} takes target {target} outside [0, 1)")
    n = len(fractions)
    if n == 0:
        return []
    lod = torch.tensor([float(f) for f in fractions], dtype=torch.float64)
    spread = float(lod.max() - lod.min())
    if spread <= 0 or lam == 0:
        return [float(target)] * n
    normalised = (lod - lod.min()) / spread
    offsets = normalised.mean() - normalised  # mean zero; the most outliers → the most negative
    scale = min(2 * lam, lam / float(offsets.abs().max()))
    ratios = target + scale * offsets
    ratios = ratios - (ratios.mean() - target)  # rounding of the sums only: the mean is the target exactly
    return [min(max(float(r), target - lam), target + lam) for r in ratios]


def layer_pattern(pattern: Pattern, ratios: Sequence[float] | None, layer: int) -> Pattern:
    """Decoder layer `layer`'s pattern: the uniform `pattern`, or with per-layer `ratios` (OWL) an
    unstructured one at that layer's ratio."""
    if not ratios:
        return pattern
    if pattern.kind != "unstructured":
        raise ValueError(f"per-layer sparsity ratios need an unstructured pattern, not {pattern}")
    return Pattern("unstructured", ratio=float(ratios[layer]))
