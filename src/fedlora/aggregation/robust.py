"""Robust combines: coordinate-wise median, trimmed mean, Krum and Multi-Krum around a method.

Each works on a *view* of the updates: what the method itself averages, the same shape for every
client, so heterogeneous ranks meet in one space:

    FedIT, FFA-LoRA   the uploaded factors (one rank for everyone)
    AFLoRA            the zero-padded B'_k: m × r_max, zeros where h = 0 and beyond the client's rank
    HETLoRA           the zero-padded A_k (r_max × n) and B_k (m × r_max)
    FlexLoRA, FLoRA   each client's ΔW_k = B_k A_k (m × n; the product, so no padding is needed)
    FedSA-LoRA, FedSVD, RoLoRA   the uploaded factors (one rank)
    HierFedLoRA       refused: its aggregate is a mean per group, then per layer over the groups
                      whose depth covers it; clients of different depths upload different modules
    FedEx-LoRA        refused: it folds Σ p_k B_k A_k − B̄ Ā into the base; a statistic of the
                      factors drops that residual and a product does not fit its rank-r state

A zero-padded coordinate counts as a value (0), as in the method's own weighted sum: a median
over mostly low-rank clients pulls the high-rank columns towards zero, as their mean does.

- `median` and `trimmed_mean` compute the statistic per coordinate of the view, then hand the
  method ONE consensus update whose own aggregation gives exactly that statistic (its weight is
  1, so the method's weighted sum is the identity, bit for bit); the method's server step
  (AFLoRA's A fine-tuning, FlexLoRA's SVD, FLoRA's merge) runs on it as usual. The median is
  unweighted (the mean of the two middle values for an even count); the trimmed mean weights the
  kept values by |D_k|, renormalised per coordinate (the former `aggregation.trimmed_mean`).
  The method's per-client tilt metrics are dropped: there is one update, not a sum of clients.
- `krum` / `multi_krum` score each update by the summed squared distances (in the view) to its
  K − f − 2 nearest others (at least one) and hand the method the real updates of lowest score
  (1, or `select`, default K − f; ties: the lower position), which it aggregates with its own
  weights. Blanchard et al. (NeurIPS 2017); Flower's Krum and MultiKrum strategies do the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedlora.aggregation.base import Wrapper
from fedlora.algorithms.aflora import zero_pad
from fedlora.algorithms.base import Aggregate, Algorithm, ServerContext, Tensors, Update, data_weights, weighted_sum
from fedlora.algorithms.hetlora import RANKS, pad_columns, pad_rows

TILT_KEYS = ("client_weight", "delta_share")


# -- the statistics ---------------------------------------------------------------------------

def coordinate_median(tensors: list[Tensor]) -> Tensor:
    """Per coordinate, the middle value (the mean of the two middle ones for an even count)."""
    values = torch.stack([t.to(torch.float32) for t in tensors]).sort(dim=0).values
    k = len(tensors)
    if k % 2:
        return values[k // 2]
    return (values[k // 2 - 1] + values[k // 2]) / 2


def trimmed_mean(tensors: list[Tensor], weights: list[float], trim: float) -> Tensor:
    """Coordinate-wise weighted trimmed mean: per coordinate, drop the ⌊trim·K⌋ smallest and
    ⌊trim·K⌋ largest of the K values, average the rest with their weights renormalised. With
    nothing to drop (⌊trim·K⌋ = 0) it is `weighted_sum`, bit for bit."""
    cut = int(trim * len(tensors))
    if cut == 0:
        return weighted_sum(tensors, weights)
    values = torch.stack([t.to(torch.float32) for t in tensors])
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    order = values.argsort(dim=0)
    kept = slice(cut, len(tensors) - cut)
    v, wk = values.gather(0, order)[kept], w.gather(0, order)[kept]
    return (v * wk).sum(0) / wk.sum(0)


def krum_scores(vectors: list[Tensor], byzantine: int) -> list[float]:
    """Each vector's summed squared distance to its K − f − 2 nearest others (at least one;
    fewer when there are fewer others), in float64."""
    flat = [v.to(torch.float64).flatten() for v in vectors]
    nearest = max(1, len(flat) - byzantine - 2)
    scores = []
    for i, x in enumerate(flat):
        d2 = sorted(float((x - y).pow(2).sum()) for j, y in enumerate(flat) if j != i)
        scores.append(sum(d2[:nearest]))
    return scores


def krum_select(scores: list[float], select: int) -> list[int]:
    """Positions of the `select` lowest scores (ties: the lower position), in order."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(ranked[:select])


