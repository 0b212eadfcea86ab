"""Secure aggregation's arithmetic: what a client adds to the secure sum, and the method's
aggregate from that sum alone (`privacy.secure_aggregation`; the protocol that hides each
summand from the server is the runtime's: `fedlora.flower.secagg`).

For FedIT, FFA-LoRA and AFLoRA the server's step is Σ_k p_k v_k over the view v_k the method
averages (`fedlora.aggregation.robust.VIEWS`: the factors; AFLoRA's zero-padded B'Λ) with
p_k = w_k / Σ_j w_j, where client k knows its own w_k (its example count; AFLoRA: log(1 + r_k)
times it, per module, eq. 12). So client k adds [w_k v_k, w_k] to the sum, and the server takes
Σ w_k v_k / Σ w_k: exactly the method's weighted sum, also over the clients that are left when
some drop out. (The w_k are scaled by 1 / Σ|D|, public and sent in the payload, so that they
stay near 1.) The method then aggregates that one consensus update of weight 1 (its weighted
sum is the identity), and whatever it does after (AFLoRA's fine-tuning of A) runs unchanged.

Numbers are summed in fixed point modulo 2^64: v ↦ round(v · 2^40) as a 64-bit integer, so the
sum of the integers is exact and a sum of at most 2^10 clients with |w v| ≤ 2^12 cannot wrap.
The one error is the rounding: each client's summand is off by at most 2^-41 per coordinate, so
the decoded view is within m · 2^-41 · (1 + |v|) / Σ_k w_k of the exact one (m clients summed).

The other methods cannot use it (`UNSUMMABLE`) or have not been checked (`NOT_CHECKED`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from fedlora.aggregation.base import Wrapper, find_stage
from fedlora.aggregation.robust import TILT_KEYS, VIEWS, aflora_padded
from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientContext,
    InvalidUpdate,
    Message,
    ServerContext,
    Tensors,
    Update,
)

FRACTION_BITS = 40
"""Fixed point: a value v travels as round(v · 2^40), a 64-bit integer."""
LIMIT = 2.0**12
"""The largest |w_k v_k| a client may add: with at most 2^10 clients the sum stays below 2^22,
well inside the 2^63 / 2^40 = 2^23 a signed 64-bit fixed-point number holds."""
MAX_CLIENTS = 2**10
SCALE = "secagg_weight_scale"
"""Payload config key: 1 / Σ|D| (public), by which each client scales its weight w_k."""
WEIGHT = "weight"
"""The summand's key of w_k (FedIT, FFA-LoRA; AFLoRA has one per module: `{module}.weight`)."""

UNSUMMABLE: dict[str, str] = {
    "flexlora": "its server re-factorises Σ_k p_k B_k A_k by SVD: a sum, but of m × n products, not of the "
                "factors the clients upload",
    "flora": "its server stacks every client's own A_k and B_k side by side: it needs each individual update",
    "hetlora": "its weights are the norms of the individual updates, which the server must not see",
}
"""Methods whose server step is not a sum of what the clients upload."""
NOT_CHECKED: dict[str, str] = {
    "hierfedlora": "clients of a group train one after another within a round, each on the last one's update",
    "fedex": "it folds Σ p_k B_k A_k − B̄ Ā into the base: products of each client's factors, not a sum of uploads",
    "fedsa": "not checked yet: no test shows the secure sum gives its aggregate",
    "fedsvd": "not checked yet: no test shows the secure sum gives its aggregate",
    "rolora": "not checked yet: no test shows the secure sum gives its aggregate",
}


# -- fixed point modulo 2^64 --------------------------------------------------------------------

def encode(summand: Tensors) -> Tensors:
    """Each value as round(v · 2^40) in an int64 tensor (the bits of a number modulo 2^64).
    ValueError (one line) for a value that is not finite or beyond ±LIMIT."""
    out = {}
    for key, t in summand.items():
        # (not mutated: v · 2^40 of a float32 or bfloat16 is exact in its own dtype, so the cast changes nothing)
        x = t.to(torch.float64)  # pragma: no mutate
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"secure aggregation: {key} is not finite; not uploaded")
        if x.numel() and float(x.abs().max()) > LIMIT:
            raise ValueError(f"secure aggregation: |{key}| reaches {float(x.abs().max()):.4g}, beyond the "
                             f"fixed-point limit {LIMIT:g}; not uploaded")
        out[key] = torch.round(x * 2.0**FRACTION_BITS).to(torch.int64)
    return out


def as_words(t: Tensor) -> np.ndarray:
    """An int64 tensor's bits as numpy uint64 (where sums wrap modulo 2^64, as they must)."""
    return t.detach().contiguous().numpy().view(np.uint64)


