"""Re-derive a published time-to-accuracy study on the FLOP-counted server clock, without training.

Until issue 31 a round's simulated time added the server's *measured* seconds
(`devices.server_time: measured`): for AFLoRA, 36-58 wall seconds of A fine-tuning per round on
this loaded machine, beside client rounds simulated at 4-14 s. The new clock charges the
server's training FLOPs on a declared server device instead. Everything that needs is already
fixed by a run's directory: the server's public batches are drawn from the run's seed and round
(`Federation.server`), and the factors it trains have the shapes the config gives (A of every
target module at r_max rows, trainable; B frozen). So this rebuilds each run's model and public
set from its config.yaml, counts each round's server FLOPs with the runtime's own function
(`clock.lm_train_flops`), replaces the measured server seconds in every record's `sim_seconds`
(and `sim_time`) by FLOPs / server throughput, and rebuilds the comparison's time-to-accuracy
tables from those records in a copy (`fedlora report`'s code path). The client part of each
record is untouched: it was already counted in FLOPs.

    python bench/rederive_server_clock.py docs/tta_3seeds --out /work/studies/evidence/rederive/tta_3seeds \
        --server-flops 1e13 [--publish docs/tta_3seeds/flop_clock]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from fedlora.clock import lm_train_flops
from fedlora.compare import rebuild_comparison
from fedlora.config import build_config, load_yaml
from fedlora.data.encode import sample_batches
from fedlora.devices import PRESETS
from fedlora.runtime.inprocess import Federation
from fedlora.runtime.outputs import read_metrics, write_metrics


def server_flops_per_round(run_dir: Path, rounds: int) -> list[float]:
    """Each round's server training FLOPs, as the runtime now counts them (0 without server steps)."""
    cfg = build_config(load_yaml((run_dir / "config.yaml").read_text()))
    opts = cfg.algorithm
    if cfg.algorithm.name != "aflora" or not opts.dlf or opts.server_steps == 0:
        return [0.0] * rounds
    fed = Federation.build(cfg)
    state = fed.algorithm.init_state()  # A at r_max rows: the shape the server trains every round
    factors = {**state, **{k[:-2] + ".B": torch.zeros(m, state[k].shape[0])
                           for k in state for m in [fed.adapters.shapes()[k[:-2]][0]]}}
    out = []
    for t in range(1, rounds + 1):
        server = fed.server(t)
        batches = sample_batches(server.examples, opts.server_batch_size, opts.server_steps, server.seed, fed.pad_id)
        fed.adapters.load(factors, trainable={"A"})
        try:
            out.append(lm_train_flops(fed.model, fed.adapters, batches))
        finally:
            fed.adapters.clear()
    return out


def rederive(source: Path, out: Path, server_flops: float) -> list[dict]:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.png", "published.json"))
    changed = []
    for metrics in sorted(out.glob("seed_*/*/metrics.jsonl")):
        run = metrics.parent
        cfg_text = (run / "config.yaml").read_text()
        measured = "server_time: measured" in cfg_text
        history = read_metrics(run)
        flops = server_flops_per_round(run, len(history))
        sim_time = 0.0
        for r, f in zip(history, flops):
            old_server = r["server_seconds"] if measured else 0.0
            r["server_flops"], r["server_sim_seconds"] = f, f / server_flops
            r["sim_seconds"] = r["sim_seconds"] - old_server + r["server_sim_seconds"]
            sim_time += r["sim_seconds"]
            r["sim_time"] = sim_time
        write_metrics(run, history)
        changed.append({"run": str(run.relative_to(out)), "server_flops_per_round": flops[0] if flops else 0.0,
                        "measured_server_seconds_per_round": sum(r["server_seconds"] for r in history) / len(history)})
    rebuild_comparison(out)
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--server-flops", type=float, default=PRESETS["server"].flops)
    ap.add_argument("--publish", type=Path, help="copy the re-derived tta tables here")
    args = ap.parse_args()
    changed = rederive(args.source, args.out, args.server_flops)
    print(json.dumps(changed, indent=1))
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("tta.csv", "tta_seeds.csv", "tta_sweep.csv"):
            if (args.out / name).exists():
                shutil.copy(args.out / name, args.publish / name)
        (args.publish / "runs.json").write_text(json.dumps(
            {"source": str(args.source), "server_flops_per_second": args.server_flops, "runs": changed}, indent=1))


if __name__ == "__main__":
    main()
