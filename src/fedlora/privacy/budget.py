"""A run's privacy: its noise multiplier, its δ, the ε spent so far, and the budget check.

Every number here comes from `fedlora.privacy.accountant` (dp-accounting). The ε of a round is
a function of the round number (client level) or of each client's participations so far
(sample level), so a resumed run records exactly what an uninterrupted one does. The noise
multiplier is fixed when a run starts (calibrated to `target_epsilon` over the planned
rounds) and read back from the run's records when it resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.errors import ConfigError
from fedlora.privacy.accountant import PLD_MAX_LOAD, calibrate, epsilon, pld_fits

PREFIX = "privacy_"
"""A round's privacy fields in metrics.jsonl (and TensorBoard): privacy_epsilon, privacy_delta, …"""


def recorded(record: dict[str, Any], key: str) -> Any:
    """Field `key` of a round's privacy record (None when absent)."""
    return record.get(PREFIX + key)


def flat(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields as a round record holds them (prefixed)."""
    return {PREFIX + k: v for k, v in fields.items()}


def participations(history: list[dict[str, Any]], client: int) -> int:
    """Rounds in which `client` trained and sent an update (accepted or not)."""
    ids = ([c["id"] for c in r.get("clients", [])] + [x["client"] for x in r.get("rejected", [])] for r in history)
    return sum(client in round_ids for round_ids in ids)


@dataclass(frozen=True)
class Budget:
    """One run's accounting: client level (population = clients, sample = clients per round,
    one step per round) or sample level (per client: its examples, the batch, local steps)."""

    mode: str
    noise_multiplier: float
    delta: float
    target_epsilon: float | None
    accountant: str
    populations: list[int]
    """Client level: [N]; sample level: each client's example count."""
    sample: int
    steps_per_round: int
    planned_rounds: int
    """The rounds σ was calibrated for (the run's first federation.rounds)."""

    def epsilon(self, population: int, rounds: int) -> float:
        return epsilon(population, self.sample, self.noise_multiplier, rounds * self.steps_per_round,
                       self.delta, self.accountant)

    def worst_epsilon(self, rounds: int) -> float:
        """ε after `rounds` rounds for the most exposed party (sample level: the smallest client,
        as if it took part in every round)."""
        return self.epsilon(min(self.populations), rounds)

    def check(self, rounds: int) -> None:
        """Refuse (one line) a run or resume whose `rounds` would spend more than target_epsilon."""
        if self.target_epsilon is None:
            return
        eps = self.worst_epsilon(rounds)
        if eps > self.target_epsilon:
            planned = f" (its noise was calibrated for {self.planned_rounds})" if rounds != self.planned_rounds else ""
            raise ConfigError(
                f"config error: privacy.target_epsilon: {rounds} rounds would spend ε = {eps:.4g} at δ = "
                f"{self.delta:.3g}, more than {self.target_epsilon:g}{planned}; stopped before training"
            )

    def record(self, round_: int, history: list[dict[str, Any]], participants: list[int]) -> dict[str, Any]:
        """The round's privacy fields (unprefixed): ε at δ so far (sample level: the largest over the clients,
        and each client's), δ and σ."""
        out: dict[str, Any] = {"delta": self.delta, "noise_multiplier": self.noise_multiplier}
        if self.target_epsilon is not None:  # what σ was calibrated for: a resume checks against it
            out["planned_rounds"] = self.planned_rounds
        if self.mode == "client":
            return {"epsilon": self.epsilon(self.populations[0], round_), **out}
        last = (recorded(history[-1], "client_epsilon") or {}) if history else {}
        per_client = {str(k): float(v) for k, v in last.items()}
        for k in participants:
            per_client[str(k)] = self.epsilon(self.populations[k], participations(history, k) + 1)
        return {"epsilon": max(per_client.values(), default=0.0), **out, "client_epsilon": per_client}


def default_delta(mode: str, num_clients: int, num_examples: list[int]) -> float:
    """1/N: N the clients (client level) or the smallest client's examples (sample level)."""
    return 1.0 / (num_clients if mode == "client" else min(num_examples))


def plan_budget(cfg: Any, num_examples: list[int], per_round: int, history: list[dict[str, Any]]) -> Budget | None:
    """The run's Budget (None without DP), checked against target_epsilon for cfg's rounds.
    σ: the one recorded by the run's rounds, else noise_multiplier, else calibrated."""
    p, fed = cfg.privacy, cfg.federation
    if p.mode == "none":
        return None
    if p.mode == "client":
        populations, sample, steps = [fed.num_clients], per_round, 1
    else:
        small = min(num_examples)
        if fed.batch_size > small:
            raise ConfigError(f"config error: privacy.mode: sample needs federation.batch_size ≤ every client's "
                              f"examples; the smallest client has {small}, batch_size is {fed.batch_size}")
        populations, sample, steps = list(num_examples), fed.batch_size, fed.local_steps
    delta = p.delta if p.delta is not None else default_delta(p.mode, fed.num_clients, num_examples)
    private = [r for r in history if recorded(r, "noise_multiplier") is not None]
    if private:
        sigma = recorded(private[-1], "noise_multiplier")
        planned = fed.rounds if p.target_epsilon is None else recorded(private[0], "planned_rounds")
        if not (_positive(sigma) and isinstance(planned, int) and planned >= 1):
            raise ConfigError("config error: metrics of the run: its privacy record has no valid noise_multiplier "
                              "and planned_rounds; cannot resume its accounting")
    elif p.noise_multiplier is not None:
        sigma, planned = p.noise_multiplier, fed.rounds
    else:
        try:
            sigma = calibrate(min(populations), sample, fed.rounds * steps, p.target_epsilon, delta, p.accountant)
        except ValueError as err:  # PLD that would not fit in memory
            raise ConfigError(f"config error: privacy.accountant: {err}") from None
        planned = fed.rounds
    total = max(fed.rounds, planned) * steps
    if p.accountant == "pld" and not pld_fits(sigma, total):
        raise ConfigError(f"config error: privacy.accountant: pld at noise_multiplier {sigma:g} over {total} steps "
                          f"needs more memory than fedlora allows (steps / σ² = {total / sigma**2:.0f} > "
                          f"{PLD_MAX_LOAD:g}); use rdp or more noise")
    budget = Budget(p.mode, sigma, delta, p.target_epsilon, p.accountant, populations, sample, steps, planned)
    budget.check(fed.rounds)
    return budget


def _positive(x: Any) -> bool:
    return isinstance(x, float | int) and not isinstance(x, bool) and 0 < x < float("inf")
