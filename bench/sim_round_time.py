"""Simulated round time of FedIT and HierFedLoRA on a config's devices, without training.

The clock's FLOP count (fedlora.clock) on the model's shapes (a meta-device model: no
weights are loaded) and the bytes each method sends, on the config's device profiles:
FedIT's round waits for its slowest device at full depth; HierFedLoRA's for its slowest
group's planned (τ_g, d_g). Every prompt is taken as `data.max_length` tokens (AG News
articles fill a short budget). This is the per-round speed-up only: time to accuracy also
depends on accuracy per round, which needs a real run (`fedlora compare`).

    python bench/sim_round_time.py configs/hierfedlora_tta.yaml --arch smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fedlora.adapters import find_targets, layer_index, module_shape
from fedlora.algorithms.base import FederationSetup
from fedlora.algorithms.hierfedlora import HierFedLoRA
from fedlora.clock import ModelShape, planned_train_flops
from fedlora.config import load_config
from fedlora.data.ag_news import load_ag_news
from fedlora.data.partition import partition_indices

# SmolLM2-135M's architecture (the GGUF wheel's config), for a weight-free meta model
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", default="docs/bench/sim_round_time.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2))
    shape = ModelShape.of(model)
    modules = {n: module_shape(m) for n, m in find_targets(model, cfg.model.target_modules).items()}
    labels = list(load_ag_news("train", cfg.data.data_dir)["label"])
    order = np.random.default_rng(cfg.seed).permutation(len(labels))  # not the run's exact shuffle
    pool = [labels[i] for i in order[: cfg.data.train_examples or len(labels)]]
    parts = partition_indices(pool, cfg.federation.num_clients, cfg.data.partition, cfg.data.labels_per_client, cfg.seed)
    counts = [np.bincount([pool[i] for i in p], minlength=4).tolist() for p in parts]
    profiles = cfg.device_profiles()
    f = cfg.federation
    examples, tokens, rows = f.local_steps * f.batch_size, cfg.data.max_length, len(cfg.data.label_words)

    def flops(depth: int, rank: int) -> float:
        return planned_train_flops(shape, modules, rank, depth, examples, tokens, rows)

    setup = FederationSetup(
        module_shapes=modules, client_max_ranks=list(f.client_max_ranks), num_examples=[len(p) for p in parts],
        scaling=cfg.scaling, seed=cfg.seed, module_layers={n: layer_index(n) for n in modules},
        num_layers=shape.num_layers, label_counts=counts, devices=profiles, train_flops=flops)
    hier = HierFedLoRA(cfg.algorithm, setup)
    state = hier.init_state()
    plan = hier.plan_table(state)
    L, r = shape.num_layers, hier.rank
    fedit_client = [p.seconds(flops(L, r), hier.bytes_up(L), hier.bytes_up(L)) for p in profiles]
    fedit_round = max(fedit_client)
    hier_round = max(row["planned_seconds"] for row in plan)
    result = {"config": args.config, "rank": r, "layers": L, "tokens": tokens, "examples_per_client": examples,
              "fedit_round_seconds": fedit_round, "hierfedlora_round_seconds": hier_round,
              "per_round_speedup": fedit_round / hier_round, "plan": plan,
              "devices": [p.device_class for p in profiles]}
    print(json.dumps(result, indent=1, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
