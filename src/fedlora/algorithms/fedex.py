"""FedEx-LoRA (Singhal et al., arXiv 2410.09432): FedAvg of A and B, plus the residual folded
into the frozen base, so the global update is exactly the average of the clients' products.

Round t (one rank r for every client: the weakest client's):
    client k starts from the global (Ā, B̄), trains both, uploads A_k, B_k
    Ā = Σ_k p_k A_k,  B̄ = Σ_k p_k B_k,  p_k = |D_k| / Σ|D|
    R = Σ_k p_k B_k A_k − B̄ Ā                       (the aggregation interference of FedIT)
    W ← W + s R,   and the global adapter is (Ā, B̄)
so W + s B̄ Ā = W_before + s Σ_k p_k B_k A_k: exact, whatever the clients trained.

Every client needs R to keep its copy of W in step; the payload of round t+1 carries it (as
FLoRA's stack), in the form `residual` chooses:
    factors   R = [p_1 B_1 … p_K B_K, −B̄] [A_1; …; A_K; Ā]:  (K+1) r (m + n) numbers per module
    dense     R as one m × n matrix:                          m n numbers per module
    smaller   per module, whichever of the two has fewer numbers (default)
The fold itself is the same (W ← W + s R) whichever way R travels.
Heterogeneous ranks: every client trains at the weakest client's rank (as FedIT); the
average of A_k's of different ranks is not defined.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

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
from fedlora.lowrank import stack_factors

MERGE = ".merge."


class FedExLoRAOptions(MethodOptions):
    name: Literal["fedex"] = "fedex"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank."""
    residual: Literal["smaller", "factors", "dense"] = "smaller"
    """How the residual R = Σ p_k B_k A_k − B̄ Ā reaches the clients: `factors` ((K+1)·r·(m+n)
    numbers per module), `dense` (m·n), `smaller` (per module, the one with fewer numbers)."""


def residual_factors(Bs: list[Tensor], As: list[Tensor], p: list[float], B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(B_R, A_R) with B_R A_R = Σ_k p_k B_k A_k − B A: the clients' factors stacked beside −B."""
    return stack_factors([pk * b.to(torch.float32) for pk, b in zip(p, Bs)] + [-B], [*As, A])


def identity_pair(R: Tensor) -> tuple[Tensor, Tensor]:
    """(B, A) with B A = R for the base's merge log, the identity on the smaller side."""
    m, n = R.shape
    return (torch.eye(m), R) if m <= n else (R, torch.eye(n))


@register_method
class FedExLoRA(Algorithm):
    name = "fedex"
    Options = FedExLoRAOptions
    homogeneous = True
    options: FedExLoRAOptions

    def __init__(self, options: FedExLoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.rank = common_rank(options.rank, setup.client_max_ranks)

    def init_state(self) -> Tensors:
        return lora_init(self.setup.module_shapes, self.rank, self.setup.seed)

    def payload(self, state: Tensors, client_id: int) -> Message:
        """The global adapter and last round's residual (for a client's own copy of the base)."""
        return Message(tensors=dict(state))

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        factors = {k: v for k, v in payload.tensors.items() if MERGE not in k}
        ctx.adapters.load(factors, trainable={"A", "B"})
        return train_loaded(ctx, self.rank), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items() if MERGE not in k}

    def dense_cheaper(self, m: int, n: int, clients: int) -> bool:
        """Whether R goes as an m × n matrix rather than as stacked factors."""
        if self.options.residual != "smaller":
            return self.options.residual == "dense"
        return m * n < (clients + 1) * self.rank * (m + n)

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        new: Tensors = {}
        merge: dict[str, tuple[Tensor, Tensor]] = {}
        terms = []
        for name, (m, n) in self.setup.module_shapes.items():
            As = [u.tensors[f"{name}.A"] for u in updates]
            Bs = [u.tensors[f"{name}.B"] for u in updates]
            A, B = weighted_sum(As, p), weighted_sum(Bs, p)
            new[f"{name}.A"], new[f"{name}.B"] = A, B
            B_R, A_R = residual_factors(Bs, As, p, B, A)
            if self.dense_cheaper(m, n, len(updates)):
                R = (B_R.double() @ A_R.double()).to(torch.float32)
                new[f"{name}{MERGE}W"] = R
                merge[name] = identity_pair(R)
            else:
                new[f"{name}{MERGE}B"], new[f"{name}{MERGE}A"] = B_R, A_R
                merge[name] = (B_R, A_R)
            terms.append(list(zip(p, Bs, As)))  # W + s B̄ Ā moved by s Σ_k p_k B_k A_k
        return Aggregate(state=new, merge=merge, metrics=self.tilt(updates, terms))

    def eval_factors(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if MERGE not in k}
