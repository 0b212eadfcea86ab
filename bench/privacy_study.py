"""Read the privacy study (issue 27; configs/privacy_agnews.yaml): accuracy against ε.

The study is a `fedlora compare` of nine arms: FedIT, FFA-LoRA and AFLoRA, each plain (ε = ∞)
and at ε = 8 and 2 (`<method>-eps8`, `<method>-eps2`), and FedSVD's three arms when they ran. `comparison.md` pairs every arm with
plain FedIT; the questions of the issue need other pairs, all on the same 500 test items of
the same seeds, with the paired t test over seeds (fedlora.stats):

1. at each ε, every other method minus FedIT at that ε (FFA-LoRA's claim: freezing A does
   better under DP; AFLoRA's clients also train only B and Λ; FedSVD's claim is about DP too);
2. the cost of privacy, each method at ε minus itself at ∞;
3. the difference in differences: each other method's cost minus FedIT's, per seed.

Holm's correction runs across the method comparisons (1 and 3) and, apart, across the costs.
With `--untuned DIR` (`fedlora eval CONFIG --set seed=S --out DIR/seed_S.json`, the model before
any training, on the same test items), a third family: every arm minus the untuned model, per
seed (did it learn anything?). Writes a markdown table and a figure:

    python bench/privacy_study.py STUDY_DIR --untuned DIR --md docs/results/privacy.md \
        --png docs/results/privacy_accuracy_vs_epsilon.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedlora.records import accuracy_summary
from fedlora.runtime.outputs import read_eval_items, read_metrics
from fedlora.stats import LEVEL, MIN_SEEDS, holm, paired_t, seed_interval

METHODS = {"fedit": "FedIT", "ffa": "FFA-LoRA", "aflora": "AFLoRA", "fedsvd": "FedSVD"}
EPSILONS = {"": "∞", "-eps8": "8", "-eps2": "2"}


def final_items(run: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """A run's records, and (ids, correct) of its last evaluation (its per-item record)."""
    history = read_metrics(run)
    items = read_eval_items(run, accuracy_summary(history).final_round)
    return history, items["id"], items["correct"].astype(np.float64)


def read_study(root: Path) -> tuple[list[int], dict[str, dict[int, np.ndarray]], dict[str, dict[str, float]]]:
    """Seeds where FedIT's, FFA-LoRA's and AFLoRA's arms all finished, and the methods (those three,
    and FedSVD) whose arms finished at each of them; per arm and seed the 0/1 scores on the
    common items (aligned by id); per arm the privacy record of its last round (max over seeds)."""
    def finished(seed_dir: Path, method: str) -> bool:
        return all((seed_dir / (method + e) / "summary.json").is_file() for e in EPSILONS)

    seeds = sorted(int(p.name.removeprefix("seed_")) for p in root.glob("seed_*")
                   if all(finished(p, m) for m in ("fedit", "ffa", "aflora")))
    methods = [m for m in METHODS if all(finished(root / f"seed_{s}", m) for s in seeds)]
    arms = [m + e for e in EPSILONS for m in methods]
    scores: dict[str, dict[int, np.ndarray]] = {arm: {} for arm in arms}
    privacy: dict[str, dict[str, float]] = {}
    for seed in seeds:
        items = {arm: final_items(root / f"seed_{seed}" / arm) for arm in arms}
        ids = items["fedit"][1]
        for arm, (history, arm_ids, correct) in items.items():
            if not np.array_equal(arm_ids, ids):
                raise SystemExit(f"{root}/seed_{seed}/{arm}: scored on other test items than fedit")
            scores[arm][seed] = correct
            record = history[-1]
            kept = privacy.setdefault(arm, {})
            for key in ("privacy_epsilon", "privacy_noise_multiplier", "privacy_clip_norm"):
                if key in record:
                    kept[key] = max(kept.get(key, 0.0), float(record[key]))
    return seeds, scores, privacy


def contrast(per_seed: np.ndarray) -> dict[str, float]:
    """Mean, 95% t interval and two-sided paired-t p of per-seed differences."""
    mean, low, high = (float(v) for v in seed_interval(per_seed))
    return {"mean": mean, "low": low, "high": high, "p": float(paired_t(per_seed))}


def ran(scores: dict[str, dict[int, np.ndarray]]) -> list[str]:
    """The methods of the study, in METHODS' order."""
    return [m for m in METHODS if m in scores]


def read_untuned(folder: Path, seeds: list[int]) -> np.ndarray:
    """The untuned model's test accuracy per seed (`fedlora eval --out`)."""
    return np.array([json.loads((folder / f"seed_{s}.json").read_text())["results"]["accuracy"] for s in seeds])


