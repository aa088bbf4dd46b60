"""The per-layer quantities measured both once at initialisation (`dslm-diagnose`, `dslm_hf.diagnostics`) and
during training (`dslm_hf.monitoring`): one definition for both, so a profile at step 0 and a training curve
measure the same thing.
"""

import torch
from torch import nn


def weight_gradient_norm(layer: nn.Module) -> float | None:
    """Norm of the gradient of a layer's weight matrices (biases and LayerNorm gains left out); None without one."""
    squares = [p.grad.double().pow(2).sum() for p in layer.parameters() if p.grad is not None and p.dim() >= 2]
    return float(torch.stack(squares).sum().sqrt()) if squares else None


def token_correlation(hidden: torch.Tensor) -> float:
    """Mean correlation between the hidden vectors of two different positions of a sequence (B, T, d): 0 for
    independent tokens, 1 when every position holds the same vector (rank collapse)."""
    centered = hidden.double() - hidden.double().mean()
    per_position = centered.pow(2).sum(-1)  # (B, T)
    summed = centered.sum(1).pow(2).sum(-1)  # (B,)  ||sum_t x_t||^2
    off_diagonal = (summed - per_position.sum(1)).sum()
    return float(off_diagonal / ((hidden.shape[1] - 1) * per_position.sum()))


__all__ = ["weight_gradient_norm", "token_correlation"]
