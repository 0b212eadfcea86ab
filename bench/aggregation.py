"""Server aggregation time per round, per method, as the number of client updates grows.

The updates have the shapes of SmolLM2-135M's LoRA targets (q_proj 576×576 and v_proj
192×576 in 30 layers), client max ranks cycle through the paper's [64,32,16,16,8,8,4,4,4,4].
Ten distinct random updates (one per position in the cycle) are reused by reference for
every simulated client, so 1,000 updates fit in memory while the server does the full
work for each. Timed: `Algorithm.aggregate` only (AFLoRA without its server-side training
steps, which are training, not aggregation; `dlf: false`). Methods alternate inside each
repeat, so machine noise hits all of them; medians are reported.

    python bench/aggregation.py [--clients 10,100,1000] [--repeats 5] [--out docs/bench/aggregation.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from pydantic import TypeAdapter

from fedlora.algorithms import ALGORITHMS, AlgorithmOptions
from fedlora.algorithms.base import FederationSetup, Update
from fedlora.config import PAPER_CLIENT_RANKS
from fedlora.hardware import cpu_model

LAYERS, HIDDEN, KV = 30, 576, 192
SHAPES = {f"model.layers.{i}.self_attn.{p}": (m, HIDDEN) for i in range(LAYERS)
          for p, m in (("q_proj", HIDDEN), ("v_proj", KV))}
OPTIONS = {"aflora": {"dlf": False}, "hierfedlora": {"plan": "fixed", "groups": 4}}  # full depth, τ 1


def random_update(kind: str, rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One client's upload in the method's own format."""
    out = {}
    for name, (m, n) in SHAPES.items():
        if kind == "aflora":
            out[f"{name}.B"] = torch.randn(m, rank, generator=g) * 0.01
            out[f"{name}.mask"] = torch.ones(rank)
        elif kind in ("fedit", "ffa", "hierfedlora"):
            out[f"{name}.B"] = torch.randn(m, 4, generator=g) * 0.01
            if kind != "ffa":
                out[f"{name}.A"] = torch.randn(4, n, generator=g) * 0.01
        else:
            out[f"{name}.A"] = torch.randn(rank, n, generator=g) * 0.01
            out[f"{name}.B"] = torch.randn(m, rank, generator=g) * 0.01
    return out


def setup_for(num_clients: int) -> FederationSetup:
    ranks = [PAPER_CLIENT_RANKS[k % len(PAPER_CLIENT_RANKS)] for k in range(num_clients)]
    labels = [[50, 50, 0, 0], [0, 0, 50, 50]] * (num_clients // 2) + [[25] * 4] * (num_clients % 2)
    return FederationSetup(SHAPES, ranks, [100] * num_clients, scaling=0.25, seed=0,
                           module_layers={n: int(n.split(".")[2]) for n in SHAPES}, num_layers=LAYERS,
                           label_counts=labels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(sorted(ALGORITHMS)))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/bench/aggregation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    parse = TypeAdapter(AlgorithmOptions).validate_python
    g = torch.Generator().manual_seed(0)
    cycle = {m: [random_update(m, r, g) for r in PAPER_CLIENT_RANKS] for m in methods}
    results = []
    for n in [int(c) for c in args.clients.split(",")]:
        setup = setup_for(n)
        algos = {m: ALGORITHMS[m](parse({"name": m, **OPTIONS.get(m, {})}), setup) for m in methods}
        states = {m: a.init_state() for m, a in algos.items()}
        updates = {m: [Update(k, cycle[m][k % 10], 100) for k in range(n)] for m in methods}
        times: dict[str, list[float]] = {m: [] for m in methods}
        repeats = args.repeats if n < 1000 else max(3, args.repeats // 2)
        for _ in range(repeats):
            for m in methods:  # alternate methods inside each repeat
                t = time.perf_counter()
                algos[m].aggregate(states[m], updates[m], server=None)
                times[m].append(time.perf_counter() - t)
        for m in methods:
            med = statistics.median(times[m])
            results.append({"method": m, "clients": n, "median_seconds": med, "runs": times[m]})
            print(f"{m:>9} {n:>5} clients: median {med:.3f} s over {len(times[m])} runs", flush=True)
        del updates, states, algos
    info = {"machine": platform.platform(), "processor": cpu_model(), "threads": args.threads,
            "torch": torch.__version__, "command": "python bench/aggregation.py " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
            "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
