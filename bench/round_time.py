"""A client round, a step and an evaluation pass: ours vs the usual way, side by side in ONE process.

Contenders, all on the same model, client examples, batch size, local steps, lr and LoRA rank
and targets (issue 13, item 4):

- round, ours: one client round of AFLoRA and of FedIT through fedlora's own in-process path
  (`Federation.client` → `algorithm.client_train`, as `fedlora run` does it).
- round, Trainer per round: how OpenFedLLM and FlowerTune clients train: a PEFT model
  (`get_peft_model`, same rank, targets, alpha), the global adapter loaded into it, then a NEW
  `TrainingArguments` + `transformers.Trainer` per client per round (max_steps = local steps,
  constant lr, AdamW without weight decay, no evaluation, no saving, report_to none) on the
  SAME examples our client draws in its round, formatted as causal-LM prompt + label word.
  Favourable to the Trainer: the PEFT model is built once (FlowerTune's ClientApp builds it in
  every training call), examples arrive tokenised, no gradient checkpointing (FlowerTune's
  template turns it on).
- step: a one-step client round of ours vs a plain PEFT step (`bench/step_time.py`'s) on the
  first batch of that round.
- evaluation: our scoring (`Federation.evaluate`: label rows at the last position) vs full-logit
  scoring (`bench/step_time.py`'s) on the same test examples.

Timings alternate between the contenders (A B C A B C …) and report medians. FLOPs are counted
by torch's FlopCounterMode on one untimed call of each contender (also the warm-up); our round's
count from fedlora's clock (src/fedlora/clock.py) is recorded beside it. GFLOP/s = FLOPs / median
seconds; the fraction is of this CPU's peak in the dtype the run computes in (`compute_dtype`;
fedlora.hardware.peak_gflops, from its table per CPU family).

    python bench/round_time.py --model smollm2-135m --repeats 5 --out docs/bench/round_time.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.flop_counter import FlopCounterMode
from transformers import PrinterCallback, Trainer, TrainingArguments

from fedlora.algorithms import build_algorithm
from fedlora.config import load_config, parse_overrides
from fedlora.data.encode import Encoded, collate, sample_batches
from fedlora.hardware import cpu_model, peak_gflops
from fedlora.models import load_base_model
from fedlora.runtime.inprocess import Federation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import causal_lm_examples, full_logit_eval, peft_step, timed  # noqa: E402

LM_KEYS = ("input_ids", "attention_mask", "labels")


def unbatch(batch: dict) -> list[Encoded]:
    """The examples of a collated classification batch, padding removed."""
    lengths = batch["attention_mask"].sum(1).tolist()
    return [Encoded(ids[:n].tolist(), int(t)) for ids, n, t in zip(batch["input_ids"], lengths, batch["target"])]


def federations(config: str, overrides: dict, methods: list[str]) -> dict[str, Federation]:
    """One Federation (one loaded model, one task) shared by every method: only the algorithm
    differs (the config's own options for its method, defaults for the others)."""
    cfg = load_config(config, overrides)
    cfgs = {m: cfg if cfg.algorithm.name == m else load_config(config, {**overrides, "algorithm": {"name": m}})
            for m in methods}
    fed = Federation.build(cfgs[methods[0]])
    return {m: dataclasses.replace(fed, cfg=c, algorithm=build_algorithm(c.algorithm, fed.algorithm.setup))
            for m, c in cfgs.items()}


def our_round(fed: Federation, client: int, steps: int | None = None) -> Callable[[], float]:
    """A client round (or a `steps`-step round) through the runtime's own path; returns the
    clock's FLOP count of it."""
    state = fed.algorithm.init_state()

    def run() -> float:
        ctx = fed.client(client, 1)
        if steps is not None:
            ctx = dataclasses.replace(ctx, local_steps=steps)
        fed.algorithm.client_train(ctx, fed.algorithm.payload(state, client), {})
        fed.adapters.clear()
        return ctx.flops

    return run


def trainer_round(peft_model, examples: list[Encoded], cfg, pad_id: int, workdir: str) -> Callable[[], None]:
    """A client round as OpenFedLLM / FlowerTune write it: global adapter in, new Trainer, train."""
    f = cfg.federation
    global_adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}

    def collator(items: list[Encoded]) -> dict:
        batch = collate(items, pad_id)
        return {k: batch[k] for k in LM_KEYS}

    def run() -> None:
        set_peft_model_state_dict(peft_model, global_adapter)
        args = TrainingArguments(
            output_dir=workdir, max_steps=f.local_steps, per_device_train_batch_size=f.batch_size,
            learning_rate=f.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
            remove_unused_columns=False, bf16=cfg.model.compute_dtype == "bfloat16", seed=cfg.seed,
        )
        trainer = Trainer(model=peft_model, args=args, train_dataset=examples, data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # quiet: the end-of-training metrics line
        trainer.train()
        get_peft_model_state_dict(peft_model)  # the upload

    return run


def count_flops(fn: Callable) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny-llama"])
    ap.add_argument("--methods", default="aflora,fedit", help="our methods to time (comma-separated)")
    ap.add_argument("--rank", type=int, default=16, help="every client's LoRA rank, ours and PEFT's")
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--train-examples", type=int, default=4000, help="training pool (start-up cost only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-examples", type=int, default=256, help="0 skips the evaluation timing")
    ap.add_argument("--eval-repeats", type=int, default=3)
    ap.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: cpuinfo's cpu MHz)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default="docs/bench/round_time.json")
    args = ap.parse_args()

    user = parse_overrides(args.set)
    num_clients = user.get("federation.num_clients") or load_config(args.config).federation.num_clients
    overrides = {
        "model.name": args.model, "data.train_examples": args.train_examples,
        "data.test_examples": max(args.eval_examples, 1),
        "federation.client_max_ranks": [args.rank] * num_clients, **user,
    }
    methods = args.methods.split(",")
    feds = federations(args.config, overrides, methods)
    fed = feds[methods[0]]
    cfg = fed.cfg
    dtype, pad_id, f = cfg.model.compute_dtype, fed.pad_id, cfg.federation

    base, _ = load_base_model(cfg.model.name, seed=cfg.seed)
    # transformers marks a GGUF-loaded model as quantised (GGUF) although its weights are
    # dequantised float32, and Trainer then refuses to train it: clear the marker
    if getattr(base, "hf_quantizer", None) is not None:
        base.hf_quantizer.remove_quantization_config(base)
    peft_model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                 target_modules=list(cfg.model.target_modules)))
    client_batches = sample_batches(fed.task.clients[args.client], f.batch_size, f.local_steps,
                                    fed.client(args.client, 1).seed, pad_id)
    drawn = [e for b in client_batches for e in unbatch(b)]  # the examples our client trains on
    lm_examples = causal_lm_examples(drawn, fed.task.label_ids)
    first_lm_batch = collate(lm_examples[: f.batch_size], pad_id)
    peft_opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=f.lr)
    workdir = tempfile.mkdtemp(prefix="round_time_")

    rounds = {f"ours {m}": our_round(feds[m], args.client) for m in methods}
    rounds["Trainer per round"] = trainer_round(peft_model, lm_examples, cfg, pad_id, workdir)
    steps = {f"ours {m}": our_round(feds[m], args.client, steps=1) for m in methods}
    steps["plain PEFT"] = lambda: peft_step(peft_model, peft_opt, first_lm_batch, dtype)
    groups = {"round": (rounds, args.repeats), "step": (steps, args.repeats)}
    if args.eval_examples:
        state = feds[methods[0]].algorithm.init_state()
        groups["evaluation"] = ({
            "ours": lambda: fed.evaluate(state),
            "full-logit": lambda: full_logit_eval(peft_model, fed.task.test, fed.task.label_ids, pad_id, dtype),
        }, args.eval_repeats)

    cores = len(os.sched_getaffinity(0))
    peak, assumption = peak_gflops(cores, dtype, args.ghz)
    print(f"{dtype} peak: {assumption}; torch threads: {torch.get_num_threads()}")
    results: dict = {
        "machine": {"processor": cpu_model(), "cores": cores, "threads": torch.get_num_threads(),
                    "peak_dtype": dtype, "peak_gflops": peak, "peak_assumption": assumption, "torch": torch.__version__},
        "setup": {"config": args.config, "model": cfg.model.name, "methods": methods, "rank": args.rank,
                  "targets": list(cfg.model.target_modules), "batch": f.batch_size, "local_steps": f.local_steps,
                  "lr": f.lr, "max_length": cfg.data.max_length, "compute_dtype": dtype,
                  "eval_examples": len(fed.task.test), "repeats": args.repeats, "eval_repeats": args.eval_repeats},
    }
    for group, (contenders, repeats) in groups.items():
        flops = {name: count_flops(fn) for name, fn in contenders.items()}  # also the warm-up
        runs: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                runs[name] += timed(fn, 1)
        rows = {}
        for name in contenders:
            s = statistics.median(runs[name])
            rows[name] = {"seconds": s, "runs": runs[name], "gflop": flops[name] / 1e9,
                          "gflops_per_s": flops[name] / 1e9 / s,
                          "fraction_of_peak": flops[name] / 1e9 / s / peak if peak else None}
        results[group] = rows
    for m in methods:  # fedlora's own FLOP model of the same round, beside the counted one
        results["round"][f"ours {m}"]["clock_gflop"] = rounds[f"ours {m}"]() / 1e9
    results["ratios"] = {
        **{f"round ours {m} / Trainer": results["round"][f"ours {m}"]["seconds"]
           / results["round"]["Trainer per round"]["seconds"] for m in methods},
        **{f"step ours {m} / plain PEFT": results["step"][f"ours {m}"]["seconds"]
           / results["step"]["plain PEFT"]["seconds"] for m in methods},
    }
    if "evaluation" in results:
        ev = results["evaluation"]
        results["ratios"]["evaluation speed-up (full-logit s / ours s)"] = ev["full-logit"]["seconds"] / ev["ours"]["seconds"]
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def print_table(results: dict) -> None:
    print(f"| what | contender | median s | GFLOP | GFLOP/s | % of {results['machine']['peak_dtype']} peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for group in ("round", "step", "evaluation"):
        for name, row in results.get(group, {}).items():
            frac = f"{100 * row['fraction_of_peak']:.0f}%" if row["fraction_of_peak"] is not None else "n/a"
            print(f"| {group} | {name} | {row['seconds']:.3f} | {row['gflop']:.2f} | {row['gflops_per_s']:.1f} | {frac} |")
    for name, ratio in results["ratios"].items():
        print(f"{name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
