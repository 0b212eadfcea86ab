"""`fedlora report DIR --publish DEST` copies what a citation needs and nothing else: no
checkpoints, merges or locks, no file reached through a symbolic link, never into the
source itself; the copy is a comparison `fedlora report` rebuilds to the same tables."""

import json
import shutil

import numpy as np
import pytest

from fedlora.cli import main
from fedlora.compare import MethodRun, write_comparison


def _comparison(root, outside):
    runs = []
    for seed in (0, 1):
        for method in ("fedit", "aflora"):
            d = root / f"seed_{seed}" / method
            (d / "eval").mkdir(parents=True)
            (d / "merges").mkdir()
            records = [{"round": t, "accuracy": 0.5 + 0.1 * t + 0.01 * seed, "train_loss": 1.0 / t,
                        "sim_seconds": 3.0, "wall_seconds": 1.0, "server_seconds": 0.1, "uplink_bytes": 100,
                        "downlink_bytes": 100, "client_cost_percent": 1.0, "clients": [{"id": 0}],
                        "ranks": {"0": 8.0}} for t in (1, 2)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (d / "summary.json").write_text(json.dumps({"method": method, "final_accuracy": 0.7}))
            (d / "config.yaml").write_text(f"seed: {seed}\n")
            (d / "environment.json").write_text("{}")
            (d / "partition.json").write_text("{}")
            np.savez_compressed(d / "eval" / "round_0002.npz", correct=np.ones(4, dtype=bool))
            (d / "checkpoint.safetensors").write_bytes(b"\0" * 4096)
            (d / "final_state.safetensors").write_bytes(b"\0" * 4096)
            (d / "merges" / "round_0001.safetensors").write_bytes(b"\0" * 4096)
            (d / "run.lock").write_text("")
            (d / "untuned.json").write_text('{"accuracy": 0.4}')
            runs.append(MethodRun(method, seed, d))
    write_comparison(root, runs, ["fedit", "aflora"], target=0.7,
                     command="fedlora compare c.yaml --methods fedit,aflora --seeds 0,1 --target 0.7")
    (root / "seed_0" / "fedit" / "report.md").symlink_to(outside)  # a hostile link is not followed


@pytest.fixture
def study(tmp_path):
    """(a comparison with a link to a file outside it, a publish destination, that file)."""
    root, dest = tmp_path / "study", tmp_path / "docs" / "study"
    secret = tmp_path / "secret.txt"
    secret.write_text("keep")
    _comparison(root, secret)
    return root, dest, secret


def test_publish_copies_the_citeable_files_only_and_the_copy_rebuilds(study, capsys):
    root, dest, _ = study
    assert main(["report", str(root), "--publish", str(dest)]) == 0
    assert "published" in capsys.readouterr().out
    copied = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    runs = [f"seed_{s}/{m}" for s in (0, 1) for m in ("fedit", "aflora")]
    per_run = {f"{r}/{name}" for r in runs for name in ("config.yaml", "environment.json", "partition.json",
                                                        "metrics.jsonl", "summary.json", "untuned.json",
                                                        "eval/round_0002.npz")}
    top = {"comparison.md", "comparison.csv", "tta.csv", "tta_seeds.csv", "tta_sweep.csv"} | {p.name for p in root.glob("*.png")}
    assert copied == per_run | top | {"published.json"}  # no checkpoint, final state, merge, lock or linked file
    manifest = json.loads((dest / "published.json").read_text())
    assert set(manifest["files"]) == per_run | top and len(manifest["files"]["comparison.md"]) == 64

    before = (dest / "comparison.md").read_text()
    assert main(["report", str(dest)]) == 0  # the published copy is itself a comparison
    assert (dest / "comparison.md").read_text() == before


def test_republishing_replaces_the_earlier_copy_and_never_writes_through_a_link(study, tmp_path, capsys):
    root, dest, secret = study
    assert main(["report", str(root), "--publish", str(dest)]) == 0
    shutil.rmtree(root / "seed_1" / "aflora")  # the study changed: that run is gone
    (dest / "seed_0" / "fedit" / "metrics.jsonl").unlink()
    (dest / "seed_0" / "fedit" / "metrics.jsonl").symlink_to(secret)  # a planted link in DEST
    assert main(["report", str(root), "--publish", str(dest)]) == 0
    assert secret.read_text() == "keep" and not (dest / "seed_0" / "fedit" / "metrics.jsonl").is_symlink()
    assert not (dest / "seed_1" / "aflora").exists()  # no stale run from the earlier copy, not even its folder

    shutil.rmtree(dest / "seed_0")
    (dest / "seed_0").symlink_to(root / "seed_1")  # a linked folder would write into the source
    before = (root / "seed_1" / "fedit" / "metrics.jsonl").read_text()
    assert main(["report", str(root), "--publish", str(dest)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (root / "seed_1" / "fedit" / "metrics.jsonl").read_text() == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert main(["report", str(root), "--publish", str(mine)]) == 2  # not empty, not an earlier publish
    assert "not empty" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "the user's"


def test_publish_one_run(tmp_path):
    root = tmp_path / "study"
    _comparison(root, tmp_path / "missing")
    run = root / "seed_0" / "aflora"
    assert main(["report", str(run), "--publish", str(tmp_path / "one")]) == 0
    copied = {str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file()}
    assert {"report.md", "metrics.jsonl", "eval/round_0002.npz", "untuned.json"} <= copied
    assert any(c.startswith("figures/") for c in copied) and not any("safetensors" in c for c in copied)


def test_publish_refuses_the_source_itself_and_an_empty_source(tmp_path, capsys):
    root = tmp_path / "study"
    _comparison(root, tmp_path / "missing")
    for dest in (root, root / "docs", tmp_path):
        assert main(["report", str(root), "--publish", str(dest)]) == 2
        err = capsys.readouterr().err.strip()
        assert "--publish" in err and "\n" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--publish", str(tmp_path / "out")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err  # the report fails first, naming the file


def test_finished_only_leaves_out_runs_still_running(study, tmp_path):
    from fedlora.publish import publish

    root, dest, _ = study
    (root / "seed_1" / "aflora" / "summary.json").unlink()  # still running
    publish(root, dest, finished_only=True)
    assert not (dest / "seed_1" / "aflora").exists() and (dest / "seed_0" / "aflora" / "summary.json").is_file()
    publish(root, tmp_path / "all")
    assert (tmp_path / "all" / "seed_1" / "aflora" / "metrics.jsonl").is_file()


def test_restore_copies_a_publish_back_verified_and_keeps_what_is_there(study, tmp_path, capsys):
    from fedlora.errors import ConfigError
    from fedlora.publish import restore

    root, dest, secret = study
    assert main(["report", str(root), "--publish", str(dest)]) == 0
    again = tmp_path / "again"
    (again / "seed_0" / "fedit").mkdir(parents=True)
    (again / "seed_0" / "fedit" / "config.yaml").write_text("mine\n")
    listed = json.loads((dest / "published.json").read_text())["files"]
    runs = [rel for rel in listed if "/" in rel]  # a comparison's top-level files are its tables and figures
    assert restore(dest, again) == len(runs) - 1
    assert (again / "seed_0" / "fedit" / "config.yaml").read_text() == "mine\n"  # kept, not replaced
    for rel in runs:
        if rel != "seed_0/fedit/config.yaml":
            assert (again / rel).read_bytes() == (dest / rel).read_bytes()
    assert not (again / "comparison.md").exists()  # tables are rebuilt by the rerun, never restored

    (dest / "seed_1" / "fedit" / "metrics.jsonl").write_text("{}\n")  # edited after publishing
    with pytest.raises(ConfigError, match="seed_1/fedit/metrics.jsonl: missing, a link, or not the file"):
        restore(dest, tmp_path / "third")
    (dest / "published.json").write_text(json.dumps({"files": {"seed_0/../../../secret.txt": listed["comparison.md"]}}))
    with pytest.raises(ConfigError, match="outside it"):
        restore(dest, tmp_path / "fourth")
    assert secret.read_text() == "keep"


def test_a_comparison_restored_from_its_publish_reads_its_finished_runs_back(tmp_path, synthetic_task):
    """The point of restore: a study carried to a new machine in the repository resumes there;
    its finished runs are read back, not run again (no checkpoint is written for them)."""
    import yaml
    from conftest import tiny_tree

    from fedlora.compare import run_comparison
    from fedlora.publish import publish, restore

    tree = tiny_tree(data={**synthetic_task, "train_examples": 24, "test_examples": 8},
                     federation={"num_clients": 2, "client_max_ranks": [4, 2], "rounds": 1, "local_steps": 1,
                                 "batch_size": 4})
    tree.pop("algorithm")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tree))
    run_comparison(config, ["fedit"], [0], tmp_path / "first", [], progress=False)
    publish(tmp_path / "first", tmp_path / "docs")
    restore(tmp_path / "docs", tmp_path / "second")
    runs = run_comparison(config, ["fedit"], [0, 1], tmp_path / "second", [], progress=False)
    assert [r.done and not r.error for r in runs] == [True, True]
    assert not (tmp_path / "second" / "seed_0" / "fedit" / "checkpoint.safetensors").exists()  # read, not rerun
    assert (tmp_path / "second" / "seed_1" / "fedit" / "checkpoint.safetensors").exists()
    assert (tmp_path / "first" / "seed_0" / "fedit" / "checkpoint.safetensors").exists()  # what a rerun leaves
    assert ((tmp_path / "second" / "seed_0" / "fedit" / "metrics.jsonl").read_bytes()
            == (tmp_path / "first" / "seed_0" / "fedit" / "metrics.jsonl").read_bytes())


def test_a_tuning_directory_publishes_its_grid_points_and_tables(tmp_path):
    from fedlora.publish import publish

    tune = tmp_path / "tune"
    point = tune / "validation" / "seed_0" / "fedit-s0-lr0.01"
    (point / "eval").mkdir(parents=True)
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        (point / name).write_text("{}\n")
    (point / "checkpoint.safetensors").write_bytes(b"\0")
    for name in ("tuning.md", "tuning.csv", "tuned.yaml"):
        (tune / name).write_text(name)
    publish(tune, tmp_path / "docs")
    copied = {str(p.relative_to(tmp_path / "docs")) for p in (tmp_path / "docs").rglob("*") if p.is_file()}
    assert copied == {"tuning.md", "tuning.csv", "tuned.yaml", "published.json",
                      *(f"validation/seed_0/fedit-s0-lr0.01/{n}" for n in ("metrics.jsonl", "summary.json", "config.yaml"))}


def test_one_published_run_is_restored_whole(tmp_path):
    from fedlora.publish import publish, restore

    root = tmp_path / "study"
    _comparison(root, tmp_path / "missing")
    publish(root / "seed_0" / "aflora", tmp_path / "docs")
    assert restore(tmp_path / "docs", tmp_path / "back") > 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "eval/round_0002.npz"):
        assert (tmp_path / "back" / name).read_bytes() == (root / "seed_0" / "aflora" / name).read_bytes()
