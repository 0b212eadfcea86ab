"""Privacy accounting with Google's dp-accounting library: fedlora composes events, never ε.

Both DP modes release, per step, a sum of clipped contributions plus Gaussian noise of
standard deviation σ × (the sum's sensitivity to one contributor), after drawing the
contributors at random:

- a fixed-size draw of `sample` out of `population` (fedlora's client sampling, and DP-SGD's
  batches) is the library's `SampledWithoutReplacementDpEvent`, exact under the
  replace-one relation (the population size is public). Replacing one contributor moves a
  clipped sum by up to 2C, so the event's noise multiplier is σ / 2;
- drawing everyone (sample = population) is a plain `GaussianDpEvent(σ)` under
  add-or-remove-one (a missing contributor adds nothing: sensitivity C).

ε at δ comes from the RDP accountant (or PLD, for the Gaussian case only). PLD's grid grows
with steps / σ² (measured on the Zen 4 machine, dp-accounting 0.6.0: 1,111 → 2.9 GB, 10,000 →
19 GB), so PLD is refused above PLD_MAX_LOAD (`pld_fits`), and its calibration searches upwards
from half the RDP-calibrated σ instead of from 0.01, where one probe needed more than 20 GB.
"""

from __future__ import annotations

import math

from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant


def step_event(population: int, sample: int, noise_multiplier: float) -> tuple[dp_event.DpEvent, NeighboringRelation]:
    """One step's event and the neighbouring relation it is exact for (module docstring)."""
    if not 1 <= sample <= population:
        raise ValueError(f"a draw of {sample} out of {population}")
    if sample == population:
        return dp_event.GaussianDpEvent(noise_multiplier), NeighboringRelation.ADD_OR_REMOVE_ONE
    event = dp_event.SampledWithoutReplacementDpEvent(population, sample, dp_event.GaussianDpEvent(noise_multiplier / 2))
    return event, NeighboringRelation.REPLACE_ONE


PLD_MAX_LOAD = 2000.0
"""The largest steps / σ² PLD is asked for (about 5 GB of grid)."""


def pld_fits(noise_multiplier: float, steps: int) -> bool:
    return steps / noise_multiplier**2 <= PLD_MAX_LOAD


def accountant(kind: str, relation: NeighboringRelation) -> PrivacyAccountant:
    """A fresh RDP (or PLD) accountant for `relation`."""
    if kind == "pld":
        return PLDAccountant(relation)
    return RdpAccountant(neighboring_relation=relation)


# (the `kind` defaults are not mutated: every kind but "pld" means RDP, so a changed string is the same)
def epsilon(population: int, sample: int, noise_multiplier: float, steps: int, delta: float,
            kind: str = "rdp") -> float:  # pragma: no mutate
    """ε at δ after `steps` such steps (0 steps: 0; no noise: ∞)."""
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    event, relation = step_event(population, sample, noise_multiplier)
    acc = accountant(kind, relation)
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


def calibrate(population: int, sample: int, steps: int, target_epsilon: float, delta: float,
              kind: str = "rdp") -> float:  # pragma: no mutate
    """The smallest noise multiplier (to 1e-4) whose ε after `steps` steps is ≤ target_epsilon,
    by the library's own search (`mechanism_calibration.calibrate_dp_mechanism`)."""
    relation = step_event(population, sample, 1.0)[1]

    def event(sigma: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(step_event(population, sample, sigma)[0], steps)

    lower, guess = 0.01, 1.0
    if kind == "pld":  # PLD is tighter than RDP, so its σ lies below RDP's: search from half of it
        guess = calibrate(population, sample, steps, target_epsilon, delta, "rdp")
        lower = guess / 2
        if not pld_fits(lower, steps):
            raise ValueError(f"PLD accounting of {steps} steps near σ = {lower:.3g} needs more memory than "
                             f"fedlora allows (steps / σ² > {PLD_MAX_LOAD:g}); use rdp")
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: accountant(kind, relation), event, target_epsilon, delta,
        mechanism_calibration.LowerEndpointAndGuess(lower, guess), tol=1e-4,
    )
    # the search returns a value within tol of the optimum: step up until the budget holds
    while epsilon(population, sample, sigma, steps, delta, kind) > target_epsilon:
        sigma += 1e-4
    return float(sigma)
