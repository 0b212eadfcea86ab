"""FLoRA (Wang et al., NeurIPS 2024): stack heterogeneous-rank factors, merge, restart.

Round t, client k (rank r_k = its max rank):
    A_k ~ kaiming (fresh, seeded by (seed, t, k)),  B_k = 0;  train both
Server:
    A = [p_1 A_1; …; p_K A_K]    (rows scaled by the data weight p_k = |D_k| / Σ|D|)
    B = [B_1, …, B_K]            (columns, unweighted)
    ⇒ B A = Σ_k p_k B_k A_k  exactly;   W ← W + s B A,  and LoRA restarts next round.

The stack (Σ r_k rows) is broadcast, so the downlink grows with the number of clients:
the payload of round t+1 carries round t's stack for a client that holds its own copy of
the base (the in-process runtime merges it once, centrally). One rank-independent scaling
s is used for every client, so the stack's product is the weighted sum with no rescaling.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientContext,
    Message,
    MethodOptions,
    ServerContext,
    Tensors,
    Update,
    data_weights,
    factor_shapes,
    kaiming_rows,
    train_loaded,
)
from fedlora.algorithms.registry import register_method
from fedlora.lowrank import stack_factors

ROUND = "round"


class FLoRAOptions(MethodOptions):
    name: Literal["flora"] = "flora"


def stack(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A = Σ p_k B_k A_k: A rows scaled by p_k, B columns side by side."""
    return stack_factors(Bs, [p * a.to(torch.float32) for a, p in zip(As, weights)])


def fresh_generator(seed: int, round_: int, client_id: int) -> torch.Generator:
    """Each (round, client) draws its own A; any party can redraw it from the three numbers."""
    entropy = np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(entropy))


@register_method
class FLoRA(Algorithm):
    name = "flora"
    Options = FLoRAOptions

    def init_state(self) -> Tensors:
        return {ROUND: torch.tensor(1)}

    def payload(self, state: Tensors, client_id: int) -> Message:
        """The round number (for the fresh A) and last round's stack, to merge into the base."""
        tensors = {k: v for k, v in state.items() if k != ROUND}
        return Message(tensors=tensors, config={"round": int(state[ROUND])})

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        r = self.setup.client_max_ranks[ctx.client_id]
        g = fresh_generator(self.setup.seed, int(payload.config["round"]), ctx.client_id)
        factors: Tensors = {}
        for name, (m, n) in self.setup.module_shapes.items():
            factors[f"{name}.A"] = kaiming_rows(r, n, g)
            factors[f"{name}.B"] = torch.zeros(m, r)
        ctx.adapters.load(factors, trainable={"A", "B"})
        return train_loaded(ctx, r), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return factor_shapes(self.setup.module_shapes, self.setup.client_max_ranks[update.client_id])

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        merge = {}
        new_state: Tensors = {ROUND: state[ROUND] + 1}
        terms = []  # B A = Σ_k p_k B_k A_k: client k's term of each module
        for name in self.setup.module_shapes:
            As, Bs = [u.tensors[f"{name}.A"] for u in updates], [u.tensors[f"{name}.B"] for u in updates]
            B, A = stack(As, Bs, p)
            merge[name] = (B, A)
            new_state[f"{name}.merge.B"] = B
            new_state[f"{name}.merge.A"] = A
            terms.append(list(zip(p, Bs, As)))
        return Aggregate(state=new_state, merge=merge, metrics=self.tilt(updates, terms))
