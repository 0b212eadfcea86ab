"""`fedlora report RUN_DIR`: one run as a markdown page with its figures, for looking, not reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.plots import (
    accuracy_curves,
    client_metric_by_round,
    metric_by_round,
    metrics_by_round,
    ranks_per_client,
    scored_split,
    setting_caption,
    untuned_accuracy,
)
from fedlora.files import RunFileError, atomic_write, ensure_dir
from fedlora.runtime.outputs import client_sizes, read_config_tree, read_metrics, read_summary
from fedlora.tables import markdown_table


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    rows = [(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float) else value)
            for key, value in summary.items()]
    return markdown_table(None, rows, columns=2)


CLIENT_DIAGNOSTICS = [  # (key in each client's record, title, y label): AFLoRA's λ
    ("lambda_spearman", "Spearman(λ², column contribution) per client (mean over modules)", "rank correlation"),
    ("lambda_sq_std", "Spread of λ² per client (population std over active dims, mean over modules)", "std of λ²"),
    ("lambda_moved", "Largest move of λ in the round per client (mean over modules)", "|Δλ|"),
    ("pruned", "Columns pruned per client (sum over modules)", "columns"),
    ("prune_loss_ddr", "Loss increase when the columns DDR prunes are switched off", "Δ loss"),
    ("prune_loss_random", "Loss increase when as many random active columns are switched off", "Δ loss"),
]


def _diagnostic_figures(records: list[dict[str, Any]], figures: Path) -> list[tuple[str, Path]]:
    """AFLoRA's diagnostics, where the run logged them."""
    made = []
    for key, title, ylabel in CLIENT_DIAGNOSTICS:
        if any(c.get(key) is not None for r in records for c in r.get("clients", [])):
            made.append((title, client_metric_by_round(records, key, figures / f"{key}.png", ylabel)))
    if any(r.get("server_heldout_before") is not None for r in records):
        keys = {"before the server's steps": "server_heldout_before", "A_FT": "server_heldout_ft",
                "fused A' (sent)": "server_heldout_after"}
        made.append(("Server: loss on held-out public examples",
                     metrics_by_round(records, keys, figures / "server_heldout.png", "LM loss")))
    if any(r.get("server_a_change") is not None for r in records):
        made.append(("Server: ‖A_FT − A‖ / ‖A‖",
                     metrics_by_round(records, {"relative change": "server_a_change"},
                                      figures / "server_a_change.png", "relative change")))
    return made


SERVER_DIAGNOSTICS = ["server_a_change", "server_heldout_before", "server_heldout_ft", "server_heldout_after"]


def diagnostics_table(records: list[dict[str, Any]]) -> list[str]:
    """Per round, each client diagnostic's mean over the clients that logged it, and the
    server's measures (a study's numbers); empty when the run logged none."""
    keys = [k for k, _, _ in CLIENT_DIAGNOSTICS
            if any(c.get(k) is not None for r in records for c in r.get("clients", []))]
    keys += [k for k in SERVER_DIAGNOSTICS if any(r.get(k) is not None for r in records)]
    if not keys:
        return []
    rows = []
    for r in records:
        cells = [r["round"]]
        for k in keys:
            vals = [c[k] for c in r.get("clients", []) if c.get(k) is not None]
            v = r.get(k) if k in SERVER_DIAGNOSTICS else (sum(vals) / len(vals) if vals else None)
            cells.append("–" if v is None else f"{v:.4g}")
        rows.append(cells)
    return ["## Diagnostics per round (client values: mean over clients)\n",
            *markdown_table(["round", *keys], rows), ""]


