"""The `aggregation:` and `attack:` sections of a run's config (fedlora.config imports them).

Which method each choice is defined for is the stages' business (`fedlora.aggregation.check_pipeline`,
called by the config); here only what each field may hold on its own.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from fedlora.schema import Strict

COMBINES = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
ATTACKS = ("none", "sign_flip", "scale", "gaussian", "label_flip", "under_bound")


class Section(Strict):
    """Unknown keys and non-finite floats refused (fedlora.schema), assignments validated."""

    model_config = ConfigDict(validate_assignment=True)


class AggregationConfig(Section):
    """How the server screens and combines the clients' updates (docs/concepts/robustness.md)."""

    norm_bound: float | None = Field(10.0, gt=1, allow_inf_nan=False)
    """Screening: an update whose norm exceeds norm_bound × the median update norm of its round is
    rejected or clipped (`norm_action`); None: no norm bound."""
    norm_action: Literal["reject", "clip"] = "reject"
    """`reject`: the update is left out of the round; `clip`: it is scaled down to the bound."""
    combine: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"] = "mean"
    """How the screened updates are combined: `mean` (the method's own aggregation, unchanged);
    `median` (coordinate-wise, unweighted) and `trimmed_mean` (coordinate-wise, data-weighted,
    dropping `trim` at each end) computed on what the method averages, then aggregated by the
    method as one update; `krum` / `multi_krum`: the method aggregates only the update(s) closest
    to their neighbours. Per method, what each acts on: docs/concepts/robustness.md."""
    trim: float = Field(0.1, gt=0, lt=0.5, allow_inf_nan=False)
    """combine `trimmed_mean`: share of the updates dropped at each end, per coordinate (⌊trim·K⌋)."""
    byzantine: int = Field(1, ge=0)
    """combine `krum` / `multi_krum`: f, the number of attackers assumed; an update's score sums
    the squared distances to its K − f − 2 nearest others (at least one)."""
    select: int | None = Field(None, ge=1)
    """combine `multi_krum`: how many updates of lowest score the method aggregates (None: K − f)."""

    @model_validator(mode="before")
    @classmethod
    def _old_trimmed_mean_key(cls, tree: Any) -> Any:
        """`trimmed_mean: x` (before the pipeline) still works: combine trimmed_mean with trim x."""
        if not isinstance(tree, dict) or "trimmed_mean" not in tree:
            return tree
        tree = dict(tree)
        value = tree.pop("trimmed_mean")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not 0 <= value < 0.5:
            raise ValueError(f"aggregation.trimmed_mean: {value!r} is not in [0, 0.5) (the key is now "
                             "aggregation.combine: trimmed_mean with aggregation.trim)")
        if value == 0:
            return tree
        if tree.get("combine", "trimmed_mean") != "trimmed_mean" or "trim" in tree:
            raise ValueError("aggregation.trimmed_mean: conflicts with aggregation.combine/trim (the key is now "
                             "aggregation.combine: trimmed_mean with aggregation.trim)")
        return {**tree, "combine": "trimmed_mean", "trim": value}

    @model_validator(mode="after")
    def _options_fit_the_combine(self) -> AggregationConfig:
        if self.select is not None and self.combine != "multi_krum":
            raise ValueError(f"aggregation.select: only for combine multi_krum, not {self.combine}")
        return self


class AttackConfig(Section):
    """Simulated adversaries: `attackers` of the clients, a seeded choice, change what they send
    (docs/concepts/robustness.md). For measuring defences; `none` by default."""

    kind: Literal["none", "sign_flip", "scale", "gaussian", "label_flip", "under_bound"] = "none"
    """`sign_flip`: the change the client made is reversed; `scale`: multiplied by `scale`;
    `gaussian`: replaced by Gaussian noise (`noise_scale`); `label_flip`: the client trains on
    its data with every class index y replaced by (y + 1) mod C; `under_bound`: the reversed change
    boosted until the upload's norm is `margin` × the norm bound × its honest norm."""
    attackers: int = Field(0, ge=0)
    """How many clients attack (k of federation.num_clients)."""
    seed: int | None = None
    """Seed of the choice of attackers (None: the run's seed)."""
    scale: float = Field(10.0, allow_inf_nan=False)
    """kind `scale`: the factor c of the change (c = −1 is sign_flip)."""
    noise_scale: float = Field(10.0, gt=0, allow_inf_nan=False)
    """kind `gaussian`: the noise's per-coordinate standard deviation, in units of the honest
    change's root mean square (per tensor)."""
    margin: float = Field(0.95, gt=0, lt=1, allow_inf_nan=False)
    """kind `under_bound`: the upload's norm as a share of the bound it aims under."""
    bound: float | None = Field(None, gt=1, allow_inf_nan=False)
    """kind `under_bound`: the norm bound aimed under, × the attacker's own honest upload norm (its
    estimate of the round's median); None: aggregation.norm_bound (10 when that is None)."""

    @model_validator(mode="after")
    def _someone_attacks(self) -> AttackConfig:
        if self.kind == "none" and self.attackers:
            raise ValueError(f"attack.attackers: {self.attackers} with attack.kind none; set attack.kind")
        if self.kind != "none" and not self.attackers:
            raise ValueError(f"attack.attackers: 0 clients attack with attack.kind {self.kind}; set attack.attackers")
        return self
