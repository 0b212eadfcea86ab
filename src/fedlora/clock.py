"""The simulated clock: FLOPs of local training counted from the model's shapes, and round time.

A round's simulated wall-clock time is the slowest participant's
    local training FLOPs / throughput + bytes up / uplink + bytes down / downlink
plus the server's time: by default its training FLOPs (AFLoRA's A fine-tuning on public data)
over the throughput of the declared server device (`devices.server`), so that no simulated
number depends on how busy the machine was (docs/concepts/server-clock.md). The measured
seconds stay in every record (`server_seconds`) as a diagnostic. Methods with intra-group stages (HierFedLoRA) run groups ("lanes")
in parallel: a lane's time is the sum over its stages of its slowest client in that stage,
and the round waits for the slowest lane.

FLOP model (matrix products only; norms, activations and softmax are a few % and ignored):
per example of T tokens (the padded batch width: padded positions are computed too) and per
decoder layer,
    forward   2·T·Σ m·n over the layer's linear maps  +  4·T²·w (scores and weighted values,
              w = heads × head_dim)  +  2·T·r·(m+n) per loaded LoRA module
    backward, only in layers at or above the lowest layer with a trainable LoRA factor
    (autograd never reaches lower: nothing there requires a gradient):
              2·T·Σ m·n (input gradients; base weights are frozen)  +  8·T²·w  +
              per LoRA module 2·T·r·(m+n) (input path) + 2·T·r·m if B trains + 2·T·r·n if A trains
plus the output rows the loss needs: 2·h·rows forward, the same backward, at one position per
example for the label-word loss, and at every labelled (response) token for causal-LM loss
(the server's public-data steps: `lm_train_flops`).
The lowest trained layer is counted whole, though autograd skips the gradients there that
lead only below it (q/k/v input gradients, the LoRA input path, dK when k_proj has no LoRA):
an over-count of part of one layer's backward, on the safe side. tests/test_clock.py checks
the count against a hand count and against torch's FlopCounterMode on the real step.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from fedlora.adapters import Adapters, LoRALayer, layer_index, module_shape
from fedlora.devices import DeviceProfile

if TYPE_CHECKING:
    from fedlora.config import RunConfig
    from fedlora.data.task import FederatedTask

_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ABOVE_LAYERS = 10**9  # a target outside the decoder layers (e.g. lm_head) sits above them all


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a decoder: its linear maps per layer, attention width, head."""

    layers: tuple[tuple[tuple[int, int], ...], ...]  # per decoder layer: (m, n) of each base linear
    attn_width: int  # heads × head_dim of the queries
    hidden: int
    vocab: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        """Read from the model's modules (cached per model object)."""
        if model in _SHAPES:
            return _SHAPES[model]
        per_layer: dict[int, list[tuple[int, int]]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, LoRALayer) or not isinstance(mod, (nn.Linear, Conv1D)):
                continue
            i = layer_index(name)
            if i is not None:
                per_layer.setdefault(i, []).append(module_shape(mod))
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        shape = cls(
            layers=tuple(tuple(per_layer[i]) for i in sorted(per_layer)),
            attn_width=heads * head_dim, hidden=c.hidden_size, vocab=c.vocab_size,
        )
        _SHAPES[model] = shape
        return shape


@dataclass(frozen=True)
class LoRAModule:
    """A loaded adapter as the clock sees it: where it is, its size, what trains."""

    layer: int
    m: int
    n: int
    rank: int
    train_a: bool = False
    train_b: bool = False
    train_other: bool = False  # λ or anything else below B: gradients flow into z = A x

    @property
    def trains(self) -> bool:
        return self.train_a or self.train_b or self.train_other


def loaded_modules(adapters: Adapters) -> list[LoRAModule]:
    """The adapters' currently loaded factors and which of them receive gradients."""
    out = []
    for name, layer in adapters.layers.items():
        if layer.A is None:
            continue
        i = layer_index(name)
        out.append(LoRAModule(
            ABOVE_LAYERS if i is None else i, layer.out_features, layer.in_features, layer.rank,
            train_a=isinstance(layer.A, nn.Parameter), train_b=isinstance(layer.B, nn.Parameter),
            train_other=isinstance(layer.lam, nn.Parameter),
        ))
    return out


def example_flops(shape: ModelShape, tokens: int, lora: Iterable[LoRAModule], head_rows: int,
                  head_positions: int = 1) -> float:
    """Forward + backward FLOPs of one training example of `tokens` tokens whose loss reads the
    output layer at `head_positions` positions (see module doc)."""
    lora = list(lora)
    T, w = tokens, shape.attn_width
    trained = [mod.layer for mod in lora if mod.trains]
    lowest = min(trained) if trained else shape.num_layers  # no backward at all if nothing trains
    total = 0.0
    for i, linears in enumerate(shape.layers):
        base = 2.0 * T * sum(m * n for m, n in linears)
        total += base + 4.0 * T * T * w
        if i >= lowest:
            total += base + 8.0 * T * T * w
    for mod in lora:
        total += 2.0 * T * mod.rank * (mod.m + mod.n)
        if mod.layer >= lowest:
            total += 2.0 * T * mod.rank * (mod.m + mod.n)
            total += 2.0 * T * mod.rank * (mod.m * mod.train_b + mod.n * mod.train_a)
    total += 2.0 * shape.hidden * head_rows * head_positions * (2 if trained else 1)
    return total


