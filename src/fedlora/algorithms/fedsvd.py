"""FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805): clients train only B over the global A;
the server re-factorises the aggregated product by SVD, so A follows the update's directions.

Round t (one rank r for every client: the weakest client's):
    client k loads (A, B) from the server, trains B only (A frozen), uploads B_k
    B̄ = Σ_k p_k B_k,  p_k = |D_k| / Σ|D|;   B̄ A = Σ_k p_k B_k A   (exact: one shared A)
    B̄ A = U Σ Vᵀ  (rank ≤ r),   A ← Vᵀ[:r],  B ← U[:, :r] Σ[:r]     (every `refactor_every` rounds)
The re-factorisation does not change the product (B A = B̄ A before and after), only how it
is split: A gets orthonormal rows, which bound B's gradient (the paper's point under DP-SGD).
The SVD is of an r × r core, not of the m × n product: with B̄ = Q_B R_B and Aᵀ = Q_A R_A
(QR), B̄ A = Q_B (R_B R_Aᵀ) Q_Aᵀ, and the core's SVD u σ vᵀ gives U = Q_B u, V = Q_A v.
Both factors go down each round (A changes), B alone comes up. Nothing is merged into the base.
Heterogeneous ranks: every client trains at the weakest client's rank (one shared A).
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

ROUND = "round"


class FedSVDOptions(MethodOptions):
    name: Literal["fedsvd"] = "fedsvd"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank."""
    init_a: Literal["kaiming", "orthogonal"] = "kaiming"
    """A before the first re-factorisation: PEFT's kaiming rows (seeded), or the same rows
    orthonormalised (QR), so A has orthonormal rows from round 1."""
    refactor_every: int = Field(1, ge=1)
    """Re-factorise by SVD after every N-th round's aggregation (1: every round, as the paper)."""


def refactor(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(U Σ, Vᵀ) of B A's thin SVD at B's rank, through QR of the factors (float64 inside)."""
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().t())
    u, sigma, vh = torch.linalg.svd(R_B @ R_A.t())
    return ((Q_B @ u) * sigma).to(torch.float32), (vh @ Q_A.t()).to(torch.float32)


@register_method
class FedSVD(Algorithm):
    name = "fedsvd"
    Options = FedSVDOptions
    trains = "B"
    homogeneous = True
    options: FedSVDOptions

    def __init__(self, options: FedSVDOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.rank = common_rank(options.rank, setup.client_max_ranks)

    def init_state(self) -> Tensors:
        state = lora_init(self.setup.module_shapes, self.rank, self.setup.seed)
        if self.options.init_a == "orthogonal":
            for key in [k for k in state if k.endswith(".A")]:
                state[key] = torch.linalg.qr(state[key].t())[0].t().contiguous()
        return {**state, ROUND: torch.tensor(1)}

    def payload(self, state: Tensors, client_id: int) -> Message:
        return Message(tensors={k: v for k, v in state.items() if k != ROUND})

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        ctx.adapters.load(payload.tensors, trainable={"B"})
        return train_loaded(ctx, self.rank, upload=(".B",)), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items() if k.endswith(".B")}

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        t = int(state[ROUND])
        new: Tensors = {ROUND: torch.tensor(t + 1)}
        terms = []
        for name in self.setup.module_shapes:
            Bs = [u.tensors[f"{name}.B"] for u in updates]
            A, B = state[f"{name}.A"], weighted_sum(Bs, p)
            if t % self.options.refactor_every == 0:
                B, A = refactor(B, A)
            new[f"{name}.A"], new[f"{name}.B"] = A, B
            terms.append([(pk, b, state[f"{name}.A"]) for pk, b in zip(p, Bs)])  # B̄ A = Σ p_k B_k A
        return Aggregate(state=new, metrics=self.tilt(updates, terms))

    def eval_factors(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if k != ROUND}
