"""Would training a round's clients in one batched pass be faster? The upper bound, measured.

Issue 13 (item 3) asks for several clients of a round trained in one pass over the shared
base model *if it measures faster*. Before building per-client LoRA segments, this measures
what such a pass could gain at best: the decoder body of SmolLM2-135M (float32, no adapters),
forward and input-gradient backward as a client step runs them, on `--clients` batches of
8 AG-News-length sequences one after another, against the same sequences in one batch.
Alternating, medians.

    python bench/batched_clients.py --clients 10 --tokens 46 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlora.models import load_base_model


def frozen_body() -> torch.nn.Module:
    """SmolLM2-135M in float32, eval mode, every weight frozen (only input gradients flow)."""
    model, _ = load_base_model("smollm2-135m")
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def step(model: torch.nn.Module, embeds: torch.Tensor) -> None:
    """Forward through the body and backward to the inputs (LoRA needs the input gradients)."""
    x = embeds.detach().requires_grad_(True)
    hidden = model.model(inputs_embeds=x).last_hidden_state
    hidden[:, -1].sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=46, help="tokens per sequence (after the shared prefix)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = frozen_body()
    g = torch.Generator().manual_seed(0)
    width = model.config.hidden_size
    batches = [torch.randn(args.batch, args.tokens, width, generator=g) * 0.02 for _ in range(args.clients)]
    together = torch.cat(batches)
    contenders = {
        "one client at a time": lambda: [step(model, b) for b in batches],
        "all clients in one batch": lambda: step(model, together),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.clients} clients x {args.batch} sequences x {args.tokens} tokens, torch threads "
          f"{torch.get_num_threads()}, medians of {args.repeats}")
    for name, m in medians.items():
        print(f"| {name} | {m:.2f} s |")
    print(f"batched / sequential: {medians['all clients in one batch'] / medians['one client at a time']:.2f}")


if __name__ == "__main__":
    main()
