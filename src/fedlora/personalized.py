"""Personalised evaluation: each client judged on its own held-out items with the model it
would use, and the comparison of methods on those items (docs/concepts/personalized-evaluation.md).

Per evaluation the runtime records, per held-out item, `personal_client`, `personal_id` (its row
in the seeded training pool), `personal_label`, `personal_prediction` and `personal_correct`
(in the round's eval/round_NNNN.npz, beside the test items); `personal_metrics` turns them into
each client's accuracy, their mean and the worst client. Two methods run with the same seed
hold out the same items, so they are compared item by item (`personal_comparison`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlora.stats import item_interval, paired_difference, seed_interval, with_holm

PREFIX = "personal_"
KEYS = ("client", "id", "label", "prediction", "correct")
STATS_SEED = 0


def personal_records(client: int, ids: Sequence[int], labels: np.ndarray, preds: np.ndarray) -> dict[str, np.ndarray]:
    """One client's per-item records, under the `personal_` keys."""
    return {
        f"{PREFIX}client": np.full(len(ids), client, dtype=np.int64),
        f"{PREFIX}id": np.asarray(ids, dtype=np.int64),
        f"{PREFIX}label": np.asarray(labels, dtype=np.int64),
        f"{PREFIX}prediction": np.asarray(preds, dtype=np.int64),
        f"{PREFIX}correct": np.asarray(preds) == np.asarray(labels),
    }


def concat_records(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{PREFIX}{k}": np.concatenate([p[f"{PREFIX}{k}"] for p in parts]) for k in KEYS}


def personal_metrics(items: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Each client's accuracy on its held-out items, their unweighted mean over clients, the
    worst client's accuracy and id (the lowest id among equals)."""
    clients, correct = items[f"{PREFIX}client"], items[f"{PREFIX}correct"]
    per_client = {int(k): float(correct[clients == k].mean()) for k in np.unique(clients)}
    worst = min(per_client, key=lambda k: (per_client[k], k))
    return {
        "personal_accuracy": float(np.mean(list(per_client.values()))),
        "personal_worst_accuracy": per_client[worst],
        "personal_worst_client": worst,
        "personal_client_accuracy": {str(k): v for k, v in per_client.items()},
    }


def has_personal(items: Mapping[str, np.ndarray] | None) -> bool:
    return items is not None and all(f"{PREFIX}{k}" in items for k in KEYS)


def aligned(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """The two runs' `correct` on the same items, ordered by item id; None when their held-out
    items differ (another seed, fraction or partition)."""
    ia, ib = np.argsort(a[f"{PREFIX}id"], kind="stable"), np.argsort(b[f"{PREFIX}id"], kind="stable")
    same = (np.array_equal(a[f"{PREFIX}id"][ia], b[f"{PREFIX}id"][ib])
            and np.array_equal(a[f"{PREFIX}client"][ia], b[f"{PREFIX}client"][ib]))
    return (a[f"{PREFIX}correct"][ia], b[f"{PREFIX}correct"][ib]) if same else None


def personal_comparison(final: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]],
                        reference: str | None) -> list[dict[str, Any]]:
    """Per method (final[method][seed] = that run's final per-item records): the mean over seeds
    of the client-mean and worst-client accuracy, the 95% interval of the client mean (t over
    seeds, or with one seed the bootstrap over items), and the paired difference of pooled
    held-out accuracy against `reference` over the seeds both share, with fedlora.stats' protocol
    (primary: Student t over the seeds' differences, Holm-adjusted across the table; secondary:
    the within-seed item bootstrap and McNemar per seed)."""
    rows, diffs = [], []
    ref = final.get(reference or "", {})
    for method, per_seed in final.items():
        metrics = [personal_metrics(per_seed[s]) for s in sorted(per_seed)]
        means = np.array([m["personal_accuracy"] for m in metrics])
        if len(means) > 1:
            _, low, high = (float(v) for v in seed_interval(means))
        else:
            low, high = item_interval(next(iter(per_seed.values()))[f"{PREFIX}correct"], STATS_SEED)
        rows.append({
            "method": method, "seeds": len(metrics), "personal_accuracy": float(means.mean()),
            "ci_low": low, "ci_high": high,
            "worst_client_accuracy": float(np.mean([m["personal_worst_accuracy"] for m in metrics])),
            "worst_clients": ";".join(str(m["personal_worst_client"]) for m in metrics),
        })
        pairs = [p for s in sorted(per_seed) if s in ref and (p := aligned(per_seed[s], ref[s])) is not None]
        diffs.append(paired_difference([a for a, _ in pairs], [b for _, b in pairs], STATS_SEED)
                     if method != reference and pairs else None)
    for row, diff in zip(rows, with_holm(diffs)):
        if diff is not None:
            row.update(diff=diff.mean, diff_low=diff.low, diff_high=diff.high, p_value=diff.p_value,
                       p_holm=diff.p_holm, significant=diff.significant, items_low=diff.items_low,
                       items_high=diff.items_high, mcnemar=";".join(f"{p:.4g}" for p in diff.mcnemar))
    return rows


def _interval(low: float | None, high: float | None) -> str:
    return "" if low is None else f" [{low:.4f}, {high:.4f}]"


def personal_table(rows: list[dict[str, Any]], reference: str | None) -> str:
    """The markdown section of comparison.md."""
    if not rows:
        return ""
    ref = reference or "–"
    lines = [
        "## Personalised accuracy\n",
        "Each client's accuracy on its own held-out items (a seeded part of its training shard, never "
        "trained on) with the model it would use: the global model, or its personal one (FedSA-LoRA: "
        "the global A with its own B). Mean over clients (unweighted) and the worst client, final "
        f"evaluation, mean over seeds. Δ is the pooled held-out accuracy minus {ref}'s on the same items: "
        "its interval and p are Student's t over the seeds' differences (p Holm-adjusted across this "
        "table; * marks p_Holm < 0.05 with at least 3 seeds); the item bootstrap within seeds and "
        "McNemar's exact p per seed are the test-set noise of these trained models only.\n",
        f"| method | seeds | client-mean accuracy [95% CI] | worst client (which, per seed) "
        f"| Δ pooled vs {ref} [95% CI, t] | p (Holm) | Δ: items within seeds | McNemar p per seed |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        if "diff" in r:
            d = f"{r['diff']:+.4f}{'*' if r['significant'] else ''}{_interval(r['diff_low'], r['diff_high'])}"
            p = "–" if r["p_value"] is None else f"{r['p_value']:.4f} ({r['p_holm']:.4f})"
            items, mc = _interval(r["items_low"], r["items_high"]).strip(), r["mcnemar"]
        else:
            d, p, items, mc = ("reference" if r["method"] == reference else "–"), "–", "–", "–"
        lines.append(f"| {r['method']} | {r['seeds']} | {r['personal_accuracy']:.4f}{_interval(r['ci_low'], r['ci_high'])} "
                     f"| {r['worst_client_accuracy']:.4f} ({r['worst_clients']}) | {d} | {p} | {items} | {mc} |")
    return "\n".join(lines) + "\n"
