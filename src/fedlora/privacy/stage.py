"""The privacy stage of a run: what the runtimes call, on the client and on the server.

One object per run holds the Budget (σ, δ, ε so far) and, at client level, the mechanism
(`ClientLevel`). The adaptive clip norm is the run's only privacy state between rounds; it
travels in each round's privacy record (so checkpoints and resumes carry it unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.algorithms.base import Aggregate, Algorithm, Message, Tensors, Update
from fedlora.privacy.budget import Budget, flat, plan_budget, recorded
from fedlora.privacy.client_level import ClientLevel, delta_noise_multiplier, next_clip_norm, noise_generator
from fedlora.privacy.dpsgd import SampleDP
from fedlora.privacy.uploads import CLIENT_LEVEL

COUNT_STREAM = 2**32 - 1
"""Noise stream (in place of a client id) of adaptive clipping's count."""


@dataclass(frozen=True)
class PrivacyStage:
    """A run's DP: its Budget, and at client level its mechanism and clipping options."""

    budget: Budget
    options: Any  # PrivacyConfig
    mechanism: ClientLevel | None
    count_noise: float | None
    seed: int

    @classmethod
    def build(cls, cfg: Any, num_examples: list[int], per_round: int, history: list[dict[str, Any]]) -> PrivacyStage | None:
        """None without DP; a one-line ConfigError when the budget cannot hold."""
        budget = plan_budget(cfg, num_examples, per_round, history)
        if budget is None:
            return None
        p = cfg.privacy
        count_noise = None
        if p.clipping == "adaptive":
            # the paper's m/20, but never under σ (few clients), where σ_Δ = σ / √(3/4) at most
            count_noise = p.count_noise if p.count_noise is not None else max(per_round / 20, budget.noise_multiplier)
        mechanism = None
        if p.mode == "client":
            try:
                sigma_delta = delta_noise_multiplier(budget.noise_multiplier, count_noise)
            except ValueError as err:
                from fedlora.errors import ConfigError

                raise ConfigError(f"config error: {err}") from None
            mechanism = ClientLevel(CLIENT_LEVEL[cfg.algorithm.name], sigma_delta, p.noise == "client",
                                    per_round, cfg.seed)
        return cls(budget, p, mechanism, count_noise, cfg.seed)

    @property
    def clips_on_client(self) -> bool:
        return self.mechanism is not None and self.mechanism.on_client

    @property
    def sample_level(self) -> bool:
        return self.budget.mode == "sample"

    def sample_dp(self, round_: int, client: int) -> SampleDP | None:
        """Client `client`'s DP-SGD settings this round (sample level; else None)."""
        if not self.sample_level:
            return None
        return SampleDP(float(self.options.clip_norm), self.budget.noise_multiplier,
                        noise_generator(self.seed, round_, client))

    def clip_norm(self, history: list[dict[str, Any]]) -> float:
        """This round's C: the adaptive value the last round left, else the configured one."""
        for r in reversed(history):
            if recorded(r, "next_clip_norm") is not None:
                return float(recorded(r, "next_clip_norm"))
        return float(self.options.clip_norm)

    def client_upload(self, update: Update, payload: Message, round_: int, history: list[dict[str, Any]]) -> Update:
        """`noise: client`: clip and noise on the client, before the upload leaves it."""
        assert self.mechanism is not None
        return self.mechanism.client_upload(update, payload.tensors, round_, self.clip_norm(history))

    def aggregate(self, algorithm: Algorithm, state: Tensors, updates: list[Update], server: Any, round_: int,
                  history: list[dict[str, Any]]) -> tuple[Aggregate, dict[str, Any]]:
        """Client level: the method's aggregate with clipping and noise; its record's entries."""
        assert self.mechanism is not None
        clip = self.clip_norm(history)
        agg, unclipped = self.mechanism.aggregate(algorithm, state, updates, server, round_, clip)
        info: dict[str, Any] = {"clip_norm": clip}  # the exact count is not released: only its noised share
        if self.count_noise is not None:
            nxt, share = next_clip_norm(clip, unclipped, len(updates), self.count_noise, self.options.target_quantile,
                                        self.options.clip_lr, noise_generator(self.seed, round_, COUNT_STREAM))
            info.update(next_clip_norm=nxt, noisy_unclipped_share=share)
        return agg, info

    def record(self, round_: int, history: list[dict[str, Any]], participants: list[int],
               info: dict[str, Any] | None = None) -> dict[str, Any]:
        """The round's privacy fields (privacy_epsilon, …): ε so far at δ, σ, the round's clipping."""
        out = self.budget.record(round_, history, participants)
        if self.sample_level:
            out["clip_norm"] = float(self.options.clip_norm)
        elif info is None:  # no update this round: C unchanged
            out["clip_norm"] = self.clip_norm(history)
            if self.count_noise is not None:
                out["next_clip_norm"] = out["clip_norm"]
        else:
            out.update(info)
        return flat(out)
