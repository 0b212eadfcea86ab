"""The privacy slot of the aggregation pipeline: client-level DP and sample-level DP-SGD.

Two stages, innermost (right around the method), the way Flower's
`DifferentialPrivacyServerSideFixedClipping(strategy)` wraps a strategy:

- `ClientLevelDP` (`privacy.mode: client`): each upload's round delta is clipped (what, per
  method: `fedlora.privacy.uploads`), on the server (`noise: server`) or on the client
  (`noise: client`, which also adds the client's share of the noise). On the server the stage
  forms the method's own weighted sum Σ_k p_k t_k of the clipped uploads on the view the
  method averages (`fedlora.aggregation.robust.VIEWS`: the factors, AFLoRA's zero-padded B'Λ),
  adds N(0, (σ_Δ C max_k p_k)²), and hands the method that sum as one update of weight 1, so
  the method's server step (AFLoRA's fine-tuning of A, the merge) is post-processing of a
  private release. The per-client tilt diagnostics are not recorded.
- `SampleLevelDP` (`privacy.mode: sample`): the clients train with DP-SGD
  (`fedlora.privacy.dpsgd`), for every method.

The run's privacy state (σ calibrated to the budget, the round, adaptive clipping's C) comes
from `PrivacyStage`, which the runtime builds once it knows the run's history, calls at the
start of every round, and asks for each round's record (ε at δ, …).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fedlora.aggregation.base import Wrapper, find_stage
from fedlora.aggregation.robust import TILT_KEYS, VIEWS
from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientContext,
    Message,
    ServerContext,
    Tensors,
    Update,
    weighted_sum,
)
from fedlora.errors import ConfigError
from fedlora.privacy.budget import Budget, flat, plan_budget, recorded
from fedlora.privacy.client_level import (
    clip_upload,
    delta_noise_multiplier,
    next_clip_norm,
    noise_generator,
    noisy_weighted_sum,
)
from fedlora.privacy.dpsgd import SampleDP
from fedlora.privacy.uploads import CLIENT_LEVEL, UNDEFINED

COUNT_STREAM = 2**32 - 1
"""Noise stream (in place of a client id) of adaptive clipping's count."""


@dataclass
class RoundSettings:
    """What the stage needs of the run each round (set by PrivacyStage)."""

    round_: int = 0
    noise_multiplier: float | None = None
    """σ_Δ at client level (σ less the count's share), σ at sample level."""
    clip_norm: float = 1.0


class Private(Wrapper):
    """Common to both privacy stages: the round's settings, refused until the run sets them."""

    FIELD = "privacy.mode"

    def __init__(self, inner: Algorithm, seed: int) -> None:
        super().__init__(inner)
        self.seed = seed
        self.settings = RoundSettings()

    def _sigma(self) -> float:
        if self.settings.noise_multiplier is None:
            raise RuntimeError("the privacy stage has no noise multiplier: the runtime did not set up its budget")
        return self.settings.noise_multiplier


class ClientLevelDP(Private):
    """Clip each client's round delta; Gaussian noise on the method's weighted sum."""

    ACTS_ON = {name: spec.what for name, spec in CLIENT_LEVEL.items()}
    REFUSED = UNDEFINED

    def __init__(self, inner: Algorithm, seed: int, on_client: bool, planned_clients: int) -> None:
        super().__init__(inner, seed)
        self.on_client = on_client
        self.planned_clients = planned_clients
        self.spec = CLIENT_LEVEL[inner.name]
        self.unclipped: tuple[int, int] | None = None
        """(updates within C, updates) of the round's aggregation: adaptive clipping's count,
        released only noised."""

    def label(self) -> str:
        return f"client-level DP ({'client' if self.on_client else 'server'} noise)"

    def client_train(self, ctx: ClientContext, payload: Message, client_state: Tensors) -> tuple[Update, Tensors]:
        """`noise: client`: the upload leaves clipped and with the client's share of the noise,
        reporting whether it was clipped (adaptive clipping's count, noised at the server)."""
        update, new_state = self.inner.client_train(ctx, payload, client_state)
        if not self.on_client:
            return update, new_state
        s = self.settings
        std = self._sigma() * s.clip_norm / self.planned_clients**0.5
        out = clip_upload(self.spec, payload.tensors, update, s.clip_norm, std,
                          noise_generator(self.seed, s.round_, update.client_id))
        metrics = {**out.update.metrics, "dp_unclipped": float(out.unclipped)}
        return replace(out.update, metrics=metrics), new_state

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        method, view, s = self.method, VIEWS[self.name], self.settings
        if self.on_client:  # clipped and noised by the clients: equal weights, nothing to add
            self.unclipped = (sum(u.metrics.get("dp_unclipped") == 1.0 for u in updates), len(updates))
            # (not mutated: the views of fedit and ffa, the methods defined with client noise, ignore the method)
            vectors = [view.vectors(method, u) for u in updates]  # pragma: no mutate
            combined = {k: weighted_sum([v[k] for v in vectors], [1 / len(vectors)] * len(vectors))
                        for k in vectors[0]}
        else:
            clipped = [clip_upload(self.spec, method.payload(state, u.client_id).tensors, u, s.clip_norm)
                       for u in updates]
            self.unclipped = (sum(c.unclipped for c in clipped), len(clipped))
            vectors = [view.vectors(method, c.update) for c in clipped]
            p = self.spec.weights(method, [c.update for c in clipped])
            g = noise_generator(self.seed, s.round_)
            std = self._sigma() * s.clip_norm
            combined = {k: noisy_weighted_sum([v[k] for v in vectors], p, std, g) for k in sorted(vectors[0])}
        agg = self.inner.aggregate(state, [view.consensus(method, updates, combined)], server)
        metrics = {k: v for k, v in agg.metrics.items() if k not in TILT_KEYS}
        # (finish is keep_state for fedit, ffa and aflora, the methods the stage is defined for)
        state = view.finish(method, state, updates, agg.state)  # pragma: no mutate
        return replace(agg, state=state, metrics=metrics)


