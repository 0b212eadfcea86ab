"""FedIT (Zhang et al., ICASSP 2024): FedAvg on LoRA factors, one rank for every client.

    r = min_k r_k^1                       (the weakest client bounds everyone)
    A = Σ_k p_k A_k,  B = Σ_k p_k B_k,  p_k = |D_k| / Σ|D|     (AFLoRA paper, eq. 2)

Clients start each round from the global A and B and train both. Averaging A and B
separately is not averaging B A: (Σ p B)(Σ p A) ≠ Σ p B A, the aggregation interference
the heterogeneous methods avoid. The global LoRA is kept across rounds, never merged.
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
    weighted_sum,
)


class FedITOptions(MethodOptions):
    name: Literal["fedit"] = "fedit"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank."""


class FedIT(Algorithm):
    name = "fedit"
    homogeneous = True

    def __init__(self, options: FedITOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.rank = common_rank(options.rank, setup.client_max_ranks)

    def init_state(self) -> Tensors:
        g = torch.Generator().manual_seed(self.setup.seed)
        state: Tensors = {}
        for name, (m, n) in self.setup.module_shapes.items():
            state[f"{name}.A"] = kaiming_rows(self.rank, n, g)
            state[f"{name}.B"] = torch.zeros(m, self.rank)
        return state

    def payload(self, state: Tensors, client_id: int) -> Message:
        return Message(tensors=dict(state))

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        ctx.adapters.load(payload.tensors, trainable={"A", "B"})
        losses = ctx.train([(ctx.adapters.trainable_parameters(), ctx.lr)])
        tensors = ctx.adapters.state()
        params = sum(t.numel() for t in tensors.values())
        metrics = {
            "train_loss": sum(losses) / len(losses),
            "rank": float(self.rank),
            "trained_params": params,
            "uploaded_params": params,
        }
        return Update(ctx.client_id, tensors, ctx.num_examples, metrics), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items()}

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        new = {key: weighted_sum([u.tensors[key] for u in updates], p) for key in state}
        return Aggregate(state=new)

    def eval_factors(self, state: Tensors) -> Tensors:
        return state
