"""AFLoRA's λ designs on real clients, one local round each: does λ² rank the dimensions by
what they contribute, does DDR prune what matters least, and how much does the client learn?

Each design (a set of AFLoRA options) trains the same clients on the same batches of round 1
from the same global A, on one shared base model. Per client it reports the logged diagnostics
(`lambda_spearman`, `lambda_sq_std`, `lambda_moved`, `pruned`, and with `pruning_check` on,
`prune_loss_ddr` / `prune_loss_random`) and the client's loss on its own round batches before
training (the base model) and after (its trained factors, every column on): how far a round
moves it. A cheap proxy, one round, before spending full runs on a design (docs/aflora_study.md).

    python bench/lambda_probe.py configs/compare_agnews.yaml --clients 0,2,6 \
        --out docs/bench/lambda_probe.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from fedlora.algorithms import build_algorithm
from fedlora.algorithms.aflora import AFLoRAOptions
from fedlora.config import load_config, parse_overrides
from fedlora.runtime.inprocess import Federation
from fedlora.runtime.outputs import environment

DESIGNS: dict[str, dict[str, Any]] = {
    "paper": {},  # λ from 1, persisting, Adam at the client lr, B from 0
    "lambda-lr-0.1": {"lambda_lr": 0.1},
    "lambda-sgd": {"lambda_optimizer": "sgd", "lambda_lr": 1.0},
    "unit-sgd-1": {"b_init": "unit", "lambda_init": 0.0, "lambda_persist": False,
                   "lambda_optimizer": "sgd", "lambda_lr": 1.0},
    "unit-sgd-30": {"b_init": "unit", "lambda_init": 0.0, "lambda_persist": False,
                    "lambda_optimizer": "sgd", "lambda_lr": 30.0},
    "unit-adam-0.05": {"b_init": "unit", "lambda_init": 0.0, "lambda_persist": False, "lambda_lr": 0.05},
}
KEYS = ["train_loss", "lambda_spearman", "lambda_sq_std", "lambda_moved", "pruned", "prune_loss_ddr",
        "prune_loss_random"]


def probe(fed: Federation, options: dict[str, Any], clients: list[int], draws: int) -> list[dict[str, Any]]:
    """One round-1 client round per client under AFLoRA with `options`."""
    algo = build_algorithm(AFLoRAOptions(**options, pruning_check=draws), fed.algorithm.setup)
    state = algo.init_state()
    rows = []
    for k in clients:
        ctx = fed.client(k, 1)
        fed.adapters.clear()
        before = ctx.loss()  # no factors loaded: the base model on the round's batches
        payload = algo.payload(state, k)
        update, _ = algo.client_train(ctx, payload, {})
        fed.adapters.load(trained_factors(update.tensors, payload.tensors))
        after = ctx.loss()  # the same batches with the client's trained B'_k = B Λ and its A rows
        fed.adapters.clear()
        m = update.metrics
        rows.append({"client": k, "rank": algo.setup.client_max_ranks[k], "loss_before": before,
                     "loss_after": after, **{key: m.get(key) for key in KEYS}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def trained_factors(upload: dict[str, torch.Tensor], payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The client's model as factors: its uploaded B'_k over the A rows of the columns it trained."""
    names = [k.removesuffix(".mask") for k in upload if k.endswith(".mask")]
    return {**{f"{n}.B": upload[f"{n}.B"] for n in names},
            **{f"{n}.A": payload[f"{n}.A"][upload[f"{n}.mask"] > 0] for n in names}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--clients", default="0,2,6")
    ap.add_argument("--designs", default=",".join(DESIGNS), help=f"from {', '.join(DESIGNS)}")
    ap.add_argument("--draws", type=int, default=4, help="random draws of the pruned-vs-random check")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    unknown = [d for d in args.designs.split(",") if d not in DESIGNS]
    if unknown:
        ap.error(f"--designs: unknown {unknown}; choose from {', '.join(DESIGNS)}")
    cfg = load_config(args.config, {"algorithm.name": "aflora", **parse_overrides(args.set)})  # a compare config has none
    fed = Federation.build(cfg)
    clients = [int(c) for c in args.clients.split(",")]
    result = {"config": str(args.config), "overrides": args.set, "clients": clients, "draws": args.draws,
              "lr": cfg.federation.lr, "designs": {}}
    for name in args.designs.split(","):
        print(f"# {name}: {DESIGNS[name]}", flush=True)
        result["designs"][name] = {"options": DESIGNS[name], "clients": probe(fed, DESIGNS[name], clients, args.draws)}
    result["command"] = shlex.join(["python", "bench/lambda_probe.py", *argv])
    result["environment"] = environment()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
