"""bench/lambda_probe.py: one client round per λ design on one base model; the client's loss
after its round is measured with exactly the factors it uploaded."""


import yaml
from conftest import bench_module, tiny_tree

lambda_probe = bench_module("lambda_probe")


def test_probe_measures_each_design_on_the_same_batches(synthetic_task, tmp_path):
    tree = tiny_tree(data=synthetic_task, federation={"lr": 0.05, "local_steps": 4}, threads=1)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    result = lambda_probe.main([str(cfg), "--clients", "0,3", "--designs", "paper,unit-sgd-30", "--draws", "2",
                                "--out", str(tmp_path / "probe.json")])
    paper, unit = (result["designs"][d]["clients"] for d in ("paper", "unit-sgd-30"))
    assert [r["client"] for r in paper] == [0, 3] and [r["rank"] for r in paper] == [8, 2]
    for a, b in zip(paper, unit):
        assert a["loss_before"] == b["loss_before"]  # same batches, same base: the designs differ only in λ
        assert a["loss_after"] < a["loss_before"]  # its uploaded factors carry what it learned
    assert all(r["lambda_spearman"] > 0.9 for r in unit if r["lambda_spearman"] is not None)
    assert (tmp_path / "probe.json").exists()
