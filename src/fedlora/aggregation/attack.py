"""The attack harness: k of the n clients (a seeded choice) are adversaries that change what they
upload, or the labels they train on. It runs on the client, inside `client_train`, so both
runtimes see the same attacked uploads (the Flower ClientApp builds the same pipeline).

The change a client made this round, d = upload − origin, is what the attacks act on:

    FedIT, FFA-LoRA, FlexLoRA,   origin = the factors the client received (sliced to the upload's
    HETLoRA, HierFedLoRA,        shape: HETLoRA may upload a pruned rank): d is the change of A and B
    FedEx-LoRA, FedSVD, RoLoRA
                                 (reversing it reverses the first-order change of B A)
    FLoRA, AFLoRA                origin = 0 for B (FLoRA's B_k; AFLoRA's B'_k = B_k Λ_k): B starts at
                                 zero each round and ΔW_k = s B_k A_k is linear in it, so an attack on
                                 B is exactly that attack on the client's ΔW_k; A and the masks are kept

    sign_flip    origin − d
    scale        origin + c d                     (c = attack.scale)
    gaussian     origin + ε, ε ~ N(0, σ²) per coordinate, σ = noise_scale × RMS(d) of that tensor
    under_bound  u − t d = origin − (t − 1) d, t > 0 such that the upload's norm (as the norm bound measures it)
                 is margin × bound × the honest upload's norm: the reversed change, as large as a
                 norm bound relative to the round's median lets through when the honest uploads'
                 norms are alike (the attacker's own honest norm stands for the median)
    label_flip   the client trains on its own data with every class y replaced by (y + 1) mod C
                 (classification tasks only); its upload is then honest about wrong labels
    FedSA-LoRA: upload attacks refused (its B starts from the client's private state); label_flip works

Attackers report `attacker: 1` among their metrics, so a run's records say who attacked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from fedlora.aggregation.base import Wrapper
from fedlora.aggregation.screening import update_norm
from fedlora.algorithms.base import Algorithm, ClientContext, Message, Tensors, Update

ATTACK_STREAM = 0xA77AC
"""Spawn key of the attackers' randomness: the choice of attackers and the Gaussian noise."""

FROM_PAYLOAD = "the change d = upload − the factors received (A and B)"
FROM_ZERO = "B (which starts at zero: d = B, and ΔW_k = s B_k A_k is linear in it); A and masks kept"


