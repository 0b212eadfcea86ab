"""Client-level DP (DP-FedAvg)'s maths: clip each client's contribution, add Gaussian noise to
the sum. The stage that applies it around a method is `fedlora.aggregation.privacy`.

Sensitivity: the method's weights p_k are public (example counts, fixed ranks), so one
client moves Σ_k p_k clip(Δ_k) by at most C · max_k p_k; the noise has standard deviation
σ_Δ · C · max_k p_k in every coordinate (`noise: server`). With `noise: client` each client
adds N(0, (σ_Δ C)² / m) to its own clipped delta, m the planned clients per round, and the
server averages them with equal weights 1/m: the sum carries the same noise, and the server
never sees an un-noised update.

Adaptive clipping (Andrew et al., NeurIPS 2021): C follows the target quantile γ of the
update norms, C ← C · exp(−η (b̄ − γ)), b̄ the noised share of unclipped updates; the
count's noise σ_b takes part of the privacy budget: σ_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2), so the
pair is one Gaussian mechanism of noise multiplier σ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from fedlora.algorithms.base import Update, weighted_sum
from fedlora.privacy.uploads import ClippedUpload, clip_factor, deltas, joint_norm

PRIVACY_STREAM = 2**31 - 2
"""The seed stream of the privacy noise (the server's is 2**31 - 1)."""


def noise_generator(seed: int, round_: int, client: int | None = None) -> torch.Generator:
    """Reproducible noise for (run seed, round[, client]): a resumed run draws the same.
    (A deployment would draw from a cryptographically secure source instead.)"""
    words = [seed, round_, PRIVACY_STREAM] + ([] if client is None else [client])
    state = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


def gaussian_like(t: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """N(0, std²) in every coordinate of a float32 tensor shaped like t."""
    return torch.randn(t.shape, generator=generator, dtype=torch.float32) * std


def delta_noise_multiplier(noise_multiplier: float, count_noise: float | None) -> float:
    """σ_Δ, the multiplier left for the updates when adaptive clipping's count (noise σ_b)
    spends part of σ; σ itself with fixed clipping (count_noise None)."""
    if count_noise is None:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"privacy.count_noise: {count_noise:g} must exceed noise_multiplier / 2 "
                         f"= {noise_multiplier / 2:.4g}")
    return rest**-0.5


def next_clip_norm(clip_norm: float, unclipped: int, clients: int, count_noise: float, quantile: float,
                   lr: float, generator: torch.Generator) -> tuple[float, float]:
    """(next C, the noised share b̄ of unclipped updates): the geometric update of Andrew et al."""
    noisy = (unclipped + float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise) / clients
    return clip_norm * math.exp(-lr * (noisy - quantile)), noisy


@dataclass(frozen=True)
class Clipped:
    """One upload after clipping: the rebuilt update, its delta's norm before clipping."""

    update: Update
    norm: float
    clip_norm: float

    @property
    def unclipped(self) -> bool:
        return self.norm <= self.clip_norm


def clip_upload(spec: ClippedUpload, payload: Mapping[str, Tensor], update: Update, clip_norm: float,
                noise_std: float = 0.0, generator: torch.Generator | None = None) -> Clipped:
    """The upload rebuilt as reference + min(1, C/‖Δ‖) Δ (+ N(0, noise_std²) on the client),
    Δ the clipped tensors' change this round, jointly; other tensors (masks) untouched."""
    d = deltas(spec, payload, update.tensors)
    norm = joint_norm(d)
    scale = clip_factor(norm, clip_norm)
    tensors = dict(update.tensors)
    for k, delta in d.items():
        change = delta * scale
        if noise_std > 0:
            change = change + gaussian_like(change, noise_std, generator)
        tensors[k] = spec.reference(payload, k, update.tensors[k]).to(torch.float32) + change
    return Clipped(replace(update, tensors=tensors), norm, clip_norm)


def noisy_weighted_sum(tensors: list[Tensor], weights: list[float], std_per_weight: float,
                       generator: torch.Generator) -> Tensor:
    """Σ_k p_k t_k + N(0, (std_per_weight · max_k p_k)²): the method's sum with the server's noise."""
    total = weighted_sum(tensors, weights)
    return total + gaussian_like(total, std_per_weight * max(weights), generator)