class SampleLevelDP(Private):
    """Every client trains with DP-SGD: per-example clipping and noise at every local step."""

    DEFAULT = "the per-example gradients of the factors each client trains (DP-SGD)"

    def label(self) -> str:
        return "sample-level DP (DP-SGD)"

    def client_train(self, ctx: ClientContext, payload: Message, client_state: Tensors) -> tuple[Update, Tensors]:
        s = self.settings
        ctx.dp = SampleDP(s.clip_norm, self._sigma(), noise_generator(self.seed, s.round_, ctx.client_id))
        return self.inner.client_train(ctx, payload, client_state)


def privacy_wrapper(algorithm: Algorithm) -> Private | None:
    """The pipeline's privacy stage, if it has one."""
    return find_stage(algorithm, Private)


@dataclass(frozen=True)
class PrivacyStage:
    """A run's DP: its Budget (σ, δ, ε so far), adaptive clipping's options, and the pipeline's
    privacy wrapper, which it sets up at the start of every round."""

    budget: Budget
    options: Any  # PrivacyConfig
    wrapper: Private
    count_noise: float | None
    seed: int

    @classmethod
    def build(cls, cfg: Any, algorithm: Algorithm, per_round: int, history: list[dict[str, Any]]) -> PrivacyStage | None:
        """None without DP; a one-line ConfigError when the budget cannot hold."""
        budget = plan_budget(cfg, algorithm.setup.num_examples, per_round, history)
        wrapper = privacy_wrapper(algorithm)
        if budget is None or wrapper is None:
            return None
        p = cfg.privacy
        count_noise = None
        if p.clipping == "adaptive":
            # the paper's m/20, but never under σ (few clients), where σ_Δ = σ / √(3/4) at most
            count_noise = p.count_noise if p.count_noise is not None else max(per_round / 20, budget.noise_multiplier)
        try:
            wrapper.settings.noise_multiplier = delta_noise_multiplier(budget.noise_multiplier, count_noise)
        except ValueError as err:
            raise ConfigError(f"config error: {err}") from None
        return cls(budget, p, wrapper, count_noise, cfg.seed)

    @property
    def sample_level(self) -> bool:
        return self.budget.mode == "sample"

    def clip_norm(self, history: list[dict[str, Any]]) -> float:
        """This round's C: the adaptive value the last round left, else the configured one."""
        for r in reversed(history):
            if recorded(r, "next_clip_norm") is not None:
                return float(recorded(r, "next_clip_norm"))
        return float(self.options.clip_norm)

    def start_round(self, round_: int, history: list[dict[str, Any]]) -> None:
        """Tell the stage the round and its C before any client trains."""
        self.wrapper.settings.round_ = round_
        self.wrapper.settings.clip_norm = self.clip_norm(history)
        if isinstance(self.wrapper, ClientLevelDP):
            self.wrapper.unclipped = None

    def record(self, round_: int, history: list[dict[str, Any]], participants: list[int]) -> dict[str, Any]:
        """The round's privacy fields (privacy_epsilon, …): ε so far at δ, σ, the round's clipping."""
        out = self.budget.record(round_, history, participants)
        clip = self.wrapper.settings.clip_norm
        out["clip_norm"] = clip
        unclipped = getattr(self.wrapper, "unclipped", None)
        if self.count_noise is not None:
            if unclipped is None:  # no update this round: C unchanged
                out["next_clip_norm"] = clip
            else:
                g = noise_generator(self.seed, round_, COUNT_STREAM)
                out["next_clip_norm"], out["noisy_unclipped_share"] = next_clip_norm(
                    clip, *unclipped, self.count_noise, self.options.target_quantile, self.options.clip_lr, g)
        return flat(out)
