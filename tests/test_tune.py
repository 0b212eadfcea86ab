"""`fedlora tune` (issue 15, item 5): validation carved off the training pool, equal budgets,
choice by validation score, resumable, and the test set never evaluated."""

from __future__ import annotations

import csv

import pytest
import yaml
from conftest import tiny_tree

import fedlora.runtime.inprocess as inprocess
from fedlora.cli import main
from fedlora.config import ConfigError, build_config, load_config
from fedlora.data.task import build_task
from fedlora.models import load_base_model
from fedlora.tune import Point, choose, read_grid


def _ids(examples) -> set[tuple[int, ...]]:
    return {tuple(e.input_ids) for e in examples}


def test_tune_chooses_by_validation_and_never_touches_the_test_set(data_dir, tmp_path, monkeypatch, capsys):
    tree = tiny_tree(federation={"rounds": 1, "local_steps": 1})
    tree["methods"] = {"aflora-no-ddr": {"name": "aflora", "ddr": False},  # an ablation: tuned, then changed
                       "fedit-fast": {"name": "fedit", "set": {"federation.lr": 0.5}}}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"lr": [0.001, 0.05], "settings": {"aflora": [{"beta": 0.5}]}}))
    evaluated = []
    real = inprocess.evaluate_task
    monkeypatch.setattr(inprocess, "evaluate_task", lambda model, task, *a: evaluated.append(task) or real(model, task, *a))
    out = tmp_path / "tune"
    args = ["tune", str(cfg), "--methods", "aflora,fedit", "--grid", str(grid), "--validation-examples", "24",
            "--out", str(out), "--quiet", "--set", "federation.rounds=1", "--allow-edge"]  # two lrs: both ends
    assert main(args) == 0

    # every evaluation saw the validation set: disjoint from the test set and from every client's data
    _, tokenizer = load_base_model("tiny-llama", seed=0)
    test = _ids(build_task(load_config(cfg), tokenizer).test)
    assert len(evaluated) == 4
    for task in evaluated:
        validation = _ids(task.test)
        assert len(task.test) == 24 and not validation & test
        assert not validation & set().union(*(_ids(c) for c in task.clients))

    rows = list(csv.DictReader((out / "tuning.csv").open()))
    assert [(r["method"], float(r["lr"])) for r in rows] == [("aflora", 0.001), ("aflora", 0.05),
                                                             ("fedit", 0.001), ("fedit", 0.05)]
    for method in ("aflora", "fedit"):
        mine = [r for r in rows if r["method"] == method]
        best = max(mine, key=lambda r: (float(r["validation_accuracy"]), -float(r["validation_loss"])))
        assert [r["chosen"] for r in mine] == [str(r is best) for r in mine]
    tuned = yaml.safe_load((out / "tuned.yaml").read_text())
    chosen = {r["method"]: float(r["lr"]) for r in rows if r["chosen"] == "True"}
    assert tuned["methods"]["aflora"]["beta"] == 0.5
    assert {m: tuned["methods"][m]["set"]["federation.lr"] for m in chosen} == chosen
    assert "validation_examples" not in tuned["data"]
    assert tuned["methods"]["aflora-no-ddr"] == {"beta": 0.5, "name": "aflora", "ddr": False,
                                                 "set": {"federation.lr": chosen["aflora"]}}
    assert tuned["methods"]["fedit-fast"]["set"] == {"federation.lr": 0.5}  # the variant's own change wins
    printed = capsys.readouterr().out
    assert (f"fedlora compare {out / 'tuned.yaml'} --methods aflora,fedit,aflora-no-ddr,fedit-fast --seeds 0,1,2"
            f" --out {out / 'test'} --set federation.rounds=1" in printed)  # the tuning budget is the test budget
    assert "| method | setting |" in (out / "tuning.md").read_text()
    assert "Accuracy is on the validation subset" in (out / "validation" / "comparison.md").read_text()

    # the printed command's configs: the chosen lr, the test set, the config's own budget
    from fedlora.compare import method_configs

    configs = method_configs(out / "tuned.yaml", ["aflora", "fedit"], [1], [])
    assert configs[("fedit", 1)].federation.lr == chosen["fedit"]
    assert configs[("aflora", 1)].data.validation_examples is None

    evaluated.clear()  # resumes: nothing runs again
    assert main(args) == 0 and evaluated == []


def test_choice_follows_the_scores():
    pts = [Point("a", 0, {}, 0.1, 0.5, 1.0), Point("a", 0, {}, 0.2, 0.7, 2.0), Point("a", 1, {}, 0.1, 0.7, 1.5),
           Point("a", 1, {}, 0.3, 0.9, 0.1, error="boom"), Point("b", 0, {}, 0.1, None, 3.0),
           Point("b", 0, {}, 0.2, None, 2.0)]
    best = choose(pts)
    assert best["a"] is pts[2]  # accuracy ties break by the lower loss; failed runs never win
    assert best["b"] is pts[5]  # no accuracy: the lowest loss
    assert [p.chosen for p in pts] == [False, False, True, False, False, True]


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"lr": []}, "lr: expected a list of distinct positive numbers"),
        ({"lr": [0.1, -1]}, "lr: expected a list of distinct positive numbers"),
        ({"settings": {"hetlora": [{"gamma": 0.5}]}}, "settings.hetlora: not among --methods"),
        ({"settings": {"aflora": [{"beta": 1}, {"beta": 2}]}, "max_settings": 1},
         "settings.aflora: 2 settings exceed max_settings 1"),
        ({"settings": {"aflora": [{"name": "fedit"}]}}, "a setting holds the method's options only"),
        ({"lrs": [0.1]}, "unknown key 'lrs'"),
    ],
)
def test_bad_grids_give_one_line(tmp_path, grid, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=message):
        read_grid(str(path), ["aflora", "fedit"])


