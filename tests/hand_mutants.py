"""Issue 11's five hand-made mutants: apply each to a copy of src/ and run the tests that
must now fail (`make mutation` runs it; results in docs/mutation.md). Usage: python tests/hand_mutants.py ."""
import shutil, subprocess, sys, os
from pathlib import Path
ROOT = Path(sys.argv[1]).resolve()
MUTANTS = [
    ("1 AFLoRA trains without eq. 10's regulariser", "algorithms/aflora.py",
     "losses = ctx.train(groups, regulariser if opts.gamma > 0 else None)", "losses = ctx.train(groups, None)",
     ["tests/test_exactness_e2e.py::test_aflora_round_from_trained_b_and_lambda_to_the_merged_base"]),
    ("2 AFLoRA drops the fusion (A' = A_FT)", "algorithms/aflora.py",
     'new_state[f"{name}.A"] = fuse(state[f"{name}.A"], tuned[f"{name}.A"], opts.alpha)', 'new_state[f"{name}.A"] = tuned[f"{name}.A"]',
     ["tests/test_exactness_e2e.py::test_aflora_round_from_trained_b_and_lambda_to_the_merged_base"]),
    ("3 AFLoRA uploads the pruned mask", "algorithms/aflora.py",
     'sent = mask if opts.upload_mask == "trained" else new_mask', "sent = new_mask",
     ["tests/test_exactness_e2e.py::test_aflora_round_from_trained_b_and_lambda_to_the_merged_base"]),
    ("4 HETLoRA averages B uniformly", "algorithms/hetlora.py",
     'new_state[f"{name}.B"] = weighted_sum([pad_columns(B, self.r_max) for B in Bs], w)',
     'new_state[f"{name}.B"] = weighted_sum([pad_columns(B, self.r_max) for B in Bs], [1 / len(Bs)] * len(Bs))',
     ["tests/test_exactness_e2e.py::test_hetlora_round_pads_and_weights_a_and_b_by_update_norm",
      "tests/test_baselines.py::test_hetlora_server_pads_and_weights_by_update_norm"]),
    ("5 FedIT averages uniformly", "algorithms/fedit.py",
     "p = data_weights(updates)", "p = [1 / len(updates)] * len(updates)",
     ["tests/test_exactness_e2e.py::test_fedit_round_is_data_weighted_fedavg_of_a_and_b",
      "tests/test_aggregation_math.py::test_fedit_separate_averaging_interferes"]),
]
for title, rel, old, new, tests in MUTANTS:
    work = Path(f"/tmp/hand_mutant_{title[0]}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "src", work / "src")
    f = work / "src" / "fedlora" / rel
    text = f.read_text()
    assert text.count(old) == 1, (title, old)
    f.write_text(text.replace(old, new))
    for t in tests:
        env = {**os.environ, "PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1"}
        rc = subprocess.run([sys.executable, "-m", "pytest", t, "-x", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
        last = [l for l in rc.stdout.splitlines() if l.startswith("E ")][:1]
        print(f"{title} | {t} | {'FAILS' if rc.returncode else 'passes'} | {last[0][:140] if last else ''}", flush=True)
    shutil.rmtree(work)
