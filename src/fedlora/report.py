"""`fedlora report RUN_DIR`: one run as a markdown page with its figures, for looking, not reading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.plots import (
    accuracy_curves,
    metric_by_round,
    ranks_per_client,
    setting_caption,
    untuned_accuracy,
)
from fedlora.runtime.outputs import read_metrics


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key.replace('_', ' ')} | {shown} |")
    return lines


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"report: {run_dir}/metrics.jsonl has no rounds yet")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    label = summary.get("method", run_dir.name)
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    one = {label: records}
    setting = setting_caption([run_dir])
    made = [
        ("Test accuracy", accuracy_curves({label: [records]}, figures / "accuracy.png", setting=setting,
                                          untuned=untuned_accuracy([run_dir]))),
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
    rejected = [(r["round"], x) for r in records for x in r.get("rejected", [])]
    text = [
        f"# Run report: {label}\n",
        f"Run directory `{run_dir}`; {len(records)} rounds recorded"
        + ("" if summary else " (the run has not finished: no summary.json yet)") + ".\n",
        *(_summary_lines(summary) if summary else []),
        "",
        *(f"## {title}\n\n![{path.stem}](figures/{path.name})\n" for title, path in made),
        "## Rejected updates\n",
        *([f"- round {t}: client {x['client']}: {x['reason']}" for t, x in rejected] or ["none"]),
        "",
        ("The resolved config is `config.yaml`, the environment `environment.json`, the "
         "per-round metrics `metrics.jsonl`.\n"),
    ]
    out = run_dir / "report.md"
    out.write_text("\n".join(text))
    return out
