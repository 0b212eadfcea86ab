"""FFA-LoRA (Sun et al., ICLR 2024): freeze A, train and average only B.

    A = kaiming(seed)        drawn once from the run's seed, never trained
    B = Σ_k p_k B_k,  p_k = |D_k| / Σ|D|

Because every client holds the same A, averaging B is averaging B A: the aggregation is
exact, at one homogeneous rank. A is never sent: every party rebuilds it from the seed,
so the payload is B alone. The global LoRA is kept across rounds, never merged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientContext,
    FederationSetup,
    Message,
    MethodOptions,
    ServerContext,
    Tensors,
    Update,
    common_rank,
    data_weights,
    kaiming_rows,
    train_loaded,
    weighted_sum,
)
from fedlora.algorithms.registry import register_method


class FFALoRAOptions(MethodOptions):
    name: Literal["ffa"] = "ffa"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank (must not exceed it)."""


def frozen_A(setup: FederationSetup, rank: int) -> Tensors:
    """The shared, frozen A of every module, drawn from the run's seed (same on every party)."""
    g = torch.Generator().manual_seed(setup.seed)
    return {f"{name}.A": kaiming_rows(rank, n, g) for name, (_, n) in setup.module_shapes.items()}


@register_method
class FFALoRA(Algorithm):
    name = "ffa"
    Options = FFALoRAOptions
    trains = "B"
    homogeneous = True

    def __init__(self, options: FFALoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.rank = common_rank(options.rank, setup.client_max_ranks)
        self.A = frozen_A(setup, self.rank)

    def init_state(self) -> Tensors:
        return {f"{name}.B": torch.zeros(m, self.rank) for name, (m, _) in self.setup.module_shapes.items()}

    def payload(self, state: Tensors, client_id: int) -> Message:
        return Message(tensors=dict(state))

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        ctx.adapters.load({**self.A, **payload.tensors}, trainable={"B"})
        return train_loaded(ctx, self.rank, upload=(".B",)), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items()}

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        new = {k: weighted_sum([u.tensors[k] for u in updates], p) for k in state}
        terms = [[(pk, u.tensors[f"{name}.B"], self.A[f"{name}.A"]) for pk, u in zip(p, updates)]
                 for name in self.setup.module_shapes]  # B A = Σ_k p_k B_k A
        return Aggregate(state=new, metrics=self.tilt(updates, terms))

    def eval_factors(self, state: Tensors) -> Tensors:
        return {**self.A, **state}
