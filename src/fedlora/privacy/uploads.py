"""What client-level DP clips for each method: the part of an upload that carries the client's data.

A client's contribution is its upload minus what it started the round from (the reference);
that difference, over every clipped tensor of the upload together, is clipped to one ℓ2
norm. The server knows the reference (it sent it), so clipping, noise and the rebuilt
upload `reference + clipped delta` change nothing else in the method's own aggregation.

| method | clipped (jointly)                 | reference                                   |
|--------|-----------------------------------|---------------------------------------------|
| fedit  | A and B of every module           | the global A and B the client received       |
| ffa    | B of every module (A is frozen)   | the global B the client received             |
| aflora | B'Λ (B's active columns × λ)      | zero: B Λ starts every round at zero         |
| fedsvd | B of every module (A is the server's) | the global B the client received           |
| rolora | the factor trained this round (A or B) | the global factor the client received     |
| fedsa  | A of every module (B stays home)  | the global A the client received             |

AFLoRA's 0/1 masks are not clipped: with `ddr: false` they are the client's fixed rank,
known to the server; with pruning on they depend on the data and are refused.
FedSVD's SVD re-factorisation of B̄ A is post-processing of the noised sum. FedSA-LoRA only
with `global_b: none`: with `mean` its clients also upload B_k, which starts from their own B,
unknown to the server. FlexLoRA, FLoRA and HETLoRA aggregate products or stacked factors whose
sensitivity to one client is not a clipped sum, FedEx-LoRA folds a residual of products into the
base, and HierFedLoRA chains clients within a round: refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.algorithms.aflora import rank_weights
from fedlora.algorithms.base import Algorithm, Tensors, Update, data_weights

Reference = Callable[[Mapping[str, Tensor], str, Tensor], Tensor]
"""(payload tensors, upload key, uploaded tensor) → what that tensor started the round as."""


def received(payload: Mapping[str, Tensor], key: str, uploaded: Tensor) -> Tensor:
    """The tensor the server sent under the same name (FedIT's A and B, FFA-LoRA's B)."""
    return payload[key]


def zero(payload: Mapping[str, Tensor], key: str, uploaded: Tensor) -> Tensor:
    """Nothing: the uploaded tensor is itself the round's change (AFLoRA's B'Λ)."""
    return torch.zeros_like(uploaded)


def by_examples(method: Algorithm, updates: list[Update]) -> list[float]:
    """FedIT's and FFA-LoRA's p_k = |D_k| / Σ|D|."""
    return data_weights(updates)


def by_rank(method: Algorithm, updates: list[Update]) -> list[float]:
    """AFLoRA's eq. 12 weights from each upload's rank (one per client: its masks' mean rank is
    its fixed rank, since pruning is off under client-level DP) and example count."""
    name = next(iter(method.setup.module_shapes))
    ranks = [int(u.tensors[f"{name}.mask"].sum()) for u in updates]
    return rank_weights(ranks, [u.num_examples for u in updates], method.options.weighting)


@dataclass(frozen=True)
class ClippedUpload:
    """Which uploaded tensors (by name suffix) are clipped, what each started from, and the
    method's weights p_k (public: example counts, ranks)."""

    clipped: tuple[str, ...]
    reference: Reference
    weights: Callable[[Algorithm, list[Update]], list[float]]
    what: str
    """One line for the docs and the run's log."""


CLIENT_LEVEL: dict[str, ClippedUpload] = {
    "fedit": ClippedUpload((".A", ".B"), received, by_examples, "A and B of every module, minus the global A and B"),
    "ffa": ClippedUpload((".B",), received, by_examples, "B of every module, minus the global B (A is frozen)"),
    "aflora": ClippedUpload((".B",), zero, by_rank, "B'Λ of every module (B Λ starts each round at zero)"),
    "fedsvd": ClippedUpload((".B",), received, by_examples,
                            "B of every module, minus the global B (A is the server's; its SVD is post-processing)"),
    "rolora": ClippedUpload((".A", ".B"), received, by_examples,
                            "the factor trained this round (A or B), minus the global one"),
    "fedsa": ClippedUpload((".A",), received, by_examples,
                           "A of every module, minus the global A (B stays on the client; global_b: none)"),
}
"""Methods where client-level DP is defined, and what it clips."""

UNDEFINED: dict[str, str] = {
    "flexlora": "the server sums the clients' products B_k A_k and re-factorises them by SVD",
    "flora": "the server stacks the clients' factors (one block per client), no sum to noise",
    "hetlora": "the server truncates and sparsity-weights factors of different ranks",
    "hierfedlora": "clients of a group train one after another within a round, each on the last one's update",
    "fedex": "the server folds the residual Σ p_k B_k A_k − B̄ Ā of the clients' products into the base, "
             "which is not a clipped sum",
}
"""Methods where it is not defined, with the reason given in the one-line refusal."""


def deltas(spec: ClippedUpload, payload: Mapping[str, Tensor], tensors: Tensors) -> Tensors:
    """The clipped part of an upload minus its reference, in float32."""
    return {k: t.to(torch.float32) - spec.reference(payload, k, t).to(torch.float32)
            for k, t in tensors.items() if k.endswith(spec.clipped)}


def joint_norm(tensors: Mapping[str, Tensor]) -> float:
    """ℓ2 norm of all tensors together, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors.values():
        total += torch.linalg.vector_norm(t, dtype=torch.float64) ** 2
    return float(total.sqrt())


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / ‖Δ‖): the scale that brings a delta inside the ball of radius C."""
    return 1.0 if norm <= clip_norm else clip_norm / norm
