"""Where the seconds of a run go: start-up, a round's client training, the server, evaluation, writing.

Runs `fedlora run` in-process (Simulation, as the CLI does) on a config for `--rounds` rounds,
the last one with an evaluation pass on `--test-examples` items, with timers wrapped around
fedlora's own functions (nothing in the runtime changes): model load, data reading and
tokenising, body forward (`train.hidden_states`), output rows (`train.project`), backward,
optimiser, batching, the clock's FLOP count, the server's aggregation and public A fine-tuning,
merges into the base, evaluation and checkpoint writing. Each row is a call path; its seconds
are EXCLUSIVE (time in nested rows is theirs), so the seconds add up to the whole run.

    python bench/profile_round.py --config configs/quickstart.yaml --rounds 1 --test-examples 1000

`--torch-ops N` also runs torch.profiler over the whole run and prints its N most expensive
operators (self CPU time): which kernels bound the step. The profiler slows the run a little,
so section seconds from such a run are not the clean ones.
"""

from __future__ import annotations

import time

IMPORTS_START = time.perf_counter()  # the imports below (torch, transformers) are start-up too

import argparse
import functools
import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import fedlora.runtime.inprocess as inprocess
import fedlora.train
from fedlora import clock
from fedlora.adapters import Adapters
from fedlora.config import load_config, parse_overrides
from fedlora.data import encode
from fedlora.runtime.checkpoint import Checkpoint
from fedlora.runtime.context import PublicServer

SEP = " > "


class Sections:
    """Exclusive and inclusive wall seconds per call path of the wrapped functions."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [label, seconds spent in nested sections]
        self.exclusive: dict[str, float] = defaultdict(float)
        self.inclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append([label, 0.0])
            path = SEP.join(frame[0] for frame in self.stack)
            self.exclusive[path] += 0.0  # rows in the order their sections first start
            start = time.perf_counter()
            try:
                with torch.profiler.record_function(label):
                    return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                _, nested = self.stack.pop()
                self.exclusive[path] += elapsed - nested
                if label not in (frame[0] for frame in self.stack):  # recursion: count once
                    self.inclusive[path] += elapsed
                self.calls[path] += 1
                if self.stack:
                    self.stack[-1][1] += elapsed

        return timed

    def patch(self, owner: Any, attr: str, label: str) -> None:
        """Wrap `owner.attr` (a class's method or a module's function)."""
        setattr(owner, attr, self.wrap(label, getattr(owner, attr)))

    def patch_function(self, fn: Callable, label: str) -> None:
        """Wrap a function in every fedlora module that imported it by name."""
        wrapped = self.wrap(label, fn)
        for name, module in list(sys.modules.items()):
            if name.startswith("fedlora") and module is not None:
                for attr, value in list(vars(module).items()):
                    if value is fn:
                        setattr(module, attr, wrapped)


def instrument(sections: Sections) -> None:
    """Timers around fedlora's functions and torch's backward and optimiser steps. A parent's
    own seconds are what no nested row covers: `run`: the run header, partition report and
    final state; `round`: sampling, validating updates, records; `clients`: the method's own
    client work (loading factors, pruning, diagnostics)."""
    s = sections
    s.patch(inprocess.Simulation, "run", "run")
    s.patch(inprocess.Federation, "build", "start-up")
    for loader, label in (("load_base_model", "model load"), ("load_model", "model load"),
                          ("load_tokenizer", "tokenizer load")):  # whichever the runtime imports
        if hasattr(inprocess, loader):
            s.patch_function(getattr(inprocess, loader), label)
    s.patch_function(inprocess.build_task, "data reading and partition")
    s.patch_function(encode.encode_classification, "tokenising")
    s.patch_function(encode.encode_instruction, "tokenising")
    s.patch(Adapters, "inject", "adapter injection")
    s.patch(inprocess.Simulation, "_round", "round")
    s.patch(inprocess.Simulation, "_train_clients", "clients")
    s.patch_function(encode.sample_batches, "batching")
    s.patch_function(clock.train_flops, "FLOP count")
    s.patch_function(fedlora.train.hidden_states, "body forward")
    s.patch_function(fedlora.train.project, "output rows")
    s.patch(torch.Tensor, "backward", "backward")
    for opt in (torch.optim.Adam, torch.optim.SGD):
        s.patch(opt, "step", "optimiser")
    s.patch(torch.optim.Optimizer, "zero_grad", "optimiser")
    s.patch(PublicServer, "train_public", "server A fine-tuning")
    s.patch(PublicServer, "heldout_loss", "server held-out loss")
    s.patch(Adapters, "merge", "merge into base")
    s.patch(inprocess.Federation, "evaluate", "evaluation")
    s.patch(Checkpoint, "save", "checkpoint writing")
    s.patch_function(inprocess.save_merge, "checkpoint writing")
    s.patch_function(inprocess.write_metrics, "checkpoint writing")
    build_algorithm = inprocess.build_algorithm

    def build_and_wrap(options, setup):  # the method's aggregate is an instance's method
        algorithm = build_algorithm(options, setup)
        algorithm.aggregate = s.wrap("server aggregation", algorithm.aggregate)
        return algorithm

    inprocess.build_algorithm = s.wrap("method set-up", build_and_wrap)


def table(sections: Sections) -> list[dict[str, Any]]:
    total = sum(sections.exclusive.values())
    return [
        {"section": path, "calls": sections.calls[path], "seconds": secs,
         "inclusive_seconds": sections.inclusive[path], "share": secs / total if total else 0.0}
        for path, secs in sections.exclusive.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--test-examples", type=int, default=1000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--torch-ops", type=int, default=0, help="also print torch.profiler's top N operators")
    ap.add_argument("--out", default="docs/bench/profile_round.json")
    args = ap.parse_args()
    overrides = {"federation.rounds": args.rounds, "federation.eval_every": args.rounds,
                 "data.test_examples": args.test_examples, **parse_overrides(args.set)}
    cfg = load_config(args.config, overrides)

    sections = Sections()
    sections.exclusive["imports"] = time.perf_counter() - IMPORTS_START
    sections.inclusive["imports"], sections.calls["imports"] = sections.exclusive["imports"], 1
    instrument(sections)
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                if args.torch_ops else nullcontext())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="profile_round_") as run_dir, profiler:
        summary = inprocess.Simulation(cfg, Path(run_dir), progress=False).run()
    wall = time.perf_counter() - start + sections.exclusive["imports"]

    rows = table(sections)
    print(f"{cfg.model.name}, {cfg.algorithm.name}, {args.rounds} round(s) of {cfg.federation.num_clients} clients, "
          f"evaluation on {args.test_examples} items; torch threads {torch.get_num_threads()}; "
          f"wall {wall:.1f} s with imports")
    print("| section (call path; seconds exclusive of nested rows) | calls | seconds | share |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['section']} | {row['calls']} | {row['seconds']:.2f} | {100 * row['share']:.1f}% |")
    if args.torch_ops:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.torch_ops))
    record = {"config": args.config, "overrides": overrides, "model": cfg.model.name, "method": cfg.algorithm.name,
              "threads": torch.get_num_threads(), "wall_seconds": wall, "final_accuracy": summary["final_accuracy"],
              "sections": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
