"""The robustness study (issue 30): final accuracy per method × defence × attack, with the clean
run (same method and defence, no attacker) as reference.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/robustness_study.py --out /work/studies/robust

Grids (each run a normal in-process run with its own directory OUT/GRID/LABEL, resumable: a
finished run is read back, an interrupted one resumes from its checkpoint, so rerunning the same
command continues where it stopped):

  tiny     every method × {none, norm bound, median, trimmed mean 0.3, Krum, Multi-Krum} × {clean,
           sign flip, scale ×10, Gaussian, label flip, under the bound} × {1, 3} attackers of 10
           clients; tiny random Llama on the synthetic two-class task of the tests (which it learns
           to 100 % in these 2 rounds × 4 steps), so the test loss shows what an attack did
           (HierFedLoRA: none and norm bound only; the combines are undefined for it)
  smollm2  FedIT and AFLoRA × {none, norm bound, median, Krum} × {clean, sign flip, scale ×10,
           label flip, under the bound}, 3 attackers of 10; SmolLM2-135M, AG News label skew, 2
           rounds × 4 steps, seed 0 (the learning rates `fedlora tune` chose: docs/tuning.md)

Krum assumes f = 3 attackers everywhere (the defence does not know the attack). After each run
OUT/GRID/results.csv and results.md are rewritten from every finished run's records.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

DATA = "/work/shared/data"
DEFENCES = {
    "none": {"aggregation.norm_bound": None},
    "norm_bound": {},  # the default: 10 × the round's median, reject
    "median": {"aggregation.norm_bound": None, "aggregation.combine": "median"},
    "trimmed_mean": {"aggregation.norm_bound": None, "aggregation.combine": "trimmed_mean", "aggregation.trim": 0.3},
    "krum": {"aggregation.norm_bound": None, "aggregation.combine": "krum", "aggregation.byzantine": 3},
    "multi_krum": {"aggregation.norm_bound": None, "aggregation.combine": "multi_krum", "aggregation.byzantine": 3},
}
ATTACKS = ["clean", "sign_flip", "scale", "gaussian", "label_flip", "under_bound"]
METHODS = ["fedit", "ffa", "flora", "flexlora", "hetlora", "aflora", "hierfedlora"]

TINY = {
    "seed": 0, "threads": 1,
    "model": {"name": "tiny-llama", "compute_dtype": "float32"},
    "data": {"data_dir": DATA, "max_length": 32},  # + the synthetic task (tests/conftest.py): learnable by the tiny model
    "federation": {"num_clients": 10, "client_max_ranks": [8, 8, 4, 4, 4, 4, 2, 2, 2, 2], "rounds": 2,
                   "local_steps": 4, "batch_size": 4, "lr": 0.01},
}
SMOLLM2 = {
    "seed": 0, "threads": 1,
    "model": {"name": "smollm2-135m", "target_modules": ["q_proj", "v_proj"], "compute_dtype": "auto"},
    "lora": {"alpha": 16},
    "data": {"data_dir": DATA, "dataset": "ag_news", "partition": "label_skew", "labels_per_client": 2,
             "test_examples": 200, "max_length": 64},
    "federation": {"num_clients": 10, "client_max_ranks": [64, 32, 16, 16, 8, 8, 4, 4, 4, 4], "rounds": 2,
                   "local_steps": 4, "batch_size": 8, "lr": 0.003, "eval_every": 2},
}
SMOLLM2_LR = {"fedit": 0.01, "aflora": 0.003}  # docs/tuning.md


def algorithm(method: str, grid: str) -> dict[str, Any]:
    if method == "aflora":
        return {"name": method, "server_steps": 2 if grid == "tiny" else 5}
    return {"name": method}


def attack_sets(attack: str, k: int) -> dict[str, Any]:
    return {} if attack == "clean" else {"attack.kind": attack, "attack.attackers": k}


def tiny_grid(data: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """`data`: the synthetic two-class task's data section (tests/conftest.py write_synthetic_task).
    Clean runs first, then 3 attackers, then 1, so a partial grid has every method and defence."""
    tiny = {**TINY, "data": {**TINY["data"], **data}}
    runs = []
    for attack, k in [("clean", 0)] + [(a, k) for k in (3, 1) for a in ATTACKS[1:]]:
        for method in METHODS:
            defences = ["none", "norm_bound"] if method == "hierfedlora" else list(DEFENCES)
            for defence in defences:
                label = f"{method}-{defence}-{attack}" + (f"-{k}" if k else "")
                sets = {**DEFENCES[defence], **attack_sets(attack, k)}
                runs.append((label, {**tiny, "algorithm": algorithm(method, "tiny")}, sets))
    return runs


def smollm2_grid(out: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Clean references first, then attack by attack, so a partial study compares like with like."""
    order = [("clean", "none")] + [(a, d) for a in ("sign_flip", "under_bound", "scale", "label_flip")
                                   for d in ("none", "norm_bound", "median", "krum")]
    order += [("clean", d) for d in ("norm_bound", "median", "krum")]
    runs = []
    for attack, defence in order:
        for method in ("fedit", "aflora"):
            label = f"{method}-{defence}-{attack}" + ("" if attack == "clean" else "-3")
            sets = {**DEFENCES[defence], **attack_sets(attack, 3), "federation.lr": SMOLLM2_LR[method]}
            runs.append((label, {**SMOLLM2, "algorithm": algorithm(method, "smollm2")}, sets))
    return runs


