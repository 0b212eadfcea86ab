"""Statistics for comparing methods: intervals over seeds and test items, paired differences.

Small pure functions over arrays, seeded and deterministic (`fedlora compare` uses them):

- `seed_interval`: mean and Student-t 95% interval over seeds (each seed's accuracy is one
  observation; assumes they are independent and roughly normal).
- `item_interval`: with a single seed, the percentile bootstrap over test items (items
  independent draws from the test distribution; says nothing about training-seed variance).
- `paired_bootstrap`: the mean paired difference of two methods over seeds, its percentile
  interval from a hierarchical bootstrap (seeds resampled, then test items within each drawn
  seed, both with replacement; the two methods always keep the same items, so the pairing is
  kept), and the two-sided bootstrap p-value that inverts that interval; with several seeds
  also the Student-t interval of the per-seed differences, the conservative check when seeds
  are few (the bootstrap's seed level cannot show more spread than the few seeds have).
- `mcnemar_exact`: the exact McNemar test of one seed (binomial test on the discordant items).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
RESAMPLES = 10_000


def seed_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) over axis 0 (the seeds): mean ± t_{(1+c)/2, S−1} · s/√S. Needs S ≥ 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("seed_interval: needs at least two seeds")
    mean = x.mean(0)
    half = sps.t.ppf((1 + confidence) / 2, len(x) - 1) * sps.sem(x, axis=0)
    return mean, mean - half, mean + half


def item_interval(values: np.ndarray, seed: int = 0, confidence: float = CONFIDENCE,
                  resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items (one seed's test set)."""
    x = np.asarray(values, dtype=np.float64)
    if np.all(x == x[0]):  # every resample has the same mean
        return float(x[0]), float(x[0])
    res = sps.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples,
                        method="percentile", rng=np.random.default_rng(seed), batch=1000)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def hierarchical_means(per_seed: Sequence[np.ndarray], rng: np.random.Generator,
                       resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap replicates of the mean over seeds of the mean over items: each replicate draws
    S seeds with replacement, then, for each drawn seed, its n items with replacement. Drawing
    n items with replacement from values v with counts c has the same law as a multinomial
    (n, c/n) over the distinct values, which is what is drawn (exact, and cheap for 0/1 data)."""
    S = len(per_seed)
    seed_draws = rng.integers(0, S, size=(resamples, S))
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
    """Method minus reference, on the same test items of the same seeds."""

    mean: float
    low: float
    high: float
    p_value: float
    seeds: int
    mcnemar: tuple[float, ...]  # exact McNemar p per seed
    seed_low: float | None = None  # Student-t interval of the per-seed differences (≥ 2 seeds)
    seed_high: float | None = None

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - CONFIDENCE


def paired_bootstrap(method: Sequence[np.ndarray], reference: Sequence[np.ndarray], seed: int = 0,
                     confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> PairedDifference:
    """Paired difference of per-item scores (1/0 correct), one array pair per seed: the mean over
    seeds of the per-seed mean difference, its hierarchical-bootstrap percentile interval and
    bootstrap p-value (a fresh generator from `seed`: the same inputs give the same numbers)."""
    if len(method) != len(reference) or not method:
        raise ValueError("paired_bootstrap: one (method, reference) pair of arrays per seed")
    diffs = []
    for a, b in zip(method, reference):
        if len(a) != len(b) or len(a) == 0:
            raise ValueError("paired_bootstrap: a seed's two arrays must be non-empty and of equal length")
        diffs.append(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    reps = hierarchical_means(diffs, np.random.default_rng(seed), resamples)
    tail = (1 - confidence) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    per_seed = np.array([d.mean() for d in diffs])
    seed_low = seed_high = None
    if len(per_seed) > 1:
        _, seed_low, seed_high = (float(v) for v in seed_interval(per_seed, confidence))
    return PairedDifference(
        mean=float(per_seed.mean()), low=float(low), high=float(high),
        p_value=bootstrap_p_value(reps), seeds=len(diffs),
        mcnemar=tuple(mcnemar_exact(a, b) for a, b in zip(method, reference)),
        seed_low=seed_low, seed_high=seed_high,
    )