def class_table(records: list[dict[str, Any]]) -> list[str]:
    """Per evaluated round, each class's test accuracy and the worst client's (with its id):
    where the errors of a label-skewed federation fall; empty when no round logged classes."""
    evaluated = [r for r in records if isinstance(r.get("class_accuracy"), dict)]
    classes = list(dict.fromkeys(c for r in evaluated for c in r["class_accuracy"]))
    if not classes:
        return []

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, int | float) else "–"

    rows = [[r["round"], *(cell(r["class_accuracy"].get(c)) for c in classes),
             cell(r.get("worst_client_accuracy")) + (f" ({r['worst_client']})" if "worst_client" in r else "")]
            for r in evaluated]
    return ["## Accuracy per class and worst client, per evaluated round\n",
            *markdown_table(["round", *classes, "worst client (which)"], rows), ""]


def _max_ranks(run_dir: Path) -> list[Any]:
    """federation.client_max_ranks of the run's config.yaml ([] when it cannot be read)."""
    fed = read_config_tree(run_dir).get("federation")
    ranks = fed.get("client_max_ranks") if isinstance(fed, dict) else None
    return ranks if isinstance(ranks, list) else []


SHARE_OF_DELTA_W = ("Share of ΔW: Σ over modules of ‖s p_k B_k A_k‖_F (client k's term of the aggregated "
                    "update) over the same summed over the round's clients (docs/concepts/methods/aflora.md, \"Aggregation tilt\").")


def mean_per_client(records: list[dict[str, Any]], key: str, client: str) -> float | None:
    """Mean of a per-client mapping's value over the rounds that logged it for this client."""
    vals = [r[key][client] for r in records if isinstance(r.get(key), dict)
            and isinstance(r[key].get(client), int | float)]
    return sum(vals) / len(vals) if vals else None


def tilt_table(records: list[dict[str, Any]], max_ranks: list[Any], sizes: list[int] | None) -> list[str]:
    """Per client, its aggregation weight p_k (`client_weight`) and its share of ΔW
    (`delta_share`, fedlora.diagnostics.delta_shares), each the mean over the rounds the
    client took part in; empty when the run logged no weights."""
    weights = [r["client_weight"] for r in records if isinstance(r.get("client_weight"), dict)]
    clients = sorted({c for w in weights for c in w}, key=lambda c: (len(c), c))  # ids in numeric order
    if not clients:
        return []

    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    def per_client(values: list[Any] | None, c: str) -> Any:
        k = int(c) if c.isdigit() else -1
        return values[k] if values is not None and 0 <= k < len(values) else None

    rows = [[c, cell(per_client(max_ranks, c)), cell(per_client(sizes, c)), sum(c in w for w in weights),
             cell(mean_per_client(records, "client_weight", c)), cell(mean_per_client(records, "delta_share", c))]
            for c in clients]
    return ["## Aggregation tilt: each client's weight and share of ΔW\n",
            f"Mean over the rounds the client took part in. {SHARE_OF_DELTA_W}\n",
            *markdown_table(["client", "max rank", "examples", "rounds", "weight p_k", "share of ΔW"], rows), ""]


