"""bench/studies_sync.py carries the long studies between sessions through docs/: `save` publishes
each study's finished runs to its place, leaving out runs still going and a pilot cut off while
being extended; `restore` brings them back byte for byte; a damaged run file ends in one line."""

import json

import numpy as np
from conftest import bench_module

studies_sync = bench_module("studies_sync")

BASE = {"clients": [{"id": 0}], "uplink_bytes": 1, "downlink_bytes": 1, "wall_seconds": 1.0, "server_seconds": 0.0}


def _run(run, rounds, summary_rounds=None):
    """A run with `rounds` records; summary.json (saying `summary_rounds`) when that is given."""
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({**BASE, "round": r, "accuracy": 0.5}) + "\n"
                                               for r in range(1, rounds + 1)))
    np.savez(run / "eval" / f"round_{rounds:04d}.npz", id=np.arange(3), correct=np.ones(3, bool))
    (run / "config.yaml").write_text("seed: 0\n")
    if summary_rounds is not None:
        (run / "summary.json").write_text(json.dumps({"rounds": summary_rounds}))


def test_save_publishes_finished_runs_and_restore_brings_them_back(tmp_path, capsys):
    studies, docs = tmp_path / "studies", tmp_path / "docs"
    _run(studies / "evidence/pilot/agnews/fedit", 6, 6)      # a finished pilot segment
    _run(studies / "evidence/pilot/agnews/aflora", 8, 6)     # extended to 9, cut off at round 8
    _run(studies / "evidence/pilot/fpb/fedit", 2)            # first segment still going
    _run(studies / "evidence/main/fpb/seed_0/fedit", 6, 6)
    _run(studies / "evidence/main/fpb/seed_0/flora", 3)      # still going
    assert studies_sync.main(["save", "--studies", str(studies), "--docs", str(docs)]) == 0
    out = capsys.readouterr().out
    assert "agnews/aflora: cut off while extending; not saved" in out
    assert (docs / "studies_pilot/agnews/fedit/metrics.jsonl").is_file()
    assert not (docs / "studies_pilot/agnews/aflora").exists() and not (docs / "studies_pilot/fpb/fedit").exists()
    assert (docs / "studies_fpb/seed_0/fedit/eval/round_0006.npz").is_file()
    assert not (docs / "studies_fpb/seed_0/flora").exists()

    fresh = tmp_path / "next_session"
    assert studies_sync.main(["restore", "--studies", str(fresh), "--docs", str(docs)]) == 0
    for rel in ("evidence/pilot/agnews/fedit/metrics.jsonl", "evidence/main/fpb/seed_0/fedit/eval/round_0006.npz",
                "evidence/main/fpb/seed_0/fedit/summary.json"):
        assert (fresh / rel).read_bytes() == (studies / rel).read_bytes()
    assert not (fresh / "evidence/main/fpb/seed_0/flora").exists()


def test_a_pilot_rerun_from_round_one_keeps_its_earlier_publish(tmp_path):
    """Restored without a checkpoint and short of its rounds, a pilot restarts from round 1; if
    the session ends before its segment does, the earlier publish must stay as it was."""
    studies, docs = tmp_path / "studies", tmp_path / "docs"
    run = studies / "evidence/pilot/fpb/fedit"
    _run(run, 6, 6)
    args = ["--studies", str(studies), "--docs", str(docs)]
    assert studies_sync.main(["save", *args]) == 0
    saved = (docs / "studies_pilot/fpb/fedit/metrics.jsonl").read_bytes()
    for f in run.rglob("*"):
        f.unlink() if f.is_file() else None
    _run(run.parent / "rerun", 2)  # the rerun, two rounds in, no summary.json yet
    (run / "metrics.jsonl").write_bytes((run.parent / "rerun/metrics.jsonl").read_bytes())
    assert studies_sync.main(["save", *args]) == 0
    assert (docs / "studies_pilot/fpb/fedit/metrics.jsonl").read_bytes() == saved


def test_a_damaged_pilot_ends_in_one_line_naming_its_file(tmp_path, capsys):
    studies = tmp_path / "studies"
    run = studies / "evidence/pilot/agnews/fedit"
    _run(run, 6, 6)
    (run / "metrics.jsonl").write_text('{"round": 1, "accur')
    assert studies_sync.main(["save", "--studies", str(studies), "--docs", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err


def test_a_study_s_own_tables_are_published_only_once_they_are_the_whole_study_s(tmp_path):
    """Each unit of the lane writes its folder's tables for its one method: published mid-study,
    comparison.md or tuning.md would stand as the study's; from .complete / DECIDED on, they are."""
    studies, docs = tmp_path / "studies", tmp_path / "docs"
    main, tune = studies / "evidence/main/fpb", studies / "evidence/tune/agnews"
    _run(main / "seed_0/fedit", 6, 6)
    _run(tune / "validation/seed_0/fedit-s0-lr0.01", 6, 6)
    for folder, table in ((main, "comparison.md"), (tune, "tuning.md")):
        (folder / table).write_text("one method's table\n")
        (folder / "figure.png").write_bytes(b"png")
    args = ["save", "--studies", str(studies), "--docs", str(docs)]
    assert studies_sync.main(args) == 0
    assert (docs / "studies_fpb/seed_0/fedit/summary.json").is_file()
    assert not (docs / "studies_fpb/comparison.md").exists() and not (docs / "studies_fpb/figure.png").exists()
    assert not (docs / "studies_tuning/agnews/tuning.md").exists()
    (main / ".complete").touch()
    (tune / "DECIDED").touch()
    assert studies_sync.main(args) == 0
    assert (docs / "studies_fpb/comparison.md").is_file() and (docs / "studies_fpb/figure.png").is_file()
    assert (docs / "studies_tuning/agnews/tuning.md").is_file()


def test_a_restored_study_not_run_since_keeps_its_publish(tmp_path, capsys):
    """`restore` leaves out a study's tables and figures (and a single run's environment.json and
    partition.png); a save from a restored, unchanged study must not delete them from docs/."""
    studies, docs, fresh = tmp_path / "studies", tmp_path / "docs", tmp_path / "next_session"
    pilot, privacy = studies / "evidence/pilot/fpb/fedit", studies / "privacy/runs"
    _run(pilot, 6, 6)
    (pilot / "environment.json").write_text("{}")
    (pilot / "partition.png").write_bytes(b"png")
    _run(privacy / "seed_0/fedit", 4, 4)
    (privacy / "comparison.md").write_text("the study's table\n")
    assert studies_sync.main(["save", "--studies", str(studies), "--docs", str(docs)]) == 0
    published = sorted(p.relative_to(docs) for p in docs.rglob("*") if p.is_file())
    assert studies_sync.main(["restore", "--studies", str(fresh), "--docs", str(docs)]) == 0
    assert not (fresh / "privacy/runs/comparison.md").exists()  # what restore leaves out
    capsys.readouterr()
    assert studies_sync.main(["save", "--studies", str(fresh), "--docs", str(docs)]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert sorted(p.relative_to(docs) for p in docs.rglob("*") if p.is_file()) == published
    _run(fresh / "privacy/runs/seed_1/fedit", 4, 4)  # something new: published, the runs kept
    assert studies_sync.main(["save", "--studies", str(fresh), "--docs", str(docs)]) == 0
    assert (docs / "privacy_study/seed_1/fedit/summary.json").is_file()
    assert (docs / "privacy_study/seed_0/fedit/summary.json").is_file()