def modular_sum(summands: list[Tensors]) -> dict[str, np.ndarray]:
    """Σ_k of the encoded (or masked) summands, modulo 2^64, as uint64 arrays."""
    total = {k: np.zeros(t.shape, dtype=np.uint64) for k, t in summands[0].items()}
    for s in summands:
        for k in total:
            total[k] += as_words(s[k])
    return total


def decode(words: np.ndarray) -> Tensor:
    """A sum modulo 2^64 back to its (signed) value, in float64."""
    signed = words.view(np.int64).astype(np.float64)  # pragma: no mutate (astype(None) is float64 too)
    return torch.from_numpy(signed / 2.0**FRACTION_BITS)


# -- what each method sums ----------------------------------------------------------------------

@dataclass(frozen=True)
class Summable:
    """One method's secure sum: the client's summand [w v, w] and the view Σ w v / Σ w."""

    what: str
    summand: Callable[[Algorithm, Update, float], Tensors]
    """(method, the client's upload, scale) → the float64 tensors it adds to the sum."""
    view: Callable[[Algorithm, Tensors], Tensors]
    """(method, the decoded sum) → the method's view of the weighted mean (float32)."""
    shapes: Callable[[Algorithm, Tensors], dict[str, tuple[int, ...]]]
    """(method, the global state) → the summand's keys and shapes (what the server checks)."""


def examples_summand(method: Algorithm, update: Update, scale: float) -> Tensors:
    """FedIT, FFA-LoRA: w = |D_k| · scale; the uploaded factors times w, and w."""
    w = update.num_examples * scale
    out = {k: t.to(torch.float64) * w for k, t in update.tensors.items()}
    out[WEIGHT] = torch.tensor([w], dtype=torch.float64)
    return out


def examples_view(method: Algorithm, summed: Tensors) -> Tensors:
    w = summed[WEIGHT]
    return {k: (t / w).to(torch.float32) for k, t in summed.items() if k != WEIGHT}


def state_shapes(method: Algorithm, state: Tensors) -> dict[str, tuple[int, ...]]:
    """FedIT, FFA-LoRA: the client uploads every tensor of the global state (its factors)."""
    return {**{k: tuple(v.shape) for k, v in state.items()}, WEIGHT: (1,)}


def aflora_weight(method: Algorithm, rank: int, num_examples: int, scale: float) -> float:
    """Eq. 12's unnormalised weight: log(1 + r_k) |D_k| (`weighting: data`: |D_k|), scaled."""
    log_rank = math.log1p(rank) if method.options.weighting == "normalized" else 1.0
    return log_rank * num_examples * scale


def aflora_summand(method: Algorithm, update: Update, scale: float) -> Tensors:
    """AFLoRA: per module, the zero-padded B'Λ times that module's w (its rank: its mask's sum)."""
    padded = aflora_padded(method, update)
    out: Tensors = {}
    for name in method.setup.module_shapes:
        w = aflora_weight(method, int(update.tensors[f"{name}.mask"].sum()), update.num_examples, scale)
        out[f"{name}.B"] = padded[f"{name}.B"].to(torch.float64) * w
        out[f"{name}.{WEIGHT}"] = torch.tensor([w], dtype=torch.float64)
    return out


def aflora_view(method: Algorithm, summed: Tensors) -> Tensors:
    return {f"{name}.B": (summed[f"{name}.B"] / summed[f"{name}.{WEIGHT}"]).to(torch.float32)
            for name in method.setup.module_shapes}


def aflora_shapes(method: Algorithm, state: Tensors) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, (m, _) in method.setup.module_shapes.items():
        out[f"{name}.B"] = (m, method.r_max)
        out[f"{name}.{WEIGHT}"] = (1,)
    return out


SUMMABLE: dict[str, Summable] = {
    "fedit": Summable("A and B of every module, times |D_k|", examples_summand, examples_view, state_shapes),
    "ffa": Summable("B of every module, times |D_k| (A is frozen)", examples_summand, examples_view, state_shapes),
    "aflora": Summable("the zero-padded B'Λ of every module, times log(1 + r_k) |D_k|", aflora_summand,
                       aflora_view, aflora_shapes),
}
"""Methods whose server step is a weighted sum of the uploads, and what their clients add."""


Unmask = Callable[[list[int], dict[str, tuple[int, ...]]], dict[str, np.ndarray]]
"""(the clients whose masked summands the server kept, the summand's shapes) → the sum of
the masks in those summands, modulo 2^64 (the runtime's protocol recovers it)."""