def comparisons(seeds: list[int], scores: dict[str, dict[int, np.ndarray]],
                untuned: np.ndarray | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    acc = {arm: np.array([scores[arm][s].mean() for s in seeds]) for arm in scores}
    others = [m for m in ran(scores) if m != "fedit"]
    methods, costs = [], []
    for e, label in EPSILONS.items():
        for m in others:
            methods.append({"what": f"{METHODS[m]} − FedIT at ε = {label}", **contrast(acc[m + e] - acc["fedit" + e])})
    for e, label in list(EPSILONS.items())[1:]:
        for m in others:
            did = (acc[m + e] - acc[m]) - (acc["fedit" + e] - acc["fedit"])
            methods.append({"what": f"{METHODS[m]}'s cost − FedIT's cost at ε = {label}", **contrast(did)})
        for m in ran(scores):
            costs.append({"what": f"{METHODS[m]} at ε = {label} − at ∞", **contrast(acc[m + e] - acc[m])})
    learned = [] if untuned is None else [
        {"what": f"{METHODS[m]} at ε = {label} − the untuned model", **contrast(acc[m + e] - untuned)}
        for e, label in EPSILONS.items() for m in ran(scores)]
    for family in (methods, costs, learned):
        for row, p in zip(family, holm([r["p"] for r in family])):
            row["p_holm"] = p
            row["marked"] = len(seeds) >= MIN_SEEDS and p < LEVEL
    return methods, costs, learned


def markdown(seeds, scores, privacy, methods, costs, learned=(), untuned=None) -> str:
    lines = [f"Seeds: {seeds} (every arm finished). Final accuracy on the same 500 AG News test items.", "",
             "| method | ε (target) | ε spent | noise multiplier σ | clip norm (last round) | final accuracy, mean ± sd | 95% t interval |",
             "|---|---|---|---|---|---|---|"]
    for e, label in EPSILONS.items():
        for m in ran(scores):
            name = METHODS[m]
            acc = np.array([scores[m + e][s].mean() for s in seeds])
            _, low, high = seed_interval(acc)
            priv = privacy.get(m + e, {})
            spent = f"{priv['privacy_epsilon']:.2f}" if "privacy_epsilon" in priv else "–"
            sigma = f"{priv['privacy_noise_multiplier']:.3f}" if "privacy_noise_multiplier" in priv else "–"
            clip = f"{priv['privacy_clip_norm']:.4f}" if "privacy_clip_norm" in priv else "–"
            lines.append(f"| {name} | {label} | {spent} | {sigma} | {clip} | {acc.mean():.3f} ± {acc.std(ddof=1):.3f} "
                         f"| [{low:.3f}, {high:.3f}] |")
    if untuned is not None:
        lines.append(f"| untuned model (no training) | – | – | – | – | {untuned.mean():.3f} ± {untuned.std(ddof=1):.3f} | – |")
    families = [(f"Method comparisons (Holm across these {len(methods)})", methods),
                (f"The cost of privacy (Holm across these {len(costs)})", costs)]
    if learned:
        families.append((f"Learned anything? Each arm minus the untuned model (Holm across these {len(learned)})", learned))
    for title, family in families:
        lines += ["", f"**{title}**: per-seed differences of final accuracy, paired t over seeds; "
                  "* marks p (Holm) < 0.05 with at least 3 seeds.", "",
                  "| comparison | Δ | 95% t interval | p (t) | p (Holm) |", "|---|---|---|---|---|"]
        for r in family:
            lines.append(f"| {r['what']} | {r['mean']:+.3f}{' *' if r['marked'] else ''} | "
                         f"[{r['low']:+.3f}, {r['high']:+.3f}] | {r['p']:.3f} | {r['p_holm']:.3f} |")
    return "\n".join(lines) + "\n"


def figure(seeds, scores, path: Path, untuned=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(EPSILONS))
    for k, m in enumerate(ran(scores)):
        acc = np.array([[scores[m + e][s].mean() for s in seeds] for e in EPSILONS])
        shift = (k - 1.5) * 0.05
        ax.plot(x + shift, acc.mean(1), marker="o", label=METHODS[m])
        for j in range(len(x)):
            ax.scatter(np.full(len(seeds), x[j] + shift), acc[j], s=10, alpha=0.4, color=ax.lines[-1].get_color())
    if untuned is not None:
        ax.axhline(untuned.mean(), color="grey", linestyle="--", label="untuned model")
    ax.set_xticks(x, [f"ε = {label}" for label in EPSILONS.values()])
    ax.set_ylabel("final test accuracy (500 items)")
    ax.set_title(f"Client-level DP, 10 clients, 4 rounds, δ = 0.1\nAG News label skew, SmolLM2-135M "
                 f"({len(seeds)} seeds; dots: seeds)")
    ax.title.set_fontsize(9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--untuned", type=Path, help="folder of `fedlora eval --out` JSONs, seed_S.json")
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    seeds, scores, privacy = read_study(args.study)
    if len(seeds) < 2:
        print(f"{args.study}: fewer than two seeds with every arm finished", file=sys.stderr)
        return 2
    untuned = read_untuned(args.untuned, seeds) if args.untuned else None
    methods, costs, learned = comparisons(seeds, scores, untuned)
    args.md.write_text(markdown(seeds, scores, privacy, methods, costs, learned, untuned))
    figure(seeds, scores, args.png, untuned)
    print(f"wrote {args.md} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
