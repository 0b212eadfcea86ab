"""Does torch.compile make a client step's decoder body faster on this CPU? Measured, with its cost.

Issue 13 (item 3) asks for fused or compiled kernels where torch offers them on CPU. This
times the bare decoder body of SmolLM2-135M (float32, no adapters), forward and backward to
the inputs as a client step runs it (`batched_clients.step`), on one client batch of 8 × 46
tokens: eager against `torch.compile` (inductor, which fuses the element-wise kernels around
the matrix products into generated C++). Reports the one-off compile time (the first call)
and the steady-state medians, alternating.

    python bench/compiled_body.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batched_clients import frozen_body, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=46)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = frozen_body()
    embeds = torch.randn(args.batch, args.tokens, model.config.hidden_size,
                         generator=torch.Generator().manual_seed(0)) * 0.02
    eager = model
    compiled = torch.nn.Module()
    compiled.model = torch.compile(model.model)
    start = time.perf_counter()
    step(compiled, embeds)  # compiles forward and backward
    compile_seconds = time.perf_counter() - start
    step(eager, embeds)
    times: dict[str, list[float]] = {"eager": [], "torch.compile": []}
    for _ in range(args.repeats):
        for name, m in (("eager", eager), ("torch.compile", compiled)):
            start = time.perf_counter()
            step(m, embeds)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.batch} x {args.tokens} tokens, torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    print(f"first call of the compiled body (compiling): {compile_seconds:.1f} s")
    for name, m in medians.items():
        print(f"| {name} | {m:.3f} s |")
    print(f"compiled / eager: {medians['torch.compile'] / medians['eager']:.2f}")


if __name__ == "__main__":
    main()
