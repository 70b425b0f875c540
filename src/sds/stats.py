"""The statistics every per-linear objective needs: second moments of a linear layer's inputs."""
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
