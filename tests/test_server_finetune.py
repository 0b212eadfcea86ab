"""bench/server_finetune.py rebuilds an AFLoRA run's server step from its run directory alone:
its logged held-out losses and ‖A_FT − A‖/‖A‖ come out again, so the sweep measures the real step."""

import json

import pytest

from conftest import bench_module, tiny_tree

from fedlora.errors import ConfigError

from fedlora.config import build_config
from fedlora.runtime.inprocess import Simulation

server_finetune = bench_module("server_finetune")


def test_rebuilt_server_step_reproduces_the_logged_one(data_dir, tmp_path):
    tree = tiny_tree(algorithm={"name": "aflora", "server_steps": 2, "server_lr": 0.01, "alpha": 0.3},
                     public_data={"heldout_examples": 4}, threads=1)
    Simulation(build_config(tree), tmp_path / "run", progress=False).run()
    for round_ in (1, 2):  # round 1 starts from the initial A, round 2 from merge 1's A'
        out = tmp_path / f"sweep{round_}.json"
        result = server_finetune.main([str(tmp_path / "run"), "--round", str(round_), "--lrs", "0.01",
                                       "--steps", "0,2", "--alphas", "0.3,1", "--heldout", "4", "--out", str(out)])
        for key, pair in result["reproduction"].items():
            assert pair["rebuilt"] == pair["logged"], key  # exact: same inputs, batches, threads
        rows = {(r["steps"], r["alpha"]): r for r in result["sweep"]}
        before = result["sweep"][0]["heldout_loss"]
        assert rows[(0, 0.3)]["heldout_loss"] == before == rows[(2, 1.0)]["heldout_loss"]  # A' = A
        assert rows[(2, 0.3)]["heldout_loss"] != before and rows[(2, 0.3)]["a_ft_change"] > 0
        assert json.loads(out.read_text())["round"] == round_

    # a step that does not come out again is not measured: here the log disagrees with the run
    metrics = tmp_path / "run" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[1]["server_heldout_ft"] += 1e-6
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ConfigError, match="round 2's server step does not come out again .server_heldout_ft"):
        server_finetune.main([str(tmp_path / "run"), "--round", "2"])
    with pytest.raises(SystemExit) as exit_:  # no such round: one line, exit 2
        server_finetune.main([str(tmp_path / "run"), "--round", "3"])
    assert exit_.value.code == 2
