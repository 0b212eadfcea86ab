"""FedIT (Zhang et al., ICASSP 2024): FedAvg on LoRA factors, one rank for every client.

    r = min_k r_k^1                       (the weakest client bounds everyone)
    A = Σ_k p_k A_k,  B = Σ_k p_k B_k,  p_k = |D_k| / Σ|D|     (AFLoRA paper, eq. 2)

Clients start each round from the global A and B and train both. Averaging A and B
separately is not averaging B A: (Σ p B)(Σ p A) ≠ Σ p B A, the aggregation interference
the heterogeneous methods avoid. The global LoRA is kept across rounds, never merged.
"""

from __future__ import annotations

from typing import Literal

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
    lora_init,
    train_loaded,
    weighted_sum,
)
from fedlora.algorithms.registry import register_method


class FedITOptions(MethodOptions):
    name: Literal["fedit"] = "fedit"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank (must not exceed it)."""


@register_method
class FedIT(Algorithm):
    name = "fedit"
    Options = FedITOptions
    homogeneous = True

    def __init__(self, options: FedITOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.rank = common_rank(options.rank, setup.client_max_ranks)

    def init_state(self) -> Tensors:
        return lora_init(self.setup.module_shapes, self.rank, self.setup.seed)

    def payload(self, state: Tensors, client_id: int) -> Message:
        return Message(tensors=dict(state))

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        ctx.adapters.load(payload.tensors, trainable={"A", "B"})
        return train_loaded(ctx, self.rank), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items()}

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        new = {key: weighted_sum([u.tensors[key] for u in updates], p) for key in state}
        # the tilt: B A = Σ_k p_k B_k Ā, client k's term of the averaged B times the averaged A
        terms = [[(pk, u.tensors[f"{name}.B"], new[f"{name}.A"]) for pk, u in zip(p, updates)]
                 for name in self.setup.module_shapes]
        return Aggregate(state=new, metrics=self.tilt(updates, terms))

    def eval_factors(self, state: Tensors) -> Tensors:
        return state
