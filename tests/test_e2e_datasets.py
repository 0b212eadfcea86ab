"""The paper's Dolly setting end to end on the real SmolLM2-135M (slow: `make test-slow`)."""

import pytest
from conftest import ROOT

from fedlora.config import load_config
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics

pytestmark = pytest.mark.slow


def test_dolly_quick_config_runs_and_mmlu_is_near_chance(data_dir, tmp_path):
    """configs/dolly_mmlu-quick.yaml cut to 1 round of 3 clients: chat-template prompts,
    response-only loss, FedIT category skew, MMLU judging."""
    cfg = load_config(ROOT / "configs" / "dolly_mmlu-quick.yaml", {
        "federation.rounds": 1, "federation.fraction": 0.3, "federation.eval_every": 1,
        "data.test_examples": 16,
    })
    summary = Simulation(cfg, tmp_path, progress=False).run()
    rec = read_metrics(tmp_path)[-1]
    assert len(rec["clients"]) == 3 and all(c["train_loss"] < 10 for c in rec["clients"])
    assert rec["mmlu_questions"] == 114 and len(rec["mmlu_subjects"]) == 57
    assert 0.1 < summary["final_accuracy"] < 0.45  # 4-way multiple choice, a 135M model
    assert 1 < rec["perplexity"] < 1000