def devices_table(records: list[dict[str, Any]], max_ranks: list[Any]) -> list[str]:
    """Per client, the device its node reported (`devices: measured`, round 1's `devices`) and,
    over the rounds it took part in, the simulated clock's seconds for it beside the measured
    ones (push to reply, and the node's own training seconds); empty for a run without them."""
    devices = next((r["devices"] for r in records if isinstance(r.get("devices"), list)), None)
    if not devices:
        return []

    def mean(client: int, key: str) -> str:
        vals = [c[key] for r in records for c in r.get("clients", [])
                if c.get("id") == client and isinstance(c.get(key), int | float)]
        return f"{sum(vals) / len(vals):.3g}" if vals else "–"

    rows = []
    for d in devices:
        k = d.get("client")
        memory = d.get("free_memory")
        how = ", ".join(f"{name.split('_')[0]} {src}" for name, src in sorted((d.get("sources") or {}).items()))
        rows.append([k, f"{d.get('throughput', 0) / 1e9:.3g}", "–" if memory is None else f"{memory / 2**20:.0f}",
                     f"{d.get('uplink_mbps')}/{d.get('downlink_mbps')}", how,
                     max_ranks[k] if isinstance(k, int) and 0 <= k < len(max_ranks) else "–",
                     mean(k, "sim_seconds"), mean(k, "seconds"), mean(k, "train_seconds")])
    return ["## Devices as the nodes reported them, and the clock against the measured time\n",
            ("Seconds are means over the rounds the client took part in: the simulated clock's (its FLOPs over the "
             "reported throughput plus its bytes over the link rates), from the server's push to the reply's "
             "arrival, and the node's own training time.\n"),
            *markdown_table(["client", "GFLOP/s", "free MiB", "up/down Mbit/s", "how", "max rank",
                             "simulated s", "measured s (reply)", "training s (node)"], rows), ""]


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"report: {run_dir}/metrics.jsonl has no rounds yet")
    summary = read_summary(run_dir)
    label = str(summary.get("method", run_dir.name))
    figures = run_dir / "figures"
    ensure_dir(figures, run_dir)  # a figures/ that is a link is refused
    one = {label: records}
    setting = setting_caption([run_dir])
    split = scored_split([run_dir])
    made = [
        (f"{split.capitalize()} accuracy", accuracy_curves(
            {label: [records]}, figures / "accuracy.png", setting=setting, untuned=untuned_accuracy([run_dir]),
            split=split, title=f"{split.capitalize()} accuracy")),
        ("Training loss (mean over the round's clients)",
         metric_by_round(one, "train_loss", figures / "train_loss.png", "train loss",
                         title="Training loss (mean over the round's clients)", setting=setting)),
        ("Test loss", metric_by_round(one, "test_loss", figures / "test_loss.png", "test loss",
                                      title="Test loss", setting=setting)),
        *([("Test perplexity", metric_by_round(one, "perplexity", figures / "perplexity.png", "perplexity",
                                                title="Test perplexity", setting=setting))]
          if any(r.get("perplexity") is not None for r in records) else []),
        ("Rank each client trained at", ranks_per_client(one, figures / "ranks.png", setting=setting)),
        ("Uplink bytes per round (all clients)",
         metric_by_round(one, "uplink_bytes", figures / "uplink.png", "uplink per round, all clients", log=True,
                         unit="bytes", title="Uplink bytes per round", setting=setting)),
        ("Downlink bytes per round (all clients)",
         metric_by_round(one, "downlink_bytes", figures / "downlink.png", "downlink per round, all clients",
                         log=True, unit="bytes", title="Downlink bytes per round", setting=setting)),
    ]
    made += _diagnostic_figures(records, figures)
    rejected = [(r["round"], x) for r in records for x in r.get("rejected", [])]
    text = [
        f"# Run report: {label}\n",
        f"Run directory `{run_dir}`; {len(records)} rounds recorded"
        + ("" if summary else " (the run has not finished: no summary.json yet)") + ".\n",
        *(_summary_lines(summary) if summary else []),
        "",
        *(f"## {title}\n\n![{path.stem}](figures/{path.name})\n" for title, path in made),
        *diagnostics_table(records),
        *tilt_table(records, _max_ranks(run_dir), _sizes_or_none(run_dir)),
        *devices_table(records, _max_ranks(run_dir)),
        *class_table(records),
        "## Rejected updates\n",
        *([f"- round {t}: client {x['client']}: {x['reason']}" for t, x in rejected] or ["none"]),
        "",
        ("The resolved config is `config.yaml`, the environment `environment.json`, the "
         "per-round metrics `metrics.jsonl`.\n"),
    ]
    out = run_dir / "report.md"
    atomic_write(out, "\n".join(text))
    return out


def _sizes_or_none(run_dir: Path) -> list[int] | None:
    """Client sizes for the tilt table; a damaged partition.json only blanks a column (the
    report's tables are cosmetic, as for a damaged config.yaml)."""
    try:
        return client_sizes(run_dir)
    except RunFileError:
        return None
