"""HETLoRA (Cho et al., NAACL 2024): heterogeneous ranks, rank self-pruning, sparsity weights.

Client k at rank r (its max rank at first, then what it pruned to), tail from t = ⌊γ r⌋:
    min  CE + λ_reg Σ_modules ‖A[t:r, :]‖_F · ‖B[:, t:r]‖_F            (tail-norm penalty)
    if the tail norm fell below last round's:  r ← max(t, min_rank)    (self-pruning)
    upload A[:r], B[:, :r]
Server, per module:
    pad A_k, B_k with zeros to r_max;  w_k ∝ ‖B_k A_k‖_F  (normalised)
    A = Σ w_k A_k,  B = Σ w_k B_k;   client k next receives A[:r_k], B[:, :r_k]
The global LoRA is kept at r_max and never merged; the global model is evaluated with it.

The penalty is computed on the live factors, so it has a gradient (the one public
re-implementation detaches them and its penalty never trains anything). The spec writes
the tail start as ⌈γ r⌉; with the reference γ = 0.99 that is r itself for every r < 100
(an empty tail: no penalty, no pruning), so ⌊γ r⌋ is our default and `tail_rounding: ceil`
the literal reading. The server tracks each client's current rank in its state
(`ranks`), set from the shape of the client's upload.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientContext,
    FederationSetup,
    InvalidUpdate,
    Message,
    MethodOptions,
    ServerContext,
    Tensors,
    Update,
    factor_shapes,
    lora_init,
    weighted_sum,
)
from fedlora.algorithms.registry import register_method

RANKS = "ranks"
TAIL_NORM = "tail_norm"


class HETLoRAOptions(MethodOptions):
    name: Literal["hetlora"] = "hetlora"
    reg: float = Field(1e-3, ge=0)
    """λ_reg, weight of the tail-norm penalty (reference: 0.001)."""
    gamma: float = Field(0.99, gt=0, lt=1)
    """Pruning ratio: the tail is ranks ⌊γ r⌋ … r−1 (reference: 0.99)."""
    tail_rounding: Literal["floor", "ceil"] = "floor"
    """Tail start ⌊γ r⌋ (default) or ⌈γ r⌉ as the spec prints it (empty tail for r < 1/(1−γ))."""
    min_rank: int = Field(1, ge=1)
    """Ranks never fall below this."""
    prune: bool = True
    """Self-pruning on; false keeps every client at its max rank (penalty still applies)."""


def tail_start(rank: int, gamma: float, rounding: str = "floor") -> int:
    t = math.floor(gamma * rank) if rounding == "floor" else math.ceil(gamma * rank)
    return min(rank, t)


def tail_norm(A: Tensor, B: Tensor, start: int) -> Tensor:
    """‖A[start:, :]‖_F · ‖B[:, start:]‖_F, differentiable in both factors."""
    return torch.linalg.norm(A[start:]) * torch.linalg.norm(B[:, start:])


def pad_rows(A: Tensor, r_max: int) -> Tensor:
    out = torch.zeros(r_max, A.shape[1])
    out[: A.shape[0]] = A
    return out


def pad_columns(B: Tensor, r_max: int) -> Tensor:
    out = torch.zeros(B.shape[0], r_max)
    out[:, : B.shape[1]] = B
    return out


def sparsity_weights(norms: list[float]) -> list[float]:
    """w_k ∝ ‖B_k A_k‖_F, normalised; uniform when every update is zero."""
    total = sum(norms)
    if total <= 0:
        return [1.0 / len(norms)] * len(norms)
    return [x / total for x in norms]


@register_method
class HETLoRA(Algorithm):
    name = "hetlora"
    Options = HETLoRAOptions
    adapts_ranks = True
    options: HETLoRAOptions

    def __init__(self, options: HETLoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.r_max = max(setup.client_max_ranks)
        if options.min_rank > min(setup.client_max_ranks):
            raise ValueError("algorithm.min_rank: exceeds the smallest client max rank")

    def init_state(self) -> Tensors:
        state = lora_init(self.setup.module_shapes, self.r_max, self.setup.seed)
        state[RANKS] = torch.tensor(self.setup.client_max_ranks)
        return state

    def payload(self, state: Tensors, client_id: int) -> Message:
        r = int(state[RANKS][client_id])
        tensors: Tensors = {}
        for name in self.setup.module_shapes:
            tensors[f"{name}.A"] = state[f"{name}.A"][:r].contiguous()
            tensors[f"{name}.B"] = state[f"{name}.B"][:, :r].contiguous()
        return Message(tensors=tensors, config={"rank": r})

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        opts = self.options
        r = int(payload.config["rank"])
        start = tail_start(r, opts.gamma, opts.tail_rounding)
        ctx.adapters.load(payload.tensors, trainable={"A", "B"})
        layers = [ctx.adapters.layers[name] for name in self.setup.module_shapes]

        def penalty() -> Tensor:
            return opts.reg * sum(tail_norm(layer.A, layer.B, start) for layer in layers)

        losses = ctx.train([(ctx.adapters.trainable_parameters(), ctx.lr)], penalty if opts.reg > 0 else None)
        with torch.no_grad():
            norm = float(sum(tail_norm(layer.A, layer.B, start) for layer in layers))
        previous = float(client_state[TAIL_NORM]) if TAIL_NORM in client_state else None
        new_rank = r
        if opts.prune and start < r and previous is not None and norm < previous:
            new_rank = max(start, opts.min_rank)
        tensors: Tensors = {}
        current = ctx.adapters.state()
        for name in self.setup.module_shapes:
            tensors[f"{name}.A"] = current[f"{name}.A"][:new_rank].clone()
            tensors[f"{name}.B"] = current[f"{name}.B"][:, :new_rank].clone()
        ctx.adapters.clear()
        trained = sum(r * (m + n) for m, n in self.setup.module_shapes.values())
        metrics = {
            "train_loss": sum(losses) / len(losses),
            "rank": float(r),
            "next_rank": float(new_rank),
            "tail_norm": norm,
            "trained_params": trained,
            "uploaded_params": sum(t.numel() for t in tensors.values()),
        }
        return Update(ctx.client_id, tensors, ctx.num_examples, metrics), {TAIL_NORM: torch.tensor(norm)}

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        first = next(iter(self.setup.module_shapes))
        A = update.tensors.get(f"{first}.A")
        if A is None or A.dim() != 2:
            raise InvalidUpdate(f"{first}.A: missing or not a matrix")
        r, current = A.shape[0], int(state[RANKS][update.client_id])
        if not self.options.min_rank <= r <= current:
            raise InvalidUpdate(f"rank {r} outside [{self.options.min_rank}, {current}] (ranks only shrink)")
        return factor_shapes(self.setup.module_shapes, r)

    def tracked_ranks(self, state: Tensors, updates: list[Update]) -> Tensor:
        """The server's record of each client's current rank, updated from the uploads' shapes."""
        ranks = state[RANKS].clone()
        for u in updates:
            ranks[u.client_id] = u.tensors[f"{next(iter(self.setup.module_shapes))}.A"].shape[0]
        return ranks

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        new_state: Tensors = {RANKS: self.tracked_ranks(state, updates)}
        terms = []  # B A = Σ_k w_k pad(B_k) Ā: client k's term of the averaged B times the averaged A
        for name in self.setup.module_shapes:
            As = [u.tensors[f"{name}.A"] for u in updates]
            Bs = [u.tensors[f"{name}.B"] for u in updates]
            w = sparsity_weights([float(torch.linalg.norm(B @ A)) for A, B in zip(As, Bs)])
            padded = [pad_columns(B, self.r_max) for B in Bs]
            new_state[f"{name}.A"] = weighted_sum([pad_rows(A, self.r_max) for A in As], w)
            new_state[f"{name}.B"] = weighted_sum(padded, w)
            terms.append([(wk, B, new_state[f"{name}.A"]) for wk, B in zip(w, padded)])
        return Aggregate(state=new_state, metrics=self.tilt(updates, terms))

    def eval_factors(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if k != RANKS}
