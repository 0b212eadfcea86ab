"""Statistics for comparing methods: intervals over seeds and test items, paired differences.

Small pure functions over arrays, seeded and deterministic (`fedlora compare` uses them).
docs/concepts/statistics.md says what each test assumes, how it was calibrated and its power.

- `seed_interval`: mean and Student-t 95% interval over seeds (each seed's accuracy is one
  observation; assumes they are independent and roughly normal).
- `item_interval`: with a single seed, the percentile bootstrap over test items (items
  independent draws from the test distribution; says nothing about training-seed variance).
- `paired_t`: the primary test of "method and reference differ": Student's t on the per-seed
  mean differences (the seed is the unit of replication: a training seed draws the partition,
  the initialisation and the batches, so its difference is one independent observation; each is
  a mean over hundreds of items, close to normal). Its rejection rate under the null is right
  with 3-5 seeds whatever the seed-to-seed spread (tests/test_calibration.py).
- `holm`: Holm's step-down adjustment of the p-values of one table's comparisons (the chance
  of any false mark in the table stays at most the level).
- `bootstrap_means`: the item-level bootstrap. With seeds fixed it is the secondary,
  within-seed view: how much the test-set sample alone moves the difference of these trained
  models. With seeds resampled too (`resample_seeds=True`) it is the hierarchical bootstrap
  this project used as its primary test until issue 31: with three seeds it cannot show more
  seed spread than the three have, and rejects a true null far too often (20% at 5% with a
  between-seed spread of 0.05); it is kept for that demonstration, not for marks.
- `mcnemar_exact`: the exact McNemar test of one seed (binomial test on the discordant items).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
LEVEL = 1 - CONFIDENCE
RESAMPLES = 10_000
MIN_SEEDS = 3
"""The fewest paired seeds for which a difference can be marked significant (the project's
standard for "A beats B"; the t test itself is calibrated from two seeds on)."""


def seed_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) over axis 0 (the seeds): mean ± t_{(1+c)/2, S−1} · s/√S. Needs S ≥ 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("seed_interval: needs at least two seeds")
    mean = x.mean(0)
    half = sps.t.ppf((1 + confidence) / 2, len(x) - 1) * sps.sem(x, axis=0)
    return mean, mean - half, mean + half


def paired_t(differences: np.ndarray) -> np.ndarray:
    """Two-sided p-value of "the mean per-seed difference is 0", Student's t with S − 1 degrees
    of freedom over the last axis (vectorised: the calibration test passes thousands of
    simulated studies at once). Differences identical across seeds have no spread: p is 1 when
    they are all 0 and 0 otherwise (an infinite t)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.shape[-1] < 2:
        raise ValueError("paired_t: needs at least two seeds")
    mean, sd = d.mean(-1), d.std(-1, ddof=1)
    flat = sd <= 1e-12 * np.maximum(1.0, np.abs(mean))
    t = np.abs(mean) * np.sqrt(d.shape[-1]) / np.where(flat, 1.0, sd)
    p = 2 * sps.t.sf(t, d.shape[-1] - 1)
    return np.where(flat, np.where(mean == 0, 1.0, 0.0), p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest of m is
    multiplied by m − i + 1, made non-decreasing, capped at 1. Rejecting where the adjusted p is
    below the level keeps the family-wise error at most the level, whatever the dependence."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def item_interval(values: np.ndarray, seed: int = 0, confidence: float = CONFIDENCE,
                  resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items (one seed's test set)."""
    x = np.asarray(values, dtype=np.float64)
    if np.all(x == x[0]):  # every resample has the same mean
        return float(x[0]), float(x[0])
    res = sps.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples,
                        method="percentile", rng=np.random.default_rng(seed), batch=1000)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_means(per_seed: Sequence[np.ndarray], rng: np.random.Generator, resamples: int = RESAMPLES,
                    resample_seeds: bool = False) -> np.ndarray:
    """Bootstrap replicates of the mean over seeds of the mean over items. Each replicate keeps
    every seed once (`resample_seeds=False`: the within-seed view) or draws S seeds with
    replacement (the hierarchical bootstrap), then, for each seed, its n items with replacement.
    Drawing n items with replacement from values v with counts c has the same law as a
    multinomial (n, c/n) over the distinct values, which is what is drawn (exact, and cheap
    for 0/1 data)."""
    S = len(per_seed)
    if resample_seeds:
        seed_draws = rng.integers(0, S, size=(resamples, S))
    else:
        seed_draws = np.broadcast_to(np.arange(S), (resamples, S))
    item_means = np.zeros((resamples, S))
    for s, x in enumerate(per_seed):
        slots = seed_draws == s
        if not slots.any():
            continue
        values, counts = np.unique(np.asarray(x, dtype=np.float64), return_counts=True)
        draws = rng.multinomial(len(x), counts / len(x), size=int(slots.sum()))
        item_means[slots] = draws @ values / len(x)
    return item_means.mean(1)


def bootstrap_p_value(replicates: np.ndarray) -> float:
    """Two-sided p-value of "the difference is 0" that inverts the percentile interval: twice the
    smaller share of replicates on either side of 0 (add-one corrected, so never 0; ≤ 1)."""
    b = len(replicates)
    tail = min(int((replicates <= 0).sum()), int((replicates >= 0).sum()))
    return min(1.0, 2.0 * (tail + 1) / (b + 1))


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: of the items exactly one method gets right, is the split
    Binomial(n, 1/2)? 1.0 when no item is discordant."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)


@dataclass(frozen=True)
class PairedDifference:
    """Method minus reference, on the same test items of the same seeds.

    Primary (seeds are the replicates): `low`/`high` the Student-t interval of the per-seed
    differences, `p_value` the paired t test, `p_holm` that p after Holm's adjustment across the
    comparisons of one table (set by `with_holm`; equal to `p_value` alone). None with one seed.
    Secondary, within-seed (seeds fixed, items resampled): `items_low`/`items_high` and
    `items_p`, the test-set noise of these trained models only; and the exact McNemar p per seed."""

    mean: float
    seeds: int
    low: float | None
    high: float | None
    p_value: float | None
    items_low: float
    items_high: float
    items_p: float
    mcnemar: tuple[float, ...]
    p_holm: float | None = None

    @property
    def significant(self) -> bool:
        """Marked: at least MIN_SEEDS seeds and Holm-adjusted t p below the level."""
        p = self.p_holm if self.p_holm is not None else self.p_value
        return self.seeds >= MIN_SEEDS and p is not None and p < LEVEL


def with_holm(diffs: Sequence[PairedDifference | None]) -> list[PairedDifference | None]:
    """The table's differences with `p_holm` set: Holm over those that have a primary p."""
    tested = [i for i, d in enumerate(diffs) if d is not None and d.p_value is not None]
    adjusted = holm([diffs[i].p_value for i in tested])  # type: ignore[union-attr]
    out = list(diffs)
    for i, p in zip(tested, adjusted):
        out[i] = replace(diffs[i], p_holm=p)  # type: ignore[arg-type]
    return out


def paired_difference(method: Sequence[np.ndarray], reference: Sequence[np.ndarray], seed: int = 0,
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> PairedDifference:
    """Paired difference of per-item scores (1/0 correct), one array pair per seed: the mean over
    seeds of the per-seed mean difference, the paired t test over seeds (≥ 2 seeds) and the
    within-seed item bootstrap (a fresh generator from `seed`: same inputs, same numbers)."""
    if len(method) != len(reference) or not method:
        raise ValueError("paired_difference: one (method, reference) pair of arrays per seed")
    diffs = []
    for a, b in zip(method, reference):
        if len(a) != len(b) or len(a) == 0:
            raise ValueError("paired_difference: a seed's two arrays must be non-empty and of equal length")
        diffs.append(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    per_seed = np.array([d.mean() for d in diffs])
    low = high = p = None
    if len(per_seed) > 1:
        _, low, high = (float(v) for v in seed_interval(per_seed, confidence))
        p = float(paired_t(per_seed))
    reps = bootstrap_means(diffs, np.random.default_rng(seed), resamples)
    tail = (1 - confidence) / 2
    items_low, items_high = (float(v) for v in np.quantile(reps, [tail, 1 - tail]))
    return PairedDifference(
        mean=float(per_seed.mean()), seeds=len(diffs), low=low, high=high, p_value=p,
        items_low=items_low, items_high=items_high, items_p=bootstrap_p_value(reps),
        mcnemar=tuple(mcnemar_exact(a, b) for a, b in zip(method, reference)),
    )
