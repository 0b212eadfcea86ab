"""Does AFLoRA's server fine-tuning of A lower the held-out public loss, and with which steps,
lr and α? Measured on a finished AFLoRA run's own round, without rerunning any client.

Round R's server step is fully determined by the run directory: the base model with the merges
of rounds 1..R-1 replayed, the aggregated B of round R (merge R's B) and the A the clients
trained against (merge R-1's A', the fused A of the round before; round 1: the method's initial
A). The server's batches come from the run's seed. So this rebuilds that step, first with the
run's own options (its logged `server_heldout_before/_ft/_after` must come out again: a check
that the reconstruction is exact), then for every (lr, steps) of the grid and every α of Eq. 11
(A' = α A + (1 − α) A_FT), all on the same held-out public examples (`--heldout`, more than the
run's 16 for a steadier measure). With `--test-examples N` each setting's fused model is also
scored on N test items (the run's own test subset, first N).

    python bench/server_finetune.py RUN_DIR --round 2 --lrs 1e-4,1e-3,1e-2 --steps 5,20 \
        --alphas 0,0.5 --heldout 64 --out docs/bench/server_finetune.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedlora.algorithms.aflora import fuse
from fedlora.config import load_config
from fedlora.evaluate import evaluate_task
from fedlora.runtime.checkpoint import Checkpoint, load_merges
from fedlora.runtime.inprocess import Federation
from fedlora.runtime.outputs import environment, read_metrics

Factors = dict[str, torch.Tensor]


def server_inputs(run_dir: Path, round_: int, fed: Federation) -> tuple[Factors, Factors]:
    """(B of round `round_`'s aggregate, the A its clients trained against), after replaying the
    merges of the rounds before it into `fed`'s base model (each merge verified by SHA-256)."""
    ckpt = Checkpoint.load(run_dir)
    if not 1 <= round_ <= ckpt.round:
        raise SystemExit(f"--round: the run has rounds 1..{ckpt.round}")
    merges = load_merges(run_dir, ckpt.round, ckpt.merges)
    if len(merges) != ckpt.round:
        raise SystemExit(f"{run_dir}: not every round merged (not an AFLoRA run?)")
    for merge in merges[: round_ - 1]:
        fed.adapters.merge(merge)
    B = {f"{name}.B": B for name, (B, _) in merges[round_ - 1].items()}
    if round_ > 1:
        A = {f"{name}.A": A for name, (_, A) in merges[round_ - 2].items()}
    else:
        A = {k: v for k, v in fed.algorithm.init_state().items() if k.endswith(".A")}
    return B, A


def finetune(fed: Federation, round_: int, B: Factors, A: Factors, lr: float, steps: int,
             batch_size: int) -> tuple[Factors, list[float]]:
    """A_FT after `steps` server steps at `lr` from (B, A), with the run's batches of this round."""
    server = fed.server(round_)
    fed.adapters.load({**B, **A}, trainable={"A"})
    layers = [fed.adapters.layers[k.removesuffix(".A")] for k in A]
    losses = server.train_public([([layer.A for layer in layers], lr)], steps, batch_size) if steps else []
    tuned = {k: v for k, v in fed.adapters.state().items() if k.endswith(".A")}
    fed.adapters.clear()
    return tuned, losses


def heldout_loss(fed: Federation, round_: int, factors: Factors) -> float:
    fed.adapters.load(factors)
    try:
        return fed.server(round_).heldout_loss()
    finally:
        fed.adapters.clear()


def test_accuracy(fed: Federation, factors: Factors) -> float:
    fed.adapters.load(factors)
    try:
        metrics, _ = evaluate_task(fed.model, fed.task, fed.pad_id, fed.cfg.federation.eval_batch_size,
                                   fed.cfg.model.compute_dtype)
        return metrics["accuracy"]
    finally:
        fed.adapters.clear()


def relative_change(A: Factors, tuned: Factors) -> float:
    """‖A_FT − A‖_F / ‖A‖_F over all modules (the run's `server_a_change`)."""
    moved = sum(float((tuned[k] - A[k]).pow(2).sum()) for k in A)
    return (moved / sum(float(A[k].pow(2).sum()) for k in A)) ** 0.5


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    ap.add_argument("--steps", default="5,20")
    ap.add_argument("--alphas", default="0,0.5")
    ap.add_argument("--heldout", type=int, default=64, help="held-out public examples of the sweep")
    ap.add_argument("--test-examples", type=int, default=0, help="also score each setting on N test items")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir = args.run_dir
    cfg = load_config(run_dir / "config.yaml")
    opts = cfg.algorithm
    if opts.name != "aflora":
        raise SystemExit(f"{run_dir}: an {opts.name} run; this measures AFLoRA's server step")
    logged = next(r for r in read_metrics(run_dir) if r["round"] == args.round)

    # 1. the run's own server step, on the run's held-out examples: must reproduce its log
    fed = Federation.build(cfg)
    B, A = server_inputs(run_dir, args.round, fed)
    tuned, _ = finetune(fed, args.round, B, A, opts.server_lr, opts.server_steps, opts.server_batch_size)
    again = {"server_heldout_before": heldout_loss(fed, args.round, {**B, **A}),
             "server_heldout_ft": heldout_loss(fed, args.round, {**B, **tuned}),
             "server_heldout_after": heldout_loss(fed, args.round, {**B, **{k: fuse(A[k], tuned[k], opts.alpha)
                                                                            for k in A}}),
             "server_a_change": relative_change(A, tuned)}
    check = {k: {"logged": logged.get(k), "rebuilt": v} for k, v in again.items()}
    print(json.dumps(check, indent=1))
    del fed

    # 2. the sweep, on --heldout examples (and optionally --test-examples test items)
    sweep = {"public_data.heldout_examples": args.heldout}
    if args.test_examples:  # a validation run's "test" items are its validation carve
        sweep["data.test_examples"] = min(args.test_examples, cfg.data.test_examples)
    fed = Federation.build(load_config(run_dir / "config.yaml", sweep))
    B, A = server_inputs(run_dir, args.round, fed)
    before = heldout_loss(fed, args.round, {**B, **A})
    rows = [{"lr": None, "steps": 0, "alpha": None, "heldout_loss": before, "a_change": 0.0,
             "test_accuracy": test_accuracy(fed, {**B, **A}) if args.test_examples else None}]
    for lr in floats(args.lrs):
        for steps in [int(s) for s in floats(args.steps)]:
            start = time.perf_counter()
            tuned, losses = finetune(fed, args.round, B, A, lr, steps, opts.server_batch_size)
            seconds = time.perf_counter() - start
            for alpha in floats(args.alphas):
                fused = {k: fuse(A[k], tuned[k], alpha) for k in A}
                rows.append({"lr": lr, "steps": steps, "alpha": alpha, "seconds": seconds,
                             "train_loss_first": losses[0] if losses else None,
                             "train_loss_last": losses[-1] if losses else None,
                             "heldout_loss": heldout_loss(fed, args.round, {**B, **fused}),
                             "a_change": relative_change(A, fused),
                             "test_accuracy": test_accuracy(fed, {**B, **fused}) if args.test_examples else None})
                print(json.dumps(rows[-1]), flush=True)
    result = {"run_dir": str(run_dir), "round": args.round, "heldout_examples": args.heldout,
              "test_examples": args.test_examples or None, "server_batch_size": opts.server_batch_size,
              "reproduction": check, "sweep": rows, "command": " ".join(["python", *sys.argv]),
              "environment": environment()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