# -- what each method's updates look like to a combine -------------------------------------------

def as_uploaded(method: Algorithm, update: Update) -> Tensors:
    return dict(update.tensors)


def as_one_update(method: Algorithm, updates: list[Update], combined: Tensors) -> Update:
    return Update(updates[0].client_id, combined, updates[0].num_examples)


def aflora_padded(method: Algorithm, update: Update) -> Tensors:
    return {f"{name}.B": zero_pad(update.tensors[f"{name}.B"], update.tensors[f"{name}.mask"], method.r_max)
            for name in method.setup.module_shapes}


def aflora_one_update(method: Algorithm, updates: list[Update], combined: Tensors) -> Update:
    """Full rank, every column active: zero_pad is the identity and eq. 12's weight is 1."""
    masks = {f"{name}.mask": torch.ones(method.r_max) for name in method.setup.module_shapes}
    return Update(updates[0].client_id, {**combined, **masks}, updates[0].num_examples)


def hetlora_padded(method: Algorithm, update: Update) -> Tensors:
    out: Tensors = {}
    for name in method.setup.module_shapes:
        out[f"{name}.A"] = pad_rows(update.tensors[f"{name}.A"], method.r_max)
        out[f"{name}.B"] = pad_columns(update.tensors[f"{name}.B"], method.r_max)
    return out


def hetlora_ranks(method: Algorithm, state: Tensors, updates: list[Update], new: Tensors) -> Tensors:
    """The server's record of each client's rank comes from the real uploads, not the consensus."""
    return {**new, RANKS: method.tracked_ranks(state, updates)}


def product(method: Algorithm, update: Update) -> Tensors:
    """Each module's ΔW_k = B_k A_k (without the scaling s), m × n whatever the client's rank."""
    return {name: update.tensors[f"{name}.B"].to(torch.float32) @ update.tensors[f"{name}.A"].to(torch.float32)
            for name in method.setup.module_shapes}


def product_one_update(method: Algorithm, updates: list[Update], combined: Tensors) -> Update:
    """B = the combined ΔW, A = I (n × n): the method's Σ p B A with p = 1 is ΔW exactly. The
    client named is the lowest-rank participant (FlexLoRA reports its truncation error)."""
    ranks = method.setup.client_max_ranks
    client = min(updates, key=lambda u: (ranks[u.client_id], u.client_id))
    tensors: Tensors = {}
    for name, (_, n) in method.setup.module_shapes.items():
        tensors[f"{name}.B"] = combined[name]
        tensors[f"{name}.A"] = torch.eye(n)
    return Update(client.client_id, tensors, client.num_examples)


def keep_state(method: Algorithm, state: Tensors, updates: list[Update], new: Tensors) -> Tensors:
    return new


@dataclass(frozen=True)
class View:
    """What a combine sees of one method's updates, and how its result goes back to the method."""

    acts_on: str
    vectors: Callable[[Algorithm, Update], Tensors]
    """One client's update as the method averages it: the same keys and shapes for every client."""
    consensus: Callable[[Algorithm, list[Update], Tensors], Update]
    """One update whose aggregation by the method (alone, weight 1) is the combined view."""
    finish: Callable[[Algorithm, Tensors, list[Update], Tensors], Tensors] = keep_state
    """Bookkeeping the method does from the real uploads (HETLoRA's ranks), on the new state."""