def test_validation_carve_too_large_is_one_line(data_dir, tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree()))
    assert main(["tune", str(cfg), "--methods", "fedit", "--validation-examples", "0", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "config error: --validation-examples: must be >= 1"
    with pytest.raises(ConfigError, match="data.validation_examples: 10000000 leaves no training data"):
        _, tokenizer = load_base_model("tiny-llama", seed=0)
        build_task(build_config(tiny_tree(data={"validation_examples": 10_000_000})), tokenizer)


def test_a_bad_ablation_is_named_before_any_tuning_run(data_dir, tmp_path, capsys):
    tree = tiny_tree()
    tree["methods"] = {"aflora-no-ddr": {"name": "aflora", "ddr": "sometimes"}}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    assert main(["tune", str(cfg), "--methods", "aflora", "--out", str(tmp_path / "tune"), "--quiet"]) == 2
    assert "ddr" in capsys.readouterr().err and not (tmp_path / "tune" / "validation").exists()


def test_shipped_comparison_config_runs_the_tuned_settings():
    """configs/compare_agnews.yaml's defaults are docs/tuning/tuned.yaml's choices: every
    method's (and ablation's) config is the tuned one, whatever the data folder is called."""
    from pathlib import Path

    from fedlora.compare import method_configs
    from fedlora.runtime.rundir import changed_fields

    root = Path(__file__).resolve().parent.parent
    methods = list(yaml.safe_load((root / "configs/compare_agnews.yaml").read_text())["methods"])
    assert {"fedit", "ffa", "flora", "flexlora", "hetlora", "aflora-data"} <= set(methods)
    shipped = method_configs(root / "configs/compare_agnews.yaml", methods, [0], [])
    tuned = method_configs(root / "docs/tuning/tuned.yaml", methods, [0], [])
    for key in shipped:
        tuned[key].data.data_dir = shipped[key].data.data_dir
        assert changed_fields(shipped[key], tuned[key]) == [], key


def _fake_grid_runs(monkeypatch, scores):
    """run_tuning's comparison replaced by finished runs whose validation accuracy is
    scores[lr] (loss 1 − accuracy): the choice and the edge check without training."""
    from fedlora import tune
    from fedlora.compare import MethodRun
    from fedlora.runtime.outputs import write_json, write_metrics

    def fake(config, labels, seeds, out, overrides, progress=True, variants=None, reference=None):
        runs = []
        for label in labels:
            run = MethodRun(label, seeds[0], out / f"seed_{seeds[0]}" / label)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            acc = scores[variants[label]["set"]["federation.lr"]]
            write_metrics(run.run_dir, [{"round": 1, "accuracy": acc, "test_loss": 1 - acc, "clients": [],
                                         "uplink_bytes": 0, "downlink_bytes": 0, "wall_seconds": 0.0,
                                         "server_seconds": 0.0}])
            write_json(run.run_dir / "summary.json", {"method": label})
            runs.append(run)
        return runs

    monkeypatch.setattr(tune, "run_comparison", fake)


@pytest.mark.parametrize(("scores", "edge"), [
    ({0.001: 0.5, 0.003: 0.7, 0.01: 0.6}, None),  # the middle wins: published
    ({0.001: 0.5, 0.003: 0.6, 0.01: 0.7}, "highest"),  # still rising at the top
    ({0.001: 0.7, 0.003: 0.6, 0.01: 0.5}, "lowest"),
    ({0.001: 0.6, 0.003: 0.7, 0.01: 0.7}, None),  # a tie: lower loss, then the earlier grid point (0.003)
])
def test_a_choice_at_the_grids_edge_is_not_published(data_dir, tmp_path, monkeypatch, scores, edge):
    from fedlora.tune import EdgeChoice, Grid, run_tuning

    _fake_grid_runs(monkeypatch, scores)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree()))
    out = tmp_path / "tune"
    out.mkdir()
    (out / "tuned.yaml").write_text("stale: from an earlier grid\n")
    grid = Grid(lrs=list(scores))
    if edge is None:
        run_tuning(cfg, ["fedit"], grid, out, 24, 0, [0, 1], ["threads=1"])
        assert "No method's lr choice is an end of the grid." in (out / "tuning.md").read_text()
        assert yaml.safe_load((out / "tuned.yaml").read_text())["methods"]["fedit"]["set"]["federation.lr"] == 0.003
        return
    with pytest.raises(EdgeChoice, match=f"fedit \\(lr [0-9.]+, the {edge}\\).*extend lr in --grid"):
        run_tuning(cfg, ["fedit"], grid, out, 24, 0, [0, 1], [])
    md = (out / "tuning.md").read_text()
    assert not (out / "tuned.yaml").exists() and "Not published" in md and f"the {edge} of" in md
    run_tuning(cfg, ["fedit"], grid, out, 24, 0, [0, 1], [], allow_edge=True)  # flagged, but written
    assert (out / "tuned.yaml").exists() and f"the {edge} of" in (out / "tuning.md").read_text()


def test_edge_choices_by_hand():
    from fedlora.tune import Grid, Point, edge_choices

    chosen = {"a": Point("a", 0, {}, 0.01), "b": Point("b", 0, {}, 0.003), "c": Point("c", 0, {}, 0.001)}
    assert edge_choices(Grid(lrs=[0.001, 0.003, 0.01]), chosen) == {"a": "highest", "c": "lowest"}
    assert edge_choices(Grid(lrs=[0.01, 0.003, 0.001]), chosen) == {"a": "highest", "c": "lowest"}  # any order
    assert edge_choices(Grid(lrs=[0.003]), {"b": chosen["b"]}) == {"b": "only"}
