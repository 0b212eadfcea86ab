"""Run one config under several `--set` variants, one after another, and tabulate the results.

Used for AFLoRA's hyperparameters the paper does not give (β, γ, α, server steps, λ's
learning rate) and for its ablations (ddr=false, dlf=false). Each variant is a normal
`fedlora run` (resumable, with its own run directory); the table is written as markdown.

    python bench/sweep.py configs/quickstart.yaml --out runs/sweep \
        --base data.test_examples=500 \
        --variant default= --variant no-ddr=algorithm.ddr=false ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", action="append", default=[], help="KEY=VALUE applied to every variant")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=KEY=VALUE[,KEY=VALUE...] (NAME= for the config as is)")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for spec in args.variant:
        name, _, sets = spec.partition("=")
        overrides = [*args.base, *[s for s in sets.split(",") if s]]
        run_dir = out / name
        cmd = [sys.executable, "-m", "fedlora.cli", "run", args.config, "--quiet", "--out", str(run_dir)]
        for o in overrides:
            cmd += ["--set", o]
        if (run_dir / "summary.json").exists():
            pass  # finished earlier
        elif (run_dir / "checkpoint.safetensors").exists():
            subprocess.run([sys.executable, "-m", "fedlora.cli", "run", "--quiet", "--resume", str(run_dir)], check=True)
        else:
            subprocess.run(cmd, check=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        last = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        rows.append((name, " ".join(overrides) or "(config as is)", summary, last))
        print(name, summary["final_accuracy"], flush=True)
    lines = ["| variant | overrides | final accuracy | mean client cost % | mean rank, last round | wall s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, sets, s, last in rows:
        ranks = list(last["ranks"].values())
        lines.append(f"| {name} | `{sets}` | {s['final_accuracy']:.3f} | {s['mean_client_cost_percent']:.4f} "
                     f"| {sum(ranks) / len(ranks):.1f} | {s['wall_seconds']:.0f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
