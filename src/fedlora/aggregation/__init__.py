"""The aggregation pipeline around a method: secure sum → attack → screening → robust combine → privacy.

`build_pipeline(method, cfg)` is called at the one place a runtime builds its method
(`runtime.inprocess.Federation.build`, which the Flower ServerApp and ClientApp use too).
The stage protocol, and how to add a stage: `fedlora.aggregation.base`.

    SLOTS   slot name → factory(cfg) → functools.partial(StageClass, **options), or None when the
            config does not ask for that stage; in ORDER, outermost first (the dict's order)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from fedlora.aggregation.attack import LabelFlip, UploadAttack, choose_attackers
from fedlora.aggregation.base import Undefined, Verdict, Wrapper, screen, stage_names
from fedlora.aggregation.options import AggregationConfig, AttackConfig
from fedlora.aggregation.privacy import ClientLevelDP, SampleLevelDP
from fedlora.aggregation.robust import RobustCombine
from fedlora.aggregation.secagg import SecureSum, secure_sum_refusal
from fedlora.aggregation.screening import NormBound
from fedlora.algorithms.base import Algorithm

__all__ = ["AggregationConfig", "AttackConfig", "SLOTS", "Undefined", "Verdict", "Wrapper", "build_pipeline",
           "check_pipeline", "screen", "stage_names"]

Stage = Callable[[Algorithm], Wrapper]
DEFAULT_BOUND = 10.0
"""What an `under_bound` attacker aims under when the server has no norm bound."""


def secure_sum_stage(cfg: Any) -> Stage | None:
    """Secure aggregation (`privacy.secure_aggregation`): outermost, so that it hides whatever the
    client uploads (an attacker's too) and the server's stages see only the sum."""
    p = getattr(cfg, "privacy", None)
    return partial(SecureSum) if p is not None and p.secure_aggregation else None


def attack_stage(cfg: Any) -> Stage | None:
    a = cfg.attack
    if a.kind == "none":
        return None
    attackers = choose_attackers(cfg.federation.num_clients, a.attackers, cfg.seed if a.seed is None else a.seed)
    if a.kind == "label_flip":
        return partial(LabelFlip, attackers=attackers)
    bound = a.bound or cfg.aggregation.norm_bound or DEFAULT_BOUND
    return partial(UploadAttack, attackers=attackers, kind=a.kind, scale=a.scale, noise_scale=a.noise_scale,
                   margin=a.margin, bound=bound)


def screening_stage(cfg: Any) -> Stage | None:
    agg = cfg.aggregation
    if agg.norm_bound is None:
        return None
    return partial(NormBound, bound=agg.norm_bound, action=agg.norm_action)


def combine_stage(cfg: Any) -> Stage | None:
    agg = cfg.aggregation
    if agg.combine == "mean":
        return None
    return partial(RobustCombine, kind=agg.combine, trim=agg.trim, byzantine=agg.byzantine, select=agg.select)


def privacy_stage(cfg: Any) -> Stage | None:
    """Client-level DP or DP-SGD (fedlora.aggregation.privacy); its σ is set by the runtime."""
    p = getattr(cfg, "privacy", None)  # a partial config (tests) has no privacy section
    if p is None:
        return None
    if p.mode == "client":
        per_round = max(1, int(cfg.federation.fraction * cfg.federation.num_clients + 0.5))
        return partial(ClientLevelDP, seed=cfg.seed, on_client=p.noise == "client", planned_clients=per_round)
    if p.mode == "sample":
        return partial(SampleLevelDP, seed=cfg.seed)
    return None


SLOTS: dict[str, Callable[[Any], Stage | None]] = {
    "secure_sum": secure_sum_stage,
    "attack": attack_stage,
    "screening": screening_stage,
    "combine": combine_stage,
    "privacy": privacy_stage,
}


def build_pipeline(method: Algorithm, cfg: Any) -> Algorithm:
    """`method` inside the stages `cfg` asks for (none: the method itself, untouched). Every
    stage checks it is defined for the method before anything is wrapped (Undefined, one line)."""
    stages = [stage for factory in SLOTS.values() if (stage := factory(cfg)) is not None]
    algorithm = method
    for stage in reversed(stages):  # innermost first
        algorithm = stage(algorithm)
    return algorithm


def check_pipeline(cfg: Any) -> None:
    """The config's stages against its method, before any model loads: Undefined (one line) for
    the first undefined combination; also what a stage needs of the rest of the config."""
    if cfg.attack.attackers > cfg.federation.num_clients:
        raise Undefined(f"attack.attackers: {cfg.attack.attackers} of federation.num_clients="
                        f"{cfg.federation.num_clients} clients")
    method = cfg.algorithm.name
    for factory in SLOTS.values():
        stage = factory(cfg)
        if stage is not None:
            stage.func.check(method)
    why = secure_sum_refusal(cfg) if secure_sum_stage(cfg) is not None else None
    if why:
        raise Undefined(why)
    if cfg.attack.kind == "label_flip" and cfg.data.task != "classification":
        raise Undefined(f"attack.kind: label_flip needs class labels; data.task is {cfg.data.task}")

