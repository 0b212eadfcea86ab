"""Sample-level DP on a client: DP-SGD over the trained LoRA factors (Abadi et al. 2016).

Each local step draws a fresh uniform batch of B distinct examples (the accountant's
sampling without replacement; the non-private path walks shuffled epochs instead), clips
every example's gradient of all trained factors jointly to C, sums them, adds N(0, σ²C²)
and divides by B; the method's optimizers then step on that gradient. A regulariser that
does not read the data (AFLoRA's column-norm penalty) adds its own gradient unclipped.

Per-example gradients come from one backward pass per example: Opacus's GradSampleModule
does not know fedlora's LoRA layers, and torch.func's vmap cannot go through the decoder's
shared-prefix cache; a batch of one is exact, and costs about what the batch costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedlora.data.encode import Encoded, collate
from fedlora.train import Batch, autocast, optimizers


@dataclass(frozen=True)
class SampleDP:
    """One client's DP-SGD settings for a round: C, σ, and the noise's generator."""

    clip_norm: float
    noise_multiplier: float
    generator: torch.Generator


def private_batches(examples: list[Encoded], batch_size: int, steps: int, seed: np.random.SeedSequence,
                    pad_id: int) -> list[Batch]:
    """`steps` batches, each a fresh uniform draw of batch_size distinct examples."""
    rng = np.random.default_rng(seed)
    return [collate([examples[i] for i in rng.choice(len(examples), batch_size, replace=False)], pad_id)
            for _ in range(steps)]


def example(batch: Batch, i: int) -> Batch:
    """Row i of a batch, as a batch of one."""
    return {k: t[i : i + 1] for k, t in batch.items()}


def clipped_sum(per_example: Sequence[Sequence[Tensor]], clip_norm: float) -> list[Tensor]:
    """Σ_i min(1, C/‖g_i‖) g_i, ‖g_i‖ the norm of example i's gradients of all factors together."""
    total = [torch.zeros_like(g) for g in per_example[0]]
    for grads in per_example:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        scale = min(1.0, clip_norm / float(norm)) if float(norm) > 0 else 1.0
        for acc, g in zip(total, grads):
            acc.add_(g, alpha=scale)
    return total


def noised_mean(summed: list[Tensor], count: int, clip_norm: float, noise_multiplier: float,
                generator: torch.Generator) -> list[Tensor]:
    """(Σ clipped + N(0, (σC)²)) / B, per coordinate."""
    std = noise_multiplier * clip_norm
    return [(s + torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device) * std) / count
            for s in summed]


def dp_train_steps(param_groups: list[tuple], batches: list[Batch], loss_fn: Callable[[Batch], Tensor],
                   dp: SampleDP, regulariser: Callable[[], Tensor] | None = None,
                   compute_dtype: str = "float32") -> list[float]:  # pragma: no mutate (not bfloat16: float32)
    """`train_steps` with DP-SGD's gradient; returns each step's mean task loss."""
    opts = optimizers(param_groups)
    params = [p for opt in opts for group in opt.param_groups for p in group["params"]]
    device = params[0].device
    losses = []
    for batch in batches:
        n = len(batch["input_ids"])
        per_example, batch_loss = [], 0.0
        for i in range(n):
            with autocast(compute_dtype, device):
                loss = loss_fn(example(batch, i))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            per_example.append([torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads)])
            batch_loss += float(loss.detach())
        grads = noised_mean(clipped_sum(per_example, dp.clip_norm), n, dp.clip_norm, dp.noise_multiplier,
                            dp.generator)
        if regulariser is not None:
            extra = torch.autograd.grad(regulariser(), params, allow_unused=True)
            grads = [g if e is None else g + e for g, e in zip(grads, extra)]
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)  # pragma: no mutate (each grad is set again before a step)
        losses.append(batch_loss / n)
    return losses
