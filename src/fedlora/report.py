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
)
from fedlora.runtime.files import read_json
from fedlora.runtime.outputs import read_metrics


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key.replace('_', ' ')} | {shown} |")
    return lines


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
    lines = ["## Diagnostics per round (client values: mean over clients)\n",
             "| round | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in records:
        cells = []
        for k in keys:
            vals = [c[k] for c in r.get("clients", []) if c.get(k) is not None]
            v = r.get(k) if k in SERVER_DIAGNOSTICS else (sum(vals) / len(vals) if vals else None)
            cells.append("–" if v is None else f"{v:.4g}")
        lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"report: {run_dir}/metrics.jsonl has no rounds yet")
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    label = summary.get("method", run_dir.name)
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    one = {label: records}
    made = [
        ("Test accuracy", accuracy_curves({label: [records]}, figures / "accuracy.png")),
        ("Training loss (mean over the round's clients)",
         metric_by_round(one, "train_loss", figures / "train_loss.png", "train loss")),
        ("Test loss", metric_by_round(one, "test_loss", figures / "test_loss.png", "test loss")),
        ("Rank each client trained at", ranks_per_client(one, figures / "ranks.png")),
        ("Uplink bytes per round (all clients)",
         metric_by_round(one, "uplink_bytes", figures / "uplink.png", "bytes", log=True)),
        ("Downlink bytes per round (all clients)",
         metric_by_round(one, "downlink_bytes", figures / "downlink.png", "bytes", log=True)),
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
        "## Rejected updates\n",
        *([f"- round {t}: client {x['client']}: {x['reason']}" for t, x in rejected] or ["none"]),
        "",
        ("The resolved config is `config.yaml`, the environment `environment.json`, the "
         "per-round metrics `metrics.jsonl`.\n"),
    ]
    out = run_dir / "report.md"
    out.write_text("\n".join(text))
    return out
