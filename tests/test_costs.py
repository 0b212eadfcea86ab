"""`fedlora costs` reproduces the paper's client-side cost figures from configs alone."""

import subprocess
import sys

import pytest

from fedlora.costs import architecture_shapes, cost_percent, method_cost_rows

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]


@pytest.mark.parametrize(
    "arch,paper,nominal",
    [("gpt2", 1.9027, 124e6), ("tinyllama", 0.2048, 1.1e9), ("qwen2.5-3b", 0.1229, 3e9)],
)
def test_paper_cost_for_methods_training_a_and_b(arch, paper, nominal):
    shapes = architecture_shapes(arch)
    rows = {m: pct for m, _, pct in method_cost_rows(shapes, RANKS)}
    assert rows["flora"] == rows["flexlora"] == rows["hetlora"]
    assert abs(rows["flora"] - paper) < 0.01
    # the paper divides by the nominal size (124M, 1.1B, 3B): then the match is exact
    nominal_rows = {m: pct for m, _, pct in method_cost_rows(shapes, RANKS, int(nominal))}
    assert round(nominal_rows["flora"], 4) == paper
    assert rows["aflora"] < rows["flora"] * 0.6


def test_exact_parameter_counts():
    assert architecture_shapes("gpt2").total_params == 124_439_808
    assert architecture_shapes("tinyllama").total_params == 1_100_048_384
    gpt2 = architecture_shapes("gpt2", ["c_attn", "c_proj", "c_fc"])
    assert len(gpt2.modules) == 48 and gpt2.modules["transformer.h.0.attn.c_attn"] == (2304, 768)


def test_cost_percent_counts_the_larger_of_trained_and_uploaded():
    assert cost_percent(10, 8, 1000) == 1.0 and cost_percent(8, 10, 1000) == 1.0


def test_costs_cli_prints_every_method():
    out = subprocess.run([sys.executable, "-m", "fedlora.cli", "costs", "--arch", "gpt2",
                          "--targets", "c_attn,c_proj,c_fc"], capture_output=True, text=True, check=True)
    assert "1.8959%" in out.stdout and "aflora" in out.stdout and "fedit" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fedlora.cli", "costs", "--ranks", "4,0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--ranks" in bad.stderr
