"""Does AFLoRA's server fine-tuning of A lower the held-out public loss, and with which steps,
lr and α? Measured on a finished AFLoRA run's own round, without rerunning any client.

Round R's server step is fully determined by the run directory: the base model with the merges
of the rounds before R replayed, the aggregated B of round R (merge R's B) and the A the
clients trained against (the A' of the latest merge before R; none: the method's initial A).
The server's batches come from the run's seed. So this rebuilds that step (the checkpoint,
config and merges verified as a resume verifies them, on the run's thread count), first with
the run's own options: its logged `server_heldout_before/_ft/_after` and `server_a_change` must
come out again, or it stops. Then it runs every (lr, steps) of the grid and every α of Eq. 11
(A' = α A + (1 − α) A_FT), all on the same held-out public examples (`--heldout`, more than
the run's 16 for a steadier measure). With `--test-examples N` each setting's fused model is
also scored on the run's evaluation set with N items (a tuning run's: its validation carve).

    python bench/server_finetune.py RUN_DIR --round 2 --lrs 1e-4,1e-3,1e-2 --steps 5,20 \
        --alphas 0,0.5 --heldout 64 --out docs/bench/server_finetune.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from fedlora.algorithms.aflora import a_change, finetune_a, fuse, heldout_loss_with
from fedlora.algorithms.base import timed
from fedlora.config import RunConfig, load_config
from fedlora.errors import ConfigError
from fedlora.evaluate import evaluate_task
from fedlora.runtime.inprocess import Federation
from fedlora.runtime.outputs import environment, read_metrics
from fedlora.runtime.rundir import verify_run

Factors = dict[str, torch.Tensor]


Merges = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]


def verified_merges(run_dir: Path, cfg: RunConfig, round_: int) -> tuple[Merges, int]:
    """(every merge by round, the run's thread count), verified as a resume verifies them."""
    ckpt, merges = verify_run(run_dir, cfg)
    by_round = dict(zip(sorted(ckpt.merges), merges))
    if round_ not in by_round:
        raise ConfigError(f"--round {round_}: the run merged nothing that round (no server step to rebuild)")
    return by_round, ckpt.threads


def server_inputs(by_round: Merges, round_: int, fed: Federation) -> tuple[Factors, Factors]:
    """(B of round `round_`'s aggregate, the A its clients trained against), after replaying the
    merges of the rounds before it into `fed`'s base model."""
    earlier = [t for t in by_round if t < round_]
    for t in earlier:
        fed.adapters.merge(by_round[t])
    B = {f"{name}.B": B for name, (B, _) in by_round[round_].items()}
    if earlier:
        A = {f"{name}.A": A for name, (_, A) in by_round[max(earlier)].items()}
    else:
        A = {k: v for k, v in fed.algorithm.init_state().items() if k.endswith(".A")}
    return B, A


def score(fed: Federation, factors: Factors) -> float | None:
    """Accuracy on the run's evaluation set with `factors` loaded (None: a task without accuracy)."""
    fed.adapters.load(factors)
    try:
        metrics, _ = evaluate_task(fed.model, fed.task, fed.pad_id, fed.cfg.federation.eval_batch_size,
                                   fed.cfg.model.compute_dtype)
        return metrics.get("accuracy")
    finally:
        fed.adapters.clear()


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build(cfg: RunConfig, threads: int) -> Federation:
    fed = Federation.build(cfg)
    torch.set_num_threads(threads)  # the run's: sums over threads round differently
    return fed


def reproduce(run_dir: Path, cfg: RunConfig, round_: int, logged: dict[str, Any], by_round: Merges,
              threads: int) -> dict[str, dict[str, float]]:
    """The run's own server step again, on the run's held-out examples; stops unless it matches."""
    fed = build(cfg, threads)
    opts = fed.cfg.algorithm
    B, A = server_inputs(by_round, round_, fed)
    server = fed.server(round_)
    tuned, _ = finetune_a(server, {**B, **A}, opts.server_lr, opts.server_steps, opts.server_batch_size)
    again = {"server_heldout_before": heldout_loss_with(server, {**B, **A}),
             "server_heldout_ft": heldout_loss_with(server, {**B, **tuned}),
             "server_heldout_after": heldout_loss_with(server, {**B, **{k: fuse(A[k], tuned[k], opts.alpha) for k in A}}),
             "server_a_change": a_change(A, tuned)}
    check = {k: {"logged": logged.get(k), "rebuilt": v} for k, v in again.items()}
    differ = [k for k, pair in check.items() if pair["logged"] != pair["rebuilt"]]
    if differ:
        raise ConfigError(f"{run_dir}: round {round_}'s server step does not come out again ({', '.join(differ)}: "
                          f"{[check[k] for k in differ]}); not measuring a step that is not the run's")
    return check


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    ap.add_argument("--steps", default="5,20")
    ap.add_argument("--alphas", default="0,0.5")
    ap.add_argument("--heldout", type=int, default=64, help="held-out public examples of the sweep")
    ap.add_argument("--test-examples", type=int, default=0,
                    help="also score each setting on N test items (a tuning run: its whole validation carve)")
    ap.add_argument("--out", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    run_dir = args.run_dir
    cfg = load_config(run_dir / "config.yaml")
    opts = cfg.algorithm
    if opts.name != "aflora" or not opts.uses_public_data:
        ap.error(f"{run_dir}: not an AFLoRA run with server fine-tuning (algorithm {opts.name})")
    logged = next((r for r in read_metrics(run_dir) if r["round"] == args.round), None)
    if logged is None or "server_heldout_before" not in logged:
        ap.error(f"--round {args.round}: the run logged no held-out server losses that round")
    by_round, threads = verified_merges(run_dir, cfg, args.round)
    check = reproduce(run_dir, cfg, args.round, logged, by_round, threads)
    print(json.dumps(check, indent=1))

    sweep: dict[str, Any] = {"public_data.heldout_examples": args.heldout}
    if args.test_examples and not cfg.data.validation_examples:
        sweep["data.test_examples"] = args.test_examples  # a tuning run scores its validation carve whole
    fed = build(load_config(run_dir / "config.yaml", sweep), threads)
    B, A = server_inputs(by_round, args.round, fed)
    server = fed.server(args.round)
    before = heldout_loss_with(server, {**B, **A})
    rows = [{"lr": None, "steps": 0, "alpha": None, "heldout_loss": before, "a_ft_change": 0.0,
             "score": score(fed, {**B, **A}) if args.test_examples else None}]
    for lr in floats(args.lrs):
        for steps in [int(s) for s in floats(args.steps)]:
            (tuned, losses), seconds = timed(lambda: finetune_a(server, {**B, **A}, lr, steps, opts.server_batch_size))
            for alpha in floats(args.alphas):
                fused = {k: fuse(A[k], tuned[k], alpha) for k in A}
                rows.append({"lr": lr, "steps": steps, "alpha": alpha, "seconds": seconds,
                             "train_loss_first": losses[0] if losses else None,
                             "train_loss_last": losses[-1] if losses else None,
                             "heldout_loss": heldout_loss_with(server, {**B, **fused}),
                             "a_ft_change": a_change(A, tuned),  # ‖A_FT − A‖/‖A‖; A' moves (1 − α) of it
                             "score": score(fed, {**B, **fused}) if args.test_examples else None})
                print(json.dumps(rows[-1]), flush=True)
    result = {"run_dir": str(run_dir), "round": args.round, "heldout_examples": args.heldout,
              "evaluation_items": len(fed.task.test) if args.test_examples else None,
              "server_batch_size": opts.server_batch_size, "reproduction": check, "sweep": rows,
              "command": shlex.join(["python", "bench/server_finetune.py", *argv]), "environment": environment()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a damaged or edited run directory, a step that does not reproduce
        print(err, file=sys.stderr)
        sys.exit(2)
