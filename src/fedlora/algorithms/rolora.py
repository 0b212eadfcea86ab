"""RoLoRA (Chen et al., NeurIPS 2025, arXiv 2502.01755): rounds alternate between training and
uploading only B and only A, so every aggregation is exact and uploads are halved.

Round t (one rank r for every client: the weakest client's); the trained factor F_t is `first`
in odd rounds and the other one in even rounds:
    client k loads the global (A, B), trains F_t only, uploads F_t
    B-round:  B ← Σ_k p_k B_k   ⇒  B A = Σ_k p_k B_k A    (A shared: exact)
    A-round:  A ← Σ_k p_k A_k   ⇒  B A = Σ_k p_k B A_k    (B shared: exact)
    p_k = |D_k| / Σ|D|
Both factors go down every round (a client sampled now may have missed the last one), one
comes up. Nothing is merged into the base. With B = 0 at the start, an A-round first trains
nothing (A's gradient is Bᵀ times the output's): `first: B` is the default.
Heterogeneous ranks: every client trains at the weakest client's rank (one shared A and B).
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
    lora_init,
    train_loaded,
    weighted_sum,
)
from fedlora.algorithms.registry import register_method

ROUND = "round"


class RoLoRAOptions(MethodOptions):
    name: Literal["rolora"] = "rolora"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank."""
    first: Literal["B", "A"] = "B"
    """The factor trained in round 1 (and every odd round); the other in even rounds."""


@register_method
class RoLoRA(Algorithm):
    name = "rolora"
    Options = RoLoRAOptions
    trains = "A/B"
    homogeneous = True
    options: RoLoRAOptions

    def __init__(self, options: RoLoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.rank = common_rank(options.rank, setup.client_max_ranks)

    def factor(self, round_: int) -> str:
        """The factor trained in `round_` ("A" or "B")."""
        second = "A" if self.options.first == "B" else "B"
        return self.options.first if round_ % 2 == 1 else second

    def init_state(self) -> Tensors:
        return {**lora_init(self.setup.module_shapes, self.rank, self.setup.seed), ROUND: torch.tensor(1)}

    def payload(self, state: Tensors, client_id: int) -> Message:
        return Message(tensors={k: v for k, v in state.items() if k != ROUND},
                       config={"train": self.factor(int(state[ROUND]))})

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        trained = str(payload.config["train"])
        ctx.adapters.load(payload.tensors, trainable={trained})
        return train_loaded(ctx, self.rank, upload=(f".{trained}",)), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        suffix = f".{self.factor(int(state[ROUND]))}"
        return {k: tuple(v.shape) for k, v in state.items() if k.endswith(suffix)}

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        t = int(state[ROUND])
        new = {**state, ROUND: torch.tensor(t + 1)}
        trained = self.factor(t)
        terms = []
        for name in self.setup.module_shapes:
            key = f"{name}.{trained}"
            new[key] = weighted_sum([u.tensors[key] for u in updates], p)
            if trained == "B":  # B A = Σ p_k B_k A,  or  B Σ p_k A_k
                terms.append([(pk, u.tensors[key], state[f"{name}.A"]) for pk, u in zip(p, updates)])
            else:
                terms.append([(pk, state[f"{name}.B"], u.tensors[key]) for pk, u in zip(p, updates)])
        return Aggregate(state=new, metrics=self.tilt(updates, terms))

    def eval_factors(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if k != ROUND}
