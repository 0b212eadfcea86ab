"""FlexLoRA (Bai et al., NeurIPS 2024): average full updates, redistribute by SVD.

Client k trains B_k (m × r_k) and A_k (r_k × n), starting from its truncation of the global.
Server, per module:
    ΔW = s Σ_k p_k B_k A_k,   p_k = |D_k| / Σ|D|          (full m × n matrix)
    ΔW = U Σ Vᵀ                                           (one SVD)
    client k receives  B_k = U[:, :r_k] Σ[:r_k] / s,  A_k = Vᵀ[:r_k]
The truncation's error is the norm of the discarded singular values (Eckart–Young).
The global update is not merged into the base: it is the state, kept at the exact rank
min(m, n, Σ r_k), and the global model is evaluated with all of it.

Like the reference (FederatedScope, branch FlexLoRA) all of Σ goes into B; unlike it, one
scaling s serves every client (the reference scales client k by α / r_k, which weights
low-rank clients up and makes the truncations inconsistent across ranks).
"""

from __future__ import annotations

from typing import Literal

import torch
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
    data_weights,
    factor_shapes,
    lora_init,
    train_loaded,
)
from fedlora.algorithms.registry import register_method
from fedlora.lowrank import svd_factors


class FlexLoRAOptions(MethodOptions):
    name: Literal["flexlora"] = "flexlora"
    svd_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the server's SVD (float64: slower, for checking truncation error)."""


def full_update(Bs: list[Tensor], As: list[Tensor], weights: list[float], dtype: torch.dtype) -> Tensor:
    """Σ_k p_k B_k A_k as one m × n matrix (without the scaling s)."""
    out = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=dtype)
    for B, A, p in zip(Bs, As, weights):
        out.addmm_(B.to(dtype), A.to(dtype), alpha=p)
    return out


def truncate(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A client's share of the global factors: the leading `rank` singular directions."""
    return B[:, :rank].contiguous(), A[:rank].contiguous()


@register_method
class FlexLoRA(Algorithm):
    name = "flexlora"
    Options = FlexLoRAOptions
    options: FlexLoRAOptions

    def __init__(self, options: FlexLoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.r_max = max(setup.client_max_ranks)

    def init_state(self) -> Tensors:
        """Round 1 starts like FedIT's LoRA: random A at r_max (clients take their rows), B = 0."""
        return lora_init(self.setup.module_shapes, self.r_max, self.setup.seed)

    def payload(self, state: Tensors, client_id: int) -> Message:
        r = self.setup.client_max_ranks[client_id]
        tensors: Tensors = {}
        for name in self.setup.module_shapes:
            tensors[f"{name}.B"], tensors[f"{name}.A"] = truncate(state[f"{name}.B"], state[f"{name}.A"], r)
        return Message(tensors=tensors)

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        ctx.adapters.load(payload.tensors, trainable={"A", "B"})
        return train_loaded(ctx, self.setup.client_max_ranks[ctx.client_id]), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return factor_shapes(self.setup.module_shapes, self.setup.client_max_ranks[update.client_id])

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        dtype = getattr(torch, self.options.svd_dtype)
        new_state: Tensors = {}
        rel_errors = []
        terms = []  # ΔW = s Σ_k p_k B_k A_k (before the SVD): client k's term of each module
        for name, (m, n) in self.setup.module_shapes.items():
            Bs, As = [u.tensors[f"{name}.B"] for u in updates], [u.tensors[f"{name}.A"] for u in updates]
            delta = full_update(Bs, As, p, dtype)
            terms.append(list(zip(p, Bs, As)))
            # rank(ΔW) ≤ Σ r_k; keep at least r_max so every client's truncation exists
            keep = min(m, n, max(self.r_max, sum(A.shape[0] for A in As)))
            B, A, S = svd_factors(delta, keep)
            new_state[f"{name}.B"] = B.to(torch.float32)
            new_state[f"{name}.A"] = A.to(torch.float32)
            # relative error of the smallest participant's truncation: ‖Σ[r_min:]‖ / ‖Σ‖
            r_min = min(self.setup.client_max_ranks[u.client_id] for u in updates)
            if float(S.norm()) > 0:
                rel_errors.append(float(S[r_min:].norm() / S.norm()))
        metrics = {"truncation_error_min_rank": sum(rel_errors) / len(rel_errors)} if rel_errors else {}
        return Aggregate(state=new_state, metrics={**metrics, **self.tilt(updates, terms)})

    def eval_factors(self, state: Tensors) -> Tensors:
        return state
