"""The run's partition, for people: a printed table and a PNG heat map (clients × labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlora.files import atomic_write


def partition_rich_table(table: list[list[int]], names: list[str]):
    from rich.table import Table

    t = Table(title="examples per client per label / category")
    t.add_column("client", justify="right")
    for name in names:
        t.add_column(name, justify="right")
    t.add_column("total", justify="right")
    for k, row in enumerate(table):
        t.add_row(str(k), *(str(n) for n in row), str(sum(row)))
    return t


def save_heatmap(path: Path, table: list[list[int]], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(table)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(names), 1.0 + 0.45 * len(table)))
    im = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), [f"client {k}" for k in range(len(table))])
    if counts.size <= 400:  # numbers stay legible
        threshold = counts.max() / 2 if counts.size else 0
        for (k, j), n in np.ndenumerate(counts):
            ax.text(j, k, str(n), ha="center", va="center", fontsize=7,
                    color="black" if n > threshold else "white")
    fig.colorbar(im, ax=ax, label="examples")
    ax.set_title("examples per client per label / category")
    fig.tight_layout()
    try:  # atomic, and a link planted at `path` is replaced, never written through
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def report_partition(run_dir: Path, table: list[list[int]], names: list[str], show: bool = True) -> None:
    """Write `partition.png` in the run directory and print the table."""
    names = names or [str(j) for j in range(len(table[0]) if table else 0)]
    save_heatmap(Path(run_dir) / "partition.png", table, names)
    if show:
        from rich.console import Console

        Console().print(partition_rich_table(table, names))