class SecureSum(Wrapper):
    """The outermost stage: the client uploads its encoded summand (the runtime masks it), the
    server gets the method's aggregate from the unmasked sum alone."""

    FIELD = "privacy.secure_aggregation"
    ACTS_ON = {name: s.what for name, s in SUMMABLE.items()}
    REFUSED = {**UNSUMMABLE, **NOT_CHECKED}

    def __init__(self, inner: Algorithm) -> None:
        super().__init__(inner)
        self.unmask: Unmask | None = None
        """Set by the runtime for each round (Flower: the protocol's last step)."""

    def label(self) -> str:
        return "secure aggregation"

    def payload(self, state: Tensors, client_id: int) -> Message:
        msg = self.inner.payload(state, client_id)
        return Message(msg.tensors, {**msg.config, SCALE: 1.0 / sum(self.setup.num_examples)})

    def client_train(self, ctx: ClientContext, payload: Message, client_state: Tensors) -> tuple[Update, Tensors]:
        config = dict(payload.config)
        scale = float(config.pop(SCALE))
        update, new_state = self.inner.client_train(ctx, Message(payload.tensors, config), client_state)
        summand = SUMMABLE[self.name].summand(self.method, update, scale)
        return replace(update, tensors=encode(summand)), new_state

    def summand_shapes(self, state: Tensors) -> dict[str, tuple[int, ...]]:
        return SUMMABLE[self.name].shapes(self.method, state)

    def validate(self, state: Tensors, update: Update) -> None:
        """A masked summand can only be checked for its form: its keys, shapes and dtype."""
        expected = self.summand_shapes(state)
        if set(update.tensors) != set(expected):
            missing = sorted(set(expected) ^ set(update.tensors))
            raise InvalidUpdate(f"secure aggregation: summand keys differ from the method's ({missing[0]})")
        for key, shape in expected.items():
            t = update.tensors[key]
            if t.dtype != torch.int64 or tuple(t.shape) != shape:
                raise InvalidUpdate(f"{key}: expected int64 {shape}, got {t.dtype} {tuple(t.shape)}")

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        if self.unmask is None:
            raise RuntimeError("secure aggregation: the runtime gave no way to unmask the sum")
        if len(updates) > MAX_CLIENTS:
            raise RuntimeError(f"secure aggregation: {len(updates)} clients, more than the {MAX_CLIENTS} "
                               "whose fixed-point sum cannot wrap")
        shapes = self.summand_shapes(state)
        total = modular_sum([u.tensors for u in updates])
        masks = self.unmask([u.client_id for u in updates], shapes)
        summed = {k: decode(total[k] - masks[k]) for k in shapes}
        weights = [t for k, t in summed.items() if k.split(".")[-1] == WEIGHT]
        if not all(bool((w > 0).all()) for w in weights):
            raise RuntimeError("secure aggregation: the unmasked sum of the weights is not positive "
                               "(a client's masks or shares were wrong)")
        view = VIEWS[self.name]
        combined = SUMMABLE[self.name].view(self.method, summed)
        agg = self.inner.aggregate(state, [view.consensus(self.method, updates, combined)], server)
        return replace(agg, metrics={k: v for k, v in agg.metrics.items() if k not in TILT_KEYS})


def secure_sum(algorithm: Algorithm) -> SecureSum | None:
    """The pipeline's secure-aggregation stage, if it has one."""
    return find_stage(algorithm, SecureSum)


def secure_sum_refusal(cfg) -> str | None:
    """Why secure aggregation is undefined with the rest of this config (one line), or None."""
    agg, p = cfg.aggregation, cfg.privacy
    per_round = max(1, int(cfg.federation.fraction * cfg.federation.num_clients + 0.5))
    if per_round < 3:
        return (f"privacy.secure_aggregation: needs at least 3 clients per round, the config has {per_round} "
                "(with 2, each client learns the other's update from the sum)")
    if per_round > MAX_CLIENTS:
        return f"privacy.secure_aggregation: at most {MAX_CLIENTS} clients per round, the config has {per_round}"
    if agg.combine != "mean":
        return (f"privacy.secure_aggregation: aggregation.combine {agg.combine} needs every individual update, "
                "which secure aggregation hides from the server")
    if agg.norm_bound is not None:
        return ("privacy.secure_aggregation: aggregation.norm_bound screens every individual update, which "
                "secure aggregation hides from the server; set it to null")
    if p.mode == "client":
        return ("privacy.secure_aggregation: with client-level DP the server clips each upload (noise: server) "
                "or averages with equal weights (noise: client); neither is wired to the secure sum yet")
    if cfg.algorithm.name == "aflora" and getattr(cfg.algorithm, "weighting", None) == "paper-literal":
        return ("privacy.secure_aggregation: aflora's weighting paper-literal (a product of two shares) is not "
                "a ratio of sums the clients can add; use normalized or data")
    return None