def choose_attackers(num_clients: int, attackers: int, seed: int) -> frozenset[int]:
    """A seeded choice of `attackers` distinct clients."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, ATTACK_STREAM]))
    return frozenset(int(k) for k in rng.choice(num_clients, size=attackers, replace=False))


def origins(method: str, payload: Message, update: Update) -> Tensors:
    """For each attacked upload tensor, where it started this round (see the module's table)."""
    if method in ("flora", "aflora"):
        return {k: torch.zeros_like(t) for k, t in update.tensors.items() if k.endswith(".B")}
    out: Tensors = {}
    for key, t in update.tensors.items():
        received = payload.tensors[key]
        out[key] = received[tuple(slice(0, s) for s in t.shape)].to(t.dtype)
    return out


def flip_sign(upload: Tensors, origin: Tensors) -> Tensors:
    return {k: 2 * origin[k] - upload[k] for k in origin}


def scale_change(upload: Tensors, origin: Tensors, c: float) -> Tensors:
    return {k: origin[k] + c * (upload[k] - origin[k]) for k in origin}


def gaussian_change(upload: Tensors, origin: Tensors, noise_scale: float, generator: torch.Generator) -> Tensors:
    out: Tensors = {}
    for k in sorted(origin):
        d = upload[k] - origin[k]
        rms = float(d.pow(2).mean().sqrt()) if d.numel() else 0.0
        noise = torch.randn(d.shape, generator=generator, dtype=torch.float32).to(d.dtype)
        out[k] = origin[k] + noise_scale * rms * noise
    return out


def reversal_for_norm(upload: Tensors, origin: Tensors, target: float, unbounded: tuple[str, ...]) -> float:
    """t ≥ 0 with ‖u − t d‖ = target over the tensors the norm bound measures (u the honest
    upload, d its change from `origin`): the larger root of t²‖d‖² − 2t⟨u,d⟩ + ‖u‖² − target² = 0;
    0 when nothing changed or no t reaches the target."""
    dd = ud = uu = 0.0
    for k, u in upload.items():
        if k.endswith(unbounded):
            continue
        u64 = u.to(torch.float64)
        d = u64 - origin[k].to(torch.float64) if k in origin else torch.zeros_like(u64)
        dd += float((d * d).sum())
        ud += float((u64 * d).sum())
        uu += float((u64 * u64).sum())
    disc = ud * ud - dd * (uu - target * target)
    if dd == 0 or disc < 0:
        return 0.0
    return max(0.0, (ud + math.sqrt(disc)) / dd)


class Attack(Wrapper):
    """Clients in `attackers` train and upload as `attack` says; the others are untouched."""

    FIELD = "attack.kind"

    def __init__(self, inner: Algorithm, attackers: frozenset[int]) -> None:
        self.attackers = attackers
        super().__init__(inner)

    def client_train(self, ctx: ClientContext, payload: Message, client_state: Tensors
                     ) -> tuple[Update, Tensors]:
        if ctx.client_id not in self.attackers:
            return self.inner.client_train(ctx, payload, client_state)
        update, new_state = self.attack(ctx, payload, client_state)
        return replace(update, metrics={**update.metrics, "attacker": 1.0}), new_state

    def attack(self, ctx: ClientContext, payload: Message, client_state: Tensors) -> tuple[Update, Tensors]:
        raise NotImplementedError


class LabelFlip(Attack):
    """The attackers train on their own examples with every class y as (y + 1) mod C."""

    DEFAULT = "the client's local labels (its training data), whatever the method"

    def label(self) -> str:
        return f"label_flip by clients {sorted(self.attackers)}"

    def attack(self, ctx: ClientContext, payload: Message, client_state: Tensors) -> tuple[Update, Tensors]:
        with flipped_labels(ctx):
            return self.inner.client_train(ctx, payload, client_state)


class UploadAttack(Attack):
    """The attackers train honestly, then change what they upload (`kind`)."""

    ACTS_ON = {name: FROM_PAYLOAD for name in ("fedit", "ffa", "flexlora", "hetlora", "hierfedlora", "fedex",
                                               "fedsvd", "rolora")} | {name: FROM_ZERO for name in ("flora", "aflora")}
    REFUSED = {"fedsa": "its B starts from the client's private state, which the harness does not see"}

    def __init__(self, inner: Algorithm, attackers: frozenset[int], kind: str, scale: float = 10.0,
                 noise_scale: float = 10.0, margin: float = 0.95, bound: float = 10.0) -> None:
        self.kind, self.scale, self.noise_scale, self.margin, self.bound = kind, scale, noise_scale, margin, bound
        super().__init__(inner, attackers)

    def label(self) -> str:
        return f"{self.kind} by clients {sorted(self.attackers)}"

    def attack(self, ctx: ClientContext, payload: Message, client_state: Tensors) -> tuple[Update, Tensors]:
        update, new_state = self.inner.client_train(ctx, payload, client_state)
        return replace(update, tensors={**update.tensors, **self.attacked(ctx, payload, update)}), new_state

    def attacked(self, ctx: ClientContext, payload: Message, update: Update) -> Tensors:
        """The attacked tensors of an honest upload."""
        upload, origin = update.tensors, origins(self.name, payload, update)
        if self.kind == "sign_flip":
            return flip_sign(upload, origin)
        if self.kind == "scale":
            return scale_change(upload, origin, self.scale)
        if self.kind == "gaussian":
            seed = np.random.SeedSequence(ctx.seed.entropy, spawn_key=(*ctx.seed.spawn_key, ATTACK_STREAM))
            generator = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
            return gaussian_change(upload, origin, self.noise_scale, generator)
        target = self.margin * self.bound * update_norm(upload, self.unbounded_keys)
        t = reversal_for_norm(upload, origin, target, self.unbounded_keys)
        return scale_change(upload, origin, 1 - t)  # u − t d = origin + (1 − t) d


@contextmanager
def flipped_labels(ctx: ClientContext) -> Iterator[None]:
    """The client's examples with class y as (y + 1) mod C while it trains (restored after)."""
    examples, classes = ctx.examples, len(ctx.label_ids)
    ctx.examples = [replace(e, target=(e.target + 1) % classes) for e in examples]
    try:
        yield
    finally:
        ctx.examples = examples
