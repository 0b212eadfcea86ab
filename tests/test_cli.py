"""The command line talks: fast --help without torch, --version, one line per round, the
summary's test loss and perplexity, TensorBoard scalars equal to metrics.jsonl."""

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import DATA_DIR, tiny_tree
from fedlora import __version__
from fedlora.cli import main
from fedlora.config import build_config
from fedlora.report import write_report
from fedlora.runtime import progress
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics
from fedlora.runtime.tensorboard import scalars


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True)


def test_help_is_fast_and_parsing_imports_no_torch():
    t0 = time.perf_counter()
    out = _cli("--help")
    assert out.returncode == 0 and "compare" in out.stdout
    assert time.perf_counter() - t0 < 2.0  # about 0.1 s; torch alone takes several seconds
    probe = ("import sys; from fedlora.cli import build_parser; "
             "build_parser().parse_args(['run', 'x.yaml']); print('torch' in sys.modules)")
    probed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert probed.stdout.strip() == "False", probed.stderr[-500:]


def test_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fedlora {__version__}"


def test_costs_default_ranks_are_the_papers(monkeypatch, capsys):
    import fedlora.costs

    shapes = SimpleNamespace(total_params=1000, modules={"q": (8, 8)})
    monkeypatch.setattr(fedlora.costs, "architecture_shapes", lambda arch, targets: shapes)
    assert main(["costs"]) == 0  # --ranks is resolved inside the command, not at parse time
    assert "client ranks [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]" in capsys.readouterr().out


def test_round_line_names_every_quantity():
    rec = {"round": 3, "train_loss": 1.23456, "ranks": {"0": 8.0, "1": 2.0}, "uplink_bytes": 2_000_000,
           "downlink_bytes": 12_820, "wall_seconds": 4.25, "test_loss": 2.5, "perplexity": 12.18,
           "rejected": [{"client": 1}]}
    line = progress.round_line(rec, 10)
    assert line.startswith("round 3/10: train loss 1.2346 · ranks 2–8 · up 2.00 MB · down 12.82 kB · 4.2 s")
    assert "test loss 2.5000 · perplexity 12.18" in line and "1 update(s) rejected" in line
    assert "accuracy" not in line


def test_log_lines_go_above_the_bars(monkeypatch):
    """A log line printed while the bars are live starts its own line (no `ETA 0:00:00INFO`)."""
    buf = io.StringIO()
    monkeypatch.setattr(progress.CONSOLE, "file", buf)
    monkeypatch.setattr(progress.CONSOLE, "_force_terminal", True)
    handler = progress.ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedlora.test_cli")
    logger.addHandler(handler)
    try:
        with progress.progress_bars() as bars:
            task = bars.add_task("rounds", total=2)
            bars.advance(task)
            bars.refresh()
            logger.warning("round 1/2: hello")
            bars.advance(task)
    finally:
        logger.removeHandler(handler)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    lines = re.split(r"[\r\n]", text)
    assert "WARNING fedlora.test_cli: round 1/2: hello" in lines


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-round tiny run evaluated at rounds 2 and 3, with TensorBoard on: (dir, config, log lines, summary)."""
    if not DATA_DIR.exists():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    run_dir = tmp_path_factory.mktemp("run")
    cfg = build_config(tiny_tree(federation={"rounds": 3, "eval_every": 2}, logging={"tensorboard": True},
                                 evaluation={"untuned": True}))
    logger, handler = logging.getLogger("fedlora"), _Lines()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary = Simulation(cfg, run_dir, progress=False).run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return run_dir, cfg, handler.lines, summary


def test_one_line_per_round_with_the_evaluation(tiny_run):
    run_dir, _, log_lines, summary = tiny_run
    lines = [line for line in log_lines if line.startswith("round ")]
    assert [line.split(":")[0] for line in lines] == ["round 1/3", "round 2/3", "round 3/3"]
    assert all("train loss" in line and "ranks" in line and " up " in line and " s" in line for line in lines)
    assert "accuracy" not in lines[0] and "accuracy" in lines[1] and "test loss" in lines[1]
    assert summary["final_test_loss"] == read_metrics(run_dir)[-1]["test_loss"]
    assert "final_perplexity" not in summary  # classification has no perplexity


def test_untuned_model_is_evaluated_once_before_round_one(tiny_run):
    run_dir, _, log_lines, _ = tiny_run
    untuned = json.loads((run_dir / "untuned.json").read_text())
    assert 0 <= untuned["accuracy"] <= 1 and untuned["loss"] > 0
    assert untuned["loss"] != read_metrics(run_dir)[1]["test_loss"]  # the base, not a trained model
    assert log_lines.index(next(x for x in log_lines if x.startswith("untuned model"))) < \
        log_lines.index(next(x for x in log_lines if x.startswith("round 1/3")))


def test_tensorboard_scalars_equal_metrics(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny_run[0]
    records = read_metrics(run_dir)
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    expected = {}
    for rec in records:
        for tag, value in scalars(rec):
            expected.setdefault(tag, []).append((rec["round"], np.float32(value)))
    assert {"accuracy", "train_loss", "uplink_bytes", "ranks/0", "sim_seconds"} <= set(expected)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        assert [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)] == points, tag
    assert [e.step for e in acc.Scalars("accuracy")] == [2, 3]  # only evaluated rounds


def test_resume_rewrites_tensorboard_from_metrics(tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    cfg = tiny_run[1].model_copy(deep=True)
    cfg.federation.rounds = 4
    Simulation(cfg, run_dir, progress=False).run(resume=True)
    files = list((run_dir / "tb").iterdir())
    assert len(files) == 1  # the old event file was replaced, not duplicated
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2, 3, 4]


def test_instruction_summary_has_test_loss_and_perplexity(data_dir, tmp_path, caplog):
    tree = tiny_tree(data={"dataset": "dolly", "partition": "iid", "train_examples": 80, "test_examples": 8},
                     federation={"rounds": 1}, algorithm={"name": "fedit"})
    with caplog.at_level(logging.INFO, logger="fedlora"):
        summary = Simulation(build_config(tree), tmp_path, progress=False).run()
    rec = read_metrics(tmp_path)[-1]
    assert summary["final_test_loss"] == rec["test_loss"] and summary["final_perplexity"] == rec["perplexity"]
    assert summary["final_perplexity"] == pytest.approx(np.exp(rec["test_loss"]))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1/1"))
    assert f"perplexity {rec['perplexity']:.2f}" in line and "accuracy" not in line
    assert "figures/perplexity.png" in write_report(tmp_path).read_text()
