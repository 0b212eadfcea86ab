"""Secure aggregation's arithmetic: what a client uploads so that the server needs only the sum.

For FedIT, FFA-LoRA and AFLoRA the server's step is a weighted sum Σ_k p_k v_k of each client's
view v_k (the factors; AFLoRA's zero-padded B'_k) with public weights p_k (example counts and
ranks, which the server knows and sends). A client uploads p_k v_k; the sum of the uploads,
which SecAgg+ reveals without any single one, handed to the method as one update of weight 1
(`fedlora.aggregation.robust.VIEWS`), gives the method's aggregate exactly (up to the
quantisation SecAgg+ works in). Flower runs that protocol with `SecAggPlusWorkflow` on the
server and `secaggplus_mod` on the ClientApp (legacy workflow API); wiring it into fedlora's
Flower runtime is not done yet (docs/concepts/privacy.md).

The other methods cannot use it as they stand (`UNSUMMABLE`).
"""

from __future__ import annotations

from fedlora.aggregation.robust import VIEWS
from fedlora.algorithms.base import Aggregate, Algorithm, ServerContext, Tensors, Update
from fedlora.privacy.uploads import CLIENT_LEVEL

UNSUMMABLE: dict[str, str] = {
    "flexlora": "its server re-factorises Σ_k p_k B_k A_k by SVD: a sum, but of m × n products, not of the "
                "factors the clients upload",
    "flora": "its server stacks every client's own A_k and B_k side by side: it needs each individual update",
    "hetlora": "its weights are the norms of the individual updates, which the server must not see",
}


def weights(method: Algorithm, updates: list[Update]) -> list[float]:
    """The method's public weights p_k of the round's clients (the server sends each its own)."""
    return CLIENT_LEVEL[method.name].weights(method, updates)


def pre_weighted(method: Algorithm, update: Update, weight: float) -> Tensors:
    """What the client gives SecAgg: p_k times its view (AFLoRA: its zero-padded B'_k)."""
    return {k: v * weight for k, v in VIEWS[method.name].vectors(method, update).items()}


def aggregate_sum(method: Algorithm, state: Tensors, updates: list[Update], summed: Tensors,
                  server: ServerContext) -> Aggregate:
    """The method's aggregate from the revealed sum Σ_k p_k v_k alone (`updates` only name the
    round's clients and their public masks, as the consensus needs)."""
    view = VIEWS[method.name]
    return method.aggregate(state, [view.consensus(method, updates, summed)], server)
