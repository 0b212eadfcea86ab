"""Wall time of the same 3-round tiny run: in-process (`fedlora run`) vs local Flower
(`fedlora flower run` against a SuperLink and 3 SuperNodes on 127.0.0.1, started once).

Both are timed as whole commands (a fresh process each, model loading included), alternating
(in-process, Flower, in-process, Flower, …) so machine noise hits both; we report medians,
their ratio, and the sums of the rounds' `wall_seconds` (the part after model loading).
Also checks that both runs end with the same global adapter.

    python bench/flower_overhead.py [--repeats 3] [--out docs/bench/flower_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from fedlora.flower.launch import LocalFederation, flower_env
from fedlora.hardware import cpu_model

ROOT = Path(__file__).resolve().parents[1]
NODES = 3


def tiny_config(data_dir: str) -> dict:
    return {
        "seed": 0, "threads": 1,
        "model": {"name": "tiny-llama", "compute_dtype": "float32"},
        "data": {"data_dir": data_dir, "train_examples": 400, "test_examples": 48, "max_length": 32},
        "federation": {"num_clients": NODES, "client_max_ranks": [8, 4, 2], "rounds": 3,
                       "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "algorithm": {"name": "aflora", "server_steps": 2},
    }


def timed(cmd: list[str], out: Path) -> tuple[float, float]:
    """(command wall seconds, sum of the rounds' wall_seconds)."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=flower_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    return wall, json.loads((out / "summary.json").read_text())["wall_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default="docs/bench/flower_overhead.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flower-bench-"))
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(args.data_dir)))
    cli = [sys.executable, "-m", "fedlora.cli"]
    runs: dict[str, list[tuple[float, float]]] = {"inprocess": [], "flower": []}
    t = time.perf_counter()
    with LocalFederation(work / "federation", nodes=NODES) as fed:
        startup = time.perf_counter() - t
        for i in range(args.repeats):
            ip, fl = work / f"inprocess-{i}", work / f"flower-{i}"
            runs["inprocess"].append(timed([*cli, "run", str(cfg), "--out", str(ip), "--quiet"], ip))
            runs["flower"].append(timed([*cli, "flower", "run", str(cfg), "--out", str(fl), "--superlink",
                                         fed.address, "--insecure", "--min-clients", str(NODES), "--quiet"], fl))
            a, b = (load_file(str(d / "final_state.safetensors")) for d in (ip, fl))
            assert all(torch.equal(a[k], b[k]) for k in a), "Flower and in-process results differ"
            print(f"repeat {i}: in-process {runs['inprocess'][-1][0]:.1f} s, Flower {runs['flower'][-1][0]:.1f} s",
                  flush=True)

    med = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    rounds = {k: statistics.median(r for _, r in v) for k, v in runs.items()}
    result = {
        "what": "3 rounds, AFLoRA, tiny-llama, 3 clients (400 AG News examples), threads=1",
        "repeats": args.repeats,
        "superlink_and_supernodes_startup_seconds": startup,
        "command_seconds": {k: [w for w, _ in v] for k, v in runs.items()},
        "median_command_seconds": med,
        "ratio_flower_over_inprocess": med["flower"] / med["inprocess"],
        "median_rounds_wall_seconds": rounds,
        "same_final_adapter": True,
        "machine": {"platform": platform.platform(), "processor": cpu_model()},
        "command": "python bench/flower_overhead.py --repeats " + str(args.repeats),
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