def tiny_grid_in(out: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The tiny grid on the synthetic task written once under OUT/data."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_synthetic_task

    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_grid(write_synthetic_task(folder))


def run_one(run_dir: Path, tree: dict[str, Any], sets: dict[str, Any]) -> None:
    from fedlora.config import build_config
    from fedlora.runtime.checkpoint import has_checkpoint
    from fedlora.runtime.inprocess import Simulation

    if (run_dir / "summary.json").exists():
        return
    if run_dir.exists() and not has_checkpoint(run_dir):
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to resume
    cfg = build_config(tree, sets)
    Simulation(cfg, run_dir, progress=False).run(resume=has_checkpoint(run_dir))


def row(label: str, run_dir: Path) -> dict[str, Any] | None:
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    method, defence, attack, *k = label.split("-")
    attackers = {c["id"] for r in records for c in r["clients"] if c.get("attacker")}
    rejected = [(r["round"], e["client"]) for r in records for e in r["rejected"]]
    clients = sum(len(r["clients"]) for r in records)
    return {
        "method": method, "defence": defence, "attack": attack, "attackers": int(k[0]) if k else 0,
        "final_accuracy": summary["final_accuracy"], "final_test_loss": summary["final_test_loss"],
        "rejected_updates": len(rejected),
        "attacker_updates_accepted": sum(1 for r in records for c in r["clients"] if c.get("attacker")),
        "accepted_updates": clients, "attackers_seen": len(attackers),
        "wall_seconds": round(summary["wall_seconds"], 1),
    }


def write_results(out: Path, labels: list[str]) -> None:
    rows = [r for label in labels if (r := row(label, out / label)) is not None]
    if not rows:
        return
    clean = {(r["method"], r["defence"]): r for r in rows if r["attack"] == "clean"}
    for r in rows:
        ref = clean.get((r["method"], r["defence"]))
        r["accuracy_change_vs_clean"] = (None if ref is None or r["final_accuracy"] is None
                                         else round(r["final_accuracy"] - ref["final_accuracy"], 4))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        ref = clean.get((r["method"], r["defence"]))
        r["test_loss_change_vs_clean"] = (None if ref is None or r["final_test_loss"] is None
                                          else round(r["final_test_loss"] - ref["final_test_loss"], 4))
    (out / "results.md").write_text(
        "Final accuracy (Δ vs the clean run with the same defence) [updates rejected]\n\n"
        + results_table(rows, "final_accuracy", "accuracy_change_vs_clean")
        + "\nFinal test loss (Δ vs the clean run with the same defence)\n\n"
        + results_table(rows, "final_test_loss", "test_loss_change_vs_clean"))


def results_table(rows: list[dict[str, Any]], key: str, change: str) -> str:
    """`key` per (method, attack, attackers) × defence; Δ vs the clean run of that defence."""
    defences = [d for d in DEFENCES if any(r["defence"] == d for r in rows)]
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["method"], r["attack"], r["attackers"]), {})[r["defence"]] = r
    lines = ["| method | attack | k | " + " | ".join(defences) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in defences) + " |"]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or r[key] is None:
            return "–"
        text = f"{r[key]:.3f}"
        if r["attack"] != "clean" and r[change] is not None:
            text += f" ({r[change]:+.3f})"
        if r["rejected_updates"]:
            text += f" [{r['rejected_updates']} rej.]"
        return text

    order = {a: i for i, a in enumerate(ATTACKS)}
    for group in sorted(by_key, key=lambda g: (METHODS.index(g[0]), order[g[1]], g[2])):
        cells = " | ".join(cell(by_key[group].get(d)) for d in defences)
        lines.append(f"| {group[0]} | {group[1]} | {group[2]} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--grids", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (in this order)")
    ap.add_argument("--only", default="", help="run only labels containing this text (smoke tests)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("robustness_study")
    grids = {"tiny": tiny_grid_in, "smollm2": smollm2_grid}
    for grid in args.grids.split(","):
        out = args.out / grid
        out.mkdir(parents=True, exist_ok=True)
        runs = [r for r in grids[grid](out) if args.only in r[0]]
        for i, (label, tree, sets) in enumerate(runs, 1):
            log.info("%s %d/%d: %s", grid, i, len(runs), label)
            try:
                run_one(out / label, tree, sets)
            except Exception:  # noqa: BLE001 - one failing run must not cost the others theirs
                log.exception("%s failed; continuing", label)
            write_results(out, [r[0] for r in runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
