"""Client partitions through flwr-datasets' partitioners (IID, k labels per client)."""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import (
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)


def make_partitioner(scheme: str, num_clients: int, labels_per_client: int, seed: int) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "label_skew":
        # Paper: "each client receives data with only 2 labels". Classes are assigned
        # deterministically (client i gets labels i, i+1, ... mod L) so that every label is
        # covered; examples within a label are split at random (seeded).
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=labels_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    raise ValueError(f"unknown partition scheme {scheme!r}")


def partition_indices(
    labels: list[int], num_clients: int, scheme: str, labels_per_client: int, seed: int
) -> list[list[int]]:
    """Indices into `labels` for each client; every example goes to at most one client."""
    ds = Dataset.from_dict({"label": list(labels), "index": list(range(len(labels)))})
    partitioner = make_partitioner(scheme, num_clients, labels_per_client, seed)
    partitioner.dataset = ds
    parts = [sorted(partitioner.load_partition(k)["index"]) for k in range(num_clients)]
    empty = [k for k, p in enumerate(parts) if not p]
    if empty:
        raise ValueError(f"partition left clients {empty} without data")
    return parts
