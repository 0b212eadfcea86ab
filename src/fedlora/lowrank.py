"""Low-rank factor algebra shared by the methods and the export: stacking factor pairs so that
one pair carries a sum of products, and the best rank-r factors of a matrix (truncated SVD)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def stack_factors(Bs: Sequence[Tensor], As: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(B, A) with B A = Σ_k B_k A_k: the B_k side by side, the A_k stacked (float32). A
    weighted sum scales one factor of each pair before stacking."""
    B = torch.cat([b.to(torch.float32) for b in Bs], dim=1)
    A = torch.cat([a.to(torch.float32) for a in As], dim=0)
    return B, A


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, A, all singular values): B = U[:, :r] Σ[:r], A = Vᵀ[:r], so B A is the best rank-r
    approximation of `delta` (Eckart–Young) and ‖delta − B A‖_F = ‖Σ[r:]‖₂."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank], S