VIEWS: dict[str, View] = {
    "fedit": View("the factors A_k, B_k as uploaded (one rank)", as_uploaded, as_one_update),
    "ffa": View("B_k as uploaded (one rank; A is frozen and shared)", as_uploaded, as_one_update),
    "aflora": View("the zero-padded B'_k = pad(B_k Λ_k) (m × r_max)", aflora_padded, aflora_one_update),
    "hetlora": View("the zero-padded A_k (r_max × n) and B_k (m × r_max)", hetlora_padded, as_one_update,
                    hetlora_ranks),
    "flexlora": View("each client's ΔW_k = B_k A_k (m × n)", product, product_one_update),
    "flora": View("each client's ΔW_k = B_k A_k (m × n), merged as B = ΔW, A = I", product, product_one_update),
    "fedsa": View("the uploaded A_k (and B_k with global_b: mean) (one rank)", as_uploaded, as_one_update),
    "fedsvd": View("B_k as uploaded (one rank; A is the server's)", as_uploaded, as_one_update),
    "rolora": View("the factor trained this round (A_k or B_k) as uploaded (one rank)", as_uploaded, as_one_update),
}


class RobustCombine(Wrapper):
    """The method aggregates a robust statistic of the updates, or the most central of them."""

    FIELD = "aggregation.combine"
    ACTS_ON = {name: view.acts_on for name, view in VIEWS.items()}
    REFUSED = {"hierfedlora": "its aggregate is a mean per group, then per layer over the groups whose "
                              "depth covers it (clients upload different modules); use the norm bound",
               "fedex": "it folds the residual Σ p_k B_k A_k − B̄ Ā into the base: a statistic of the factors "
                        "drops it, and one of the products does not fit its rank-r state; use the norm bound"}

    def __init__(self, inner: Algorithm, kind: str, trim: float = 0.1, byzantine: int = 1,
                 select: int | None = None) -> None:
        self.kind, self.trim, self.byzantine, self.select = kind, trim, byzantine, select
        super().__init__(inner)

    def label(self) -> str:
        if self.kind == "trimmed_mean":
            return f"trimmed_mean {self.trim:g}"
        if self.kind in ("krum", "multi_krum"):
            return f"{self.kind} (f={self.byzantine})"
        return self.kind

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        view = VIEWS[self.name]
        vectors = [view.vectors(self.method, u) for u in updates]
        if self.kind in ("krum", "multi_krum"):
            return self._krum(state, updates, vectors, server)
        if self.kind == "median":
            combined = {key: coordinate_median([v[key] for v in vectors]) for key in vectors[0]}
        else:
            p = data_weights(updates)
            combined = {key: trimmed_mean([v[key] for v in vectors], p, self.trim) for key in vectors[0]}
        agg = self.inner.aggregate(state, [view.consensus(self.method, updates, combined)], server)
        metrics = {k: v for k, v in agg.metrics.items() if k not in TILT_KEYS}
        return replace(agg, state=view.finish(self.method, state, updates, agg.state), metrics=metrics)

    def _krum(self, state: Tensors, updates: list[Update], vectors: list[Tensors],
              server: ServerContext) -> Aggregate:
        flat = [torch.cat([v[key].flatten() for key in sorted(v)]) for v in vectors]
        scores = krum_scores(flat, self.byzantine)
        keep = 1 if self.kind == "krum" else self.select or len(updates) - self.byzantine
        chosen = krum_select(scores, min(max(keep, 1), len(updates)))
        agg = self.inner.aggregate(state, [updates[i] for i in chosen], server)
        agg = replace(agg, state=VIEWS[self.name].finish(self.method, state, updates, agg.state))
        ids = [str(u.client_id) for u in updates]
        agg.metrics["krum_score"] = dict(zip(ids, scores))
        agg.metrics["krum_selected"] = {cid: float(i in chosen) for i, cid in enumerate(ids)}
        return agg
