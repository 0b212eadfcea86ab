"""Does AFLoRA's λ rank the dimensions by what they contribute? Measurements, not maths.

AFLoRA reads λ_j² as the information content of dimension j (paper, eq. 7: I_j = ‖λ_j b_j a_jᵀ‖²_F
= C² λ_j² only when ‖b_j‖ = 1). These functions measure whether that holds on a trained
client: the rank correlation between λ_j² and the column's real contribution, λ's spread,
and whether pruning the columns DDR prunes costs less loss than pruning random active ones.
They are shared by the method's per-round diagnostics and by studies.

Also the tilt of an aggregation (issue 15, item 3): which client gets how much of the
aggregated update, under each method's weights (`aggregation_tilt`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedlora.adapters import LoRALayer


def ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of the entries of x, ties sharing their average rank."""
    values, inverse = torch.unique(x.double(), return_inverse=True)  # sorted unique values
    counts = torch.bincount(inverse, minlength=values.numel()).double()
    ends = counts.cumsum(0)
    average = ends - (counts - 1) / 2  # mean of the ranks a tied group occupies
    return average[inverse]


def spearman(x: Tensor, y: Tensor) -> float | None:
    """Spearman's rank correlation of two vectors (None when either is constant or n < 2)."""
    if x.numel() < 2:
        return None
    rx, ry = ranks(x.flatten()), ranks(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else None


def column_contributions(B: Tensor, lam: Tensor, A: Tensor, scaling: float) -> Tensor:
    """‖s · λ_j b_j a_jᵀ‖_F = s |λ_j| ‖b_j‖ ‖a_j‖ for every dimension j (a rank-1 matrix's norm)."""
    return scaling * lam.abs() * B.norm(dim=0) * A.norm(dim=1)


def lambda_diagnostics(
    lam_start: Tensor, lam: Tensor, B: Tensor, A: Tensor, mask: Tensor, scaling: float
) -> dict[str, float]:
    """One module's λ after a round, over its active dimensions: the population std of λ², the
    largest move of λ in the round, and Spearman(λ², contribution) (absent when undefined)."""
    active = mask > 0
    energy = lam[active] ** 2
    out = {
        "lambda_sq_std": float(energy.std(unbiased=False)) if energy.numel() else 0.0,
        "lambda_moved": float((lam - lam_start)[active].abs().max()) if energy.numel() else 0.0,
    }
    rho = spearman(energy, column_contributions(B, lam, A, scaling)[active])
    if rho is not None:
        out["lambda_spearman"] = rho
    return out


def mean_over_modules(per_module: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the modules that report it (one client's summary)."""
    keys = {k for d in per_module for k in d}
    return {k: sum(d[k] for d in per_module if k in d) / sum(k in d for d in per_module) for k in sorted(keys)}


def pruning_loss_increase(
    layers: Sequence[LoRALayer],
    pruned_masks: Sequence[Tensor],
    loss: Callable[[], float],
    generator: torch.Generator,
    draws: int = 4,
) -> tuple[float, float] | None:
    """(loss increase when the columns DDR prunes are switched off, mean increase over `draws`
    random choices of the same number of active columns per module), with the layers loaded
    with a client's trained factors and `loss` computed on the client's own batches. None when
    DDR prunes nothing. The layers' masks are restored afterwards."""
    masks = [layer.mask.clone() for layer in layers]
    counts = [int(m.sum() - p.sum()) for m, p in zip(masks, pruned_masks)]
    if sum(counts) == 0:
        return None

    def loss_with(new_masks: Sequence[Tensor]) -> float:
        for layer, m in zip(layers, new_masks):
            object.__setattr__(layer, "mask", m.to(device=layer.device, dtype=torch.float32))
        return loss()

    try:
        base = loss_with(masks)
        ddr = loss_with(pruned_masks) - base
        random_total = 0.0
        for _ in range(draws):
            drawn = []
            for m, n in zip(masks, counts):
                active = torch.nonzero(m > 0).flatten()
                off = active[torch.randperm(active.numel(), generator=generator)[:n]]
                r = m.clone()
                r[off] = 0
                drawn.append(r)
            random_total += loss_with(drawn) - base
    finally:
        loss_with(masks)
    return ddr, random_total / draws


Term = tuple[float, Tensor, Tensor]
"""(p_k, B_k, A_k): client k's term p_k · B_k A_k of one module's aggregated update."""


def gram_rows(A: Tensor) -> Tensor:
    """A Aᵀ in float64: the r × r Gram matrix of A's rows."""
    a = A.detach().double()
    return a @ a.T


def product_norm(B: Tensor, A: Tensor, gram_a: Tensor | None = None) -> float:
    """‖B A‖_F from the r × r Gram matrices, ‖B A‖²_F = Σ (BᵀB ⊙ A Aᵀ), in float64: the
    m × n product is never formed. `gram_a`: A Aᵀ in float64 if already computed. B's all-zero
    columns (zero padding, pruned dimensions) add nothing and are skipped."""
    b = B.detach().double()
    used = b.abs().sum(dim=0) > 0
    if not bool(used.any()):
        return 0.0
    if gram_a is None:
        gram_a = gram_rows(A)
    b = b[:, used]
    return math.sqrt(max(float(((b.T @ b) * gram_a[used][:, used]).sum()), 0.0))


def delta_shares(terms: Sequence[Sequence[Term]]) -> list[float] | None:
    """Each client's share of an aggregated update. terms[m][k] = (p_km, B_km, A_km) for module
    m and the k-th participating client, such that the module's aggregated update is
    ΔW_m = s Σ_k p_km B_km A_km. Client k's share is

        share_k = Σ_m ‖s p_km B_km A_km‖_F / Σ_j Σ_m ‖s p_jm B_jm A_jm‖_F

    (s cancels). The shares sum to 1; they split the summed norms of the terms, not ‖ΔW‖
    (terms that point apart partly cancel in ΔW). None when every term is zero."""
    clients = len(terms[0]) if terms else 0
    sizes = [0.0] * clients
    for module in terms:
        grams: dict[int, Tensor] = {}  # A Aᵀ once per distinct A (FedIT's Ā, AFLoRA's A' …)
        for k, (p, B, A) in enumerate(module):
            if id(A) not in grams:
                grams[id(A)] = gram_rows(A)
            sizes[k] += abs(p) * product_norm(B, A, grams[id(A)])
    total = sum(sizes)
    return [x / total for x in sizes] if total > 0 else None


def aggregation_tilt(client_ids: Sequence[int], terms: Sequence[Sequence[Term]]) -> dict[str, dict[str, float]]:
    """A round's tilt for its metrics record, keyed by client id (as `ranks`): `client_weight`,
    the aggregation weight p_k (mean over modules, where a method weights each module on its
    own), and `delta_share` (`delta_shares`; absent when the update is zero)."""
    weights = [sum(module[k][0] for module in terms) / len(terms) for k in range(len(client_ids))]
    out = {"client_weight": {str(c): w for c, w in zip(client_ids, weights)}}
    shares = delta_shares(terms)
    if shares is not None:
        out["delta_share"] = {str(c): x for c, x in zip(client_ids, shares)}
    return out