def batch_flops(shape: ModelShape, batches: Iterable[Mapping[str, Tensor]], lora: list[LoRAModule],
                head_rows: int, lm: bool = False) -> float:
    """Sum over batches of batch size × example_flops(padded width); with `lm` (causal-LM loss
    on the labelled tokens, train.lm_loss) the output layer at each labelled target position."""
    total = 0.0
    for b in batches:
        n, width = b["input_ids"].shape
        if not lm:
            total += n * example_flops(shape, int(width), lora, head_rows)
            continue
        positions = int((b["labels"][:, 1:] != -100).sum())
        body = example_flops(shape, int(width), lora, head_rows, head_positions=0)
        head = example_flops(shape, int(width), lora, head_rows, head_positions=1) - body
        total += n * body + positions * head
    return total


def train_flops(model: nn.Module, adapters: Adapters, batches: list[Mapping[str, Tensor]],
                head_rows: int | None) -> float:
    """FLOPs of training on `batches` with the adapters as loaded now (the LocalClient hook)."""
    shape = ModelShape.of(model)
    return batch_flops(shape, batches, loaded_modules(adapters), head_rows or shape.vocab)


def lm_train_flops(model: nn.Module, adapters: Adapters, batches: list[Mapping[str, Tensor]]) -> float:
    """FLOPs of causal-LM training on `batches` (the server's public steps) with the adapters as
    loaded now: the whole vocabulary at every labelled position."""
    shape = ModelShape.of(model)
    return batch_flops(shape, batches, loaded_modules(adapters), shape.vocab, lm=True)


def planned_train_flops(shape: ModelShape, module_shapes: Mapping[str, tuple[int, int]], rank: int,
                        depth: int, examples: int, tokens: int, head_rows: int) -> float:
    """Planning estimate: `examples` examples of `tokens` tokens, LoRA of rank `rank` loaded on
    every target, A and B trained in the last `depth` layers only."""
    first = shape.num_layers - depth
    lora = []
    for name, (m, n) in module_shapes.items():
        i = layer_index(name)
        trains = i is not None and i >= first
        lora.append(LoRAModule(i if i is not None else 0, m, n, rank, trains, trains))
    return examples * example_flops(shape, tokens, lora, head_rows)


def round_time(clients: list[dict[str, Any]], profiles: list[DeviceProfile], server_seconds: float
               ) -> tuple[float, list[float]]:
    """Simulated seconds of a round and of each client record (fields id, flops, uplink_bytes,
    downlink_bytes, optional stage and lane)."""
    per_client = [
        profiles[c["id"]].seconds(c["flops"], c["uplink_bytes"], c["downlink_bytes"]) for c in clients
    ]
    stage_max: dict[tuple[int, int], float] = {}
    for c, s in zip(clients, per_client):
        key = (c.get("lane", 0), c.get("stage", 0))
        stage_max[key] = max(stage_max.get(key, 0.0), s)
    lanes: dict[int, float] = {}
    for (lane, _), s in stage_max.items():
        lanes[lane] = lanes.get(lane, 0.0) + s
    return max(lanes.values(), default=0.0) + server_seconds, per_client



def server_clock_seconds(server_time: str, measured: float, flops: float, server: DeviceProfile) -> float:
    """The server's share of a round on the simulated clock: its training FLOPs over the declared
    server device's throughput (`flops`, the default), the measured seconds (`measured`: depends
    on the machine's load) or nothing (`none`)."""
    if server_time == "flops":
        return flops / server.flops
    return measured if server_time == "measured" else 0.0


def simulated_round(clients: list[dict[str, Any]], profiles: list[DeviceProfile], server_seconds: float,
                    history: list[dict[str, Any]]) -> dict[str, float]:
    """The runtime hook: sets each client record's sim_seconds; returns the round's sim_seconds
    and the run's cumulative sim_time (beside the real wall_seconds). `server_seconds` is the
    server's simulated share (`server_clock_seconds`)."""
    seconds, per_client = round_time(clients, profiles, server_seconds)
    for c, s in zip(clients, per_client):
        c["sim_seconds"] = s
    before = history[-1].get("sim_time", 0.0) if history else 0.0
    return {"server_sim_seconds": server_seconds, "sim_seconds": seconds, "sim_time": before + seconds}


def device_setup(cfg: RunConfig, model: nn.Module, adapters: Adapters, task: FederatedTask,
                 profiles: list[DeviceProfile]) -> dict[str, Any]:
    """What FederationSetup carries for device-aware methods: layers, label counts, profiles,
    and a planning estimate of one client's local-training FLOPs at depth d and rank r."""
    shape = ModelShape.of(model)
    lengths = [len(e.input_ids) for c in task.clients for e in c]
    tokens = round(sum(lengths) / len(lengths)) if lengths else cfg.data.max_length
    rows = len(task.label_ids) if cfg.data.loss == "classes" else shape.vocab
    examples = cfg.federation.local_steps * cfg.federation.batch_size
    module_shapes = adapters.shapes()

    def flops(depth: int, rank: int) -> float:
        return planned_train_flops(shape, module_shapes, rank, depth, examples, tokens, rows)

    return {
        "module_layers": {name: layer_index(name) for name in module_shapes},
        "num_layers": shape.num_layers,
        "label_counts": task.partition_table(),
        "devices": list(profiles),
        "train_flops": flops,
    }
