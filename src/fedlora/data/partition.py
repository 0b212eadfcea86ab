"""Client partitions through flwr-datasets' partitioners.

`label` is the class (classification) or the category (instruction data such as Dolly).

| scheme | partitioner |
| --- | --- |
| iid | IidPartitioner: equal random shares |
| label_skew | PathologicalPartitioner: k labels per client, the first one deterministic |
| dirichlet | DirichletPartitioner(alpha): per label, client shares ~ Dir(alpha) |
| category_skew | FedIT's Dolly split: DirichletPartitioner(alpha=epsilon, self_balancing, min 40) |
| size_skew | Linear/Square/ExponentialPartitioner: IID content, unequal sizes |
"""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SquarePartitioner,
)

from fedlora.errors import ConfigError

# FederatedGPT-Shepherd's client_data_allocation.py (FedIT): Dirichlet over categories with
# alpha = 0.5, clients above the average size get no more data, redraw until all have >= 40.
FEDIT_MIN_PARTITION_SIZE = 40
DIRICHLET_MIN_PARTITION_SIZE = 10  # flwr-datasets' default
SIZE_PARTITIONERS = {"linear": LinearPartitioner, "square": SquarePartitioner, "exponential": ExponentialPartitioner}


def make_partitioner(
    scheme: str,
    num_clients: int,
    labels_per_client: int,
    seed: int,
    *,
    alpha: float = 0.5,
    epsilon: float = 0.5,
    min_partition_size: int | None = None,
    size_distribution: str = "linear",
) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "label_skew":
        # Paper: "each client receives data with only 2 labels". Client i's first label is
        # i mod L, so every label is covered when K >= L; its other k-1 labels are drawn at
        # random (seeded). Examples within a label are split evenly among its clients.
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=labels_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    if scheme in ("dirichlet", "category_skew"):
        fedit = scheme == "category_skew"
        default_min = FEDIT_MIN_PARTITION_SIZE if fedit else DIRICHLET_MIN_PARTITION_SIZE
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=epsilon if fedit else alpha,
            min_partition_size=default_min if min_partition_size is None else min_partition_size,
            self_balancing=fedit,
            shuffle=True,
            seed=seed,
        )
    if scheme == "size_skew":
        return SIZE_PARTITIONERS[size_distribution](num_partitions=num_clients)
    raise ValueError(f"unknown partition scheme {scheme!r}")


def partition_indices(
    labels: list[int], num_clients: int, scheme: str, labels_per_client: int, seed: int, **options
) -> list[list[int]]:
    """Indices into `labels` for each client; every example goes to at most one client.

    iid and size_skew cut `labels` in order (build_task shuffles the pool, seeded, first).

    `options`: alpha, epsilon, min_partition_size, size_distribution (see make_partitioner).
    """
    if len(labels) < num_clients:
        raise _without_data(scheme, num_clients - len(labels), num_clients, len(labels))
    distinct = len(set(labels))
    if scheme in ("label_skew", "dirichlet", "category_skew") and distinct < 2:
        raise ConfigError(f"config error: data.partition: {scheme} needs labels or categories; this data has one")
    if scheme == "label_skew" and labels_per_client > distinct:
        raise ConfigError(f"config error: data.labels_per_client: {labels_per_client} exceeds the "
                          f"{distinct} labels of the training data")
    ds = Dataset.from_dict({"label": list(labels), "index": list(range(len(labels)))})
    partitioner = make_partitioner(scheme, num_clients, labels_per_client, seed, **options)
    partitioner.dataset = ds
    try:
        parts = [sorted(partitioner.load_partition(k)["index"]) for k in range(num_clients)]
    except ValueError as err:
        if "than there are samples" in str(err):  # PathologicalPartitioner: a label too rare
            raise ConfigError(
                f"config error: data.partition: label_skew gives some label to more clients than it "
                f"has examples ({num_clients} clients, {labels_per_client} labels each); use more "
                "data, fewer clients or fewer data.labels_per_client"
            ) from None
        if "max number of attempts" not in str(err):
            raise
        raise ConfigError(
            f"config error: data.partition: {scheme} could not give each of {num_clients} clients "
            f"the minimum size from {len(labels)} examples in 10 draws; lower "
            "data.min_partition_size, use more data or fewer clients"
        ) from None
    empty = [k for k, p in enumerate(parts) if not p]
    if empty:
        raise _without_data(scheme, len(empty), num_clients, len(labels))
    return parts


def _without_data(scheme: str, empty: int, num_clients: int, examples: int) -> ConfigError:
    return ConfigError(
        f"config error: data.partition: {scheme} leaves {empty} of {num_clients} clients without data "
        f"({examples} training examples); use more data or fewer clients"
    )

