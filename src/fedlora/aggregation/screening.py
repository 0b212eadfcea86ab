"""Screening: the norm bound, each update against the others of its round (stage).

An update whose norm exceeds norm_bound × the median norm of the updates screened with it (the
lower median for an even count; a method with intra-round stages: those of its stage) is
rejected, or with norm_action `clip` scaled down to the bound. With a zero median (nothing
trained) there is no scale to compare with and every update passes.

It measures what the client uploads, as sent: for the methods that upload factors which start
from the server's (FedIT, FFA-LoRA after round 1, FlexLoRA, HETLoRA, HierFedLoRA) that is the
factors, not the change the client made to them, so a change small next to the factors passes
whatever its direction (docs/concepts/robustness.md, threat model).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedlora.aggregation.base import Verdict, Wrapper
from fedlora.algorithms.base import Algorithm, Tensors, Update
from fedlora.privacy.uploads import joint_norm


def update_norm(tensors: Tensors, unbounded: tuple[str, ...] = ()) -> float:
    """ℓ2 norm of all uploaded tensors together (in float64: no overflow), except those whose
    name ends with one of `unbounded` (e.g. AFLoRA's 0/1 masks)."""
    return joint_norm({k: t for k, t in tensors.items() if not k.endswith(unbounded)})


class NormBound(Wrapper):
    """Reject (or clip) the updates whose norm is an outlier in their round."""

    FIELD = "aggregation.norm_bound"
    ACTS_ON = {
        "aflora": "the uploaded B'_k = B_k Λ_k (not the 0/1 masks)",
        "fedit": "the uploaded factors A_k, B_k (not their change from the global ones)",
        "ffa": "the uploaded B_k (not its change from the global B)",
        "flora": "the uploaded A_k (fresh each round) and B_k (from zero)",
        "flexlora": "the uploaded factors B_k, A_k (not their change from the client's truncation)",
        "hetlora": "the uploaded factors A_k, B_k at the client's current rank",
        "hierfedlora": "the uploaded factors of the trained modules, per stage",
    }
    DEFAULT = "every uploaded tensor but the method's `unbounded_keys`"

    def __init__(self, inner: Algorithm, bound: float, action: str) -> None:
        self.bound, self.action = bound, action
        super().__init__(inner)

    def label(self) -> str:
        return f"norm bound {self.bound:g} ({self.action})"

    def screen(self, updates: list[Update]) -> list[Verdict]:
        return self.pass_inward(self.bound_norms(updates))

    def bound_norms(self, updates: list[Update]) -> list[Verdict]:
        if not updates:
            return []
        unbounded = self.unbounded_keys
        norms = [update_norm(u.tensors, unbounded) for u in updates]
        median = float(torch.tensor(norms, dtype=torch.float64).median())
        bound = self.bound * median
        verdicts = []
        for u, norm in zip(updates, norms):
            if median == 0 or norm <= bound:
                verdicts.append(Verdict(u))
                continue
            why = f"update norm {norm:.4g} exceeds {self.bound:g} × the round's median update norm {median:.4g}"
            if self.action == "reject":
                verdicts.append(Verdict(None, why))
                continue
            scale = bound / norm
            tensors = {k: t if k.endswith(unbounded) else t * scale for k, t in u.tensors.items()}
            verdicts.append(Verdict(replace(u, tensors=tensors), f"{why}; scaled by {scale:.3g}"))
        return verdicts
