"""What matrix products reach on this CPU at SmolLM2-135M's shapes: the ceiling of a step.

A client step is almost all matrix products of the decoder body (docs/benchmarks.md, "Where
the time goes"). This times torch's own kernels on exactly those products, forward
(x W^T) and input-gradient (g W), at the rows a quickstart batch feeds them (8 examples x the
46 tokens after the shared prefix, and x 64), beside one large square product, and prints
GFLOP/s and the fraction of the peak of the dtype they ran in (`--dtype`, default float32;
fedlora.hardware.peak_gflops, from its table per CPU family). If the
model's shapes reach far less than the large product, the step is bounded by the kernels'
efficiency at these small shapes, not by fedlora's code.

    python bench/matmul_ceiling.py --repeats 20 --out docs/bench/matmul_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedlora.hardware import PEAK_DTYPES, peak_gflops

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M: 9 query heads, 3 key/value heads of 64
LINEARS = {  # name: (in, out), one decoder layer's projections
    "q_proj / o_proj": (HIDDEN, HIDDEN),
    "k_proj / v_proj": (HIDDEN, KV),
    "gate_proj / up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
PER_LAYER = {"q_proj / o_proj": 2, "k_proj / v_proj": 2, "gate_proj / up_proj": 2, "down_proj": 1}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rows", default="368,512", help="rows per product (batch x tokens), comma-separated")
    ap.add_argument("--ghz", type=float, default=None)
    ap.add_argument("--dtype", choices=PEAK_DTYPES, default="float32", help="dtype of the products")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    peak, assumption = peak_gflops(torch.get_num_threads(), args.dtype, args.ghz)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    results = []

    def record(linear: str, direction: str, rows: int, k: int, n: int, fn) -> None:
        seconds = median_seconds(fn, args.repeats)
        gflops = 2 * rows * k * n / seconds / 1e9
        results.append({"linear": linear, "direction": direction, "m": rows, "k": k, "n": n,
                        "seconds": seconds, "gflops_per_s": gflops, "fraction_of_peak": gflops / peak})
        print(f"| {linear} {direction} | {rows}x{k} @ {k}x{n} | {seconds * 1e3:.3f} ms | {gflops:.1f} "
              f"| {gflops / peak:.0%} |")

    print(f"{args.dtype} peak: {assumption}; torch threads: {torch.get_num_threads()}")
    print("| product | shape | median | GFLOP/s | % of peak |\n| --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for rows in (int(r) for r in args.rows.split(",")):
            for name, (d_in, d_out) in LINEARS.items():
                x, w, g = (torch.randn(shape, dtype=dtype) for shape in ((rows, d_in), (d_out, d_in), (rows, d_out)))
                record(name, "forward", rows, d_in, d_out, lambda: torch.nn.functional.linear(x, w))
                record(name, "input gradient", rows, d_out, d_in, lambda: g @ w)
        big = 2048
        a, b = torch.randn(big, big, dtype=dtype), torch.randn(big, big, dtype=dtype)
        record("large square", "", big, big, big, lambda: a @ b)
    summary = {}
    for rows in {r["m"] for r in results if r["linear"] in PER_LAYER}:
        # one layer's forward + input-gradient products, each counted as often as a layer runs it
        rs = [r for r in results if r["m"] == rows and r["linear"] in PER_LAYER]
        flop = sum(2 * r["m"] * r["k"] * r["n"] * PER_LAYER[r["linear"]] for r in rs)
        summary[rows] = flop / sum(r["seconds"] * PER_LAYER[r["linear"]] for r in rs) / 1e9
        print(f"rows {rows}: a layer's projections (forward + input gradient) at {summary[rows]:.1f} GFLOP/s "
              f"= {summary[rows] / peak:.0%} of peak")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"dtype": args.dtype, "peak_gflops": peak, "peak_assumption": assumption,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "products": results, "layer_gflops_per_s": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
