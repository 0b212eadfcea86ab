"""`fedlora partition`: a simulation's clients as one data file each, to hand to real devices.

Client k's shard (the global partitioner's, exactly what `fedlora run` trains client k on, in
the same order) goes to client_<k>.jsonl in the run's own column layout and class names, so a
SuperNode started with `data-file=client_<k>.jsonl` reads back the very examples. Beside them:
config.yaml, the run's config for Flower on node-local data (nodes.local_data, the class
names, no training file), and manifest.json (per client: file, SHA-256, examples, label
histogram: what each node will report).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.data.custom import write_node_file
from fedlora.data.task import check_data
from fedlora.errors import ConfigError
from fedlora.files import sha256_file

if TYPE_CHECKING:
    from fedlora.config import RunConfig

MANIFEST = "manifest.json"


def node_file(folder: Path, client: int) -> Path:
    return Path(folder) / f"client_{client:03d}.jsonl"


def write_partitions(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Write every client's file, config.yaml and manifest.json into `out` (new or empty)."""
    from fedlora.config import build_config, dump_config
    from fedlora.runtime.outputs import write_json

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"config error: --out {out}: not empty; choose a new folder")
    if cfg.nodes.local_data:
        raise ConfigError("config error: nodes.local_data: the config already reads node files; partition the "
                          "config that holds the whole dataset")
    pool = check_data(cfg)
    out.mkdir(parents=True, exist_ok=True)
    clients = []
    for k, part in enumerate(pool.parts):
        shard = pool.train.select(part)
        path = node_file(out, k)
        write_node_file(path, shard, cfg.data, pool.names)
        counts = [0] * len(pool.names)
        for label in shard["label"]:
            counts[label] += 1
        clients.append({"client": k, "file": path.name, "sha256": sha256_file(path), "examples": len(part),
                        "label_counts": counts})
    tree = cfg.model_dump(mode="json")
    tree["nodes"] = {**tree["nodes"], "local_data": True, "classes": list(pool.names)}
    tree["data"]["train_file"] = None  # the nodes hold the training data now
    node_cfg = build_config(tree)
    (out / "config.yaml").write_text(dump_config(node_cfg))
    manifest = {"classes": list(pool.names), "num_clients": len(clients), "clients": clients}
    write_json(out / MANIFEST, manifest)
    return manifest
