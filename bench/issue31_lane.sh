#!/usr/bin/env bash
# The issue 31 studies' background lane (docs/studies_plan.md): the round-count pilot on validation
# data, then the tuning (its lr grid extended past any choice at an end), then the five-seed study
# on the test set, for AG News label skew and Financial PhraseBank IID. One process at a time,
# niced, one thread; every step resumes where it stopped, so rerunning this script after an
# interruption (or after extending a grid) continues the lane. Outputs only under $OUT.
#
#   CODE=/work/studies/evidence/code-<sha> OUT=/work/studies/evidence bash bench/issue31_lane.sh
#
# TASKS="agnews" or "fpb" runs one task (two lanes, one per core); PILOT_ONLY=1 stops after the pilot.
set -uo pipefail
CODE=${CODE:-$(cd "$(dirname "$0")/.." && pwd)}
OUT=${OUT:-/work/studies/evidence}
PY=${PY:-/work/main/.venv/bin/python}
CAP=${CAP:-18}            # pilot: at most this many rounds
STUDY_CAP=${STUDY_CAP:-10} # the studies' budget cap on rounds (docs/studies_plan.md)
VALIDATION=${VALIDATION:-500}
SEEDS=${SEEDS:-0,1,2,3,4}  # the main studies' seeds
EXTEND=${EXTEND:-2}        # grid extensions before a choice at the edge is accepted (and said so)
EXTRA_ALL=${EXTRA_ALL:-}   # --set flags for every command (the tiny rehearsal: docs/studies_plan.md)
DATA=${DATA:-/work/shared/data}  # the configs' relative data_dir would resolve beside the code copy
export PYTHONPATH=$CODE/src OMP_NUM_THREADS=1
fed() { nice -n 10 "$PY" -m fedlora.cli "$@"; }

declare -A CONFIG=([agnews]=$CODE/configs/studies/agnews_label_skew.yaml [fpb]=$CODE/configs/fpb_iid.yaml)
# AG News tunes issue 29's four 2025 methods beside the six (configs/studies/agnews_label_skew.yaml)
declare -A METHODS=([agnews]=aflora,fedit,ffa,flora,flexlora,hetlora,fedex,fedsa,fedsvd,rolora
                    [fpb]=aflora,fedit,ffa,flora,flexlora,hetlora)
# the main studies add AFLoRA's ablations on AG News (AFLoRA's tuned settings, one component off)
declare -A MAIN=([agnews]=${METHODS[agnews]},aflora-no-ddr,aflora-no-dlf [fpb]=${METHODS[fpb]})
declare -A EXTRA=([agnews]="" [fpb]="--set federation.local_steps=4 --set federation.eval_every=1 --set federation.eval_subset=100")

extend_grid() {  # one more lr past each end of the grid that some method chose (×3 / ×10/3 steps)
  "$PY" - "$@" <<'PYEOF'
import csv, sys, yaml
from decimal import Decimal
grid_path, table = sys.argv[1:]
grid = yaml.safe_load(open(grid_path))
lrs = sorted(float(x) for x in grid["lr"])
chosen = [float(r["lr"]) for r in csv.DictReader(open(table)) if r["chosen"] == "True"]
def step(lr, up):  # 0.001 -> 0.003 -> 0.01 -> 0.03 -> 0.1 ... and back down
    lead = Decimal(repr(lr)).normalize().as_tuple().digits[0]
    factor = (3 if lead == 1 else 10 / 3) if up else (1 / 3 if lead == 3 else 3 / 10)
    return float(f"{lr * factor:.1g}")
if max(lrs) in chosen:
    lrs.append(step(max(lrs), True))
if min(lrs) in chosen:
    lrs.insert(0, step(min(lrs), False))
grid["lr"] = sorted(lrs)
yaml.safe_dump(grid, open(grid_path, "w"), sort_keys=False, default_flow_style=None)
PYEOF
}

plateau() {  # the pilot's decision: "R" when both curves have plateaued, "" while either rises
  "$PY" - "$@" <<'PYEOF'
import json, sys
from fedlora.records import plateau_round
rounds = []
for run in sys.argv[1:]:
    curve = [r["accuracy"] for r in map(json.loads, open(f"{run}/metrics.jsonl")) if r.get("accuracy") is not None]
    rounds.append(plateau_round(curve))
print("" if None in rounds else max(rounds))
PYEOF
}

rounds_done() {  # the last round in a run's metrics.jsonl, 0 when there is none
  [ -f "$1/metrics.jsonl" ] || { echo 0; return; }
  "$PY" -c 'import json, sys; print(max([0] + [json.loads(l)["round"] for l in open(sys.argv[1])]))' "$1/metrics.jsonl"
}

for task in ${TASKS:-agnews fpb}; do
  pilot=$OUT/pilot/$task
  mkdir -p "$pilot"
  decided=""
  for R in $(seq 6 3 "$CAP"); do
    for m in fedit aflora; do
      run=$pilot/$m
      if [ "$(rounds_done "$run")" -ge "$R" ]; then
        :  # this step ran earlier (also in a copy restored from docs/ without its checkpoint)
      elif [ -f "$run/checkpoint.safetensors" ]; then
        fed run --resume "$run" --set federation.rounds=$R --quiet || exit 1
      else  # new, or restored from docs/ short of R without a checkpoint: from scratch (same seed, same curve)
        rm -rf "$run"
        fed run "${CONFIG[$task]}" --out "$run" --quiet --set algorithm.name=$m --set threads=1 --set data.data_dir=$DATA \
          --set data.validation_examples=$VALIDATION --set evaluation.mmlu=false --set federation.eval_subset=null \
          --set federation.eval_every=1 --set federation.rounds=$R ${EXTRA[$task]/--set federation.eval_subset=100/} \
          $EXTRA_ALL || exit 1
      fi
    done
    decided=$(plateau "$pilot/fedit" "$pilot/aflora")
    echo "$(date -u +%FT%TZ) pilot $task: $R rounds, plateau: ${decided:-not yet}" | tee -a "$OUT/lane.log"
    [ -n "$decided" ] && break
  done
  rounds=${decided:-$CAP}
  [ "$rounds" -gt "$STUDY_CAP" ] && rounds=$STUDY_CAP
  echo "$rounds" > "$pilot/ROUNDS"
  echo "$(date -u +%FT%TZ) $task: study rounds $rounds" | tee -a "$OUT/lane.log"
done
[ -n "${PILOT_ONLY:-}" ] && exit 0

for task in ${TASKS:-agnews fpb}; do
  rounds=$(cat "$OUT/pilot/$task/ROUNDS")
  tune=$OUT/tune/$task
  mkdir -p "$tune"
  [ -f "$tune/grid.yaml" ] || cp "$CODE/configs/grids/lr_wide.yaml" "$tune/grid.yaml"
  # tuning; a choice at an end of the lr grid extends the grid past it for everyone (same grid,
  # same budget) and reruns, reusing every finished point; after EXTEND extensions, --allow-edge
  for extension in $(seq 0 "$EXTEND"); do
    edge=""; [ "$extension" -eq "$EXTEND" ] && edge=--allow-edge
    fed tune "${CONFIG[$task]}" --methods "${METHODS[$task]}" \
      --grid "$tune/grid.yaml" --validation-examples $VALIDATION --seed 0 --seeds "$SEEDS" $edge \
      --out "$tune" --quiet --set threads=1 --set data.data_dir=$DATA --set federation.rounds=$rounds ${EXTRA[$task]} $EXTRA_ALL
    status=$?
    echo "$(date -u +%FT%TZ) tune $task: exit $status $edge (2: a choice at the grid's edge, see tuning.md)" | tee -a "$OUT/lane.log"
    [ "$status" -eq 0 ] && break
    [ "$status" -ne 2 ] && exit 1
    extend_grid "$tune/grid.yaml" "$tune/tuning.csv" || exit 1
    echo "$(date -u +%FT%TZ) tune $task: grid now $(grep '^lr:' "$tune/grid.yaml")" | tee -a "$OUT/lane.log"
  done
  [ -f "$tune/tuned.yaml" ] || exit 1
  # the main study: the chosen settings on the test set, the tuning's overrides, seeds $SEEDS
  fed compare "$tune/tuned.yaml" --methods "${MAIN[$task]}" --seeds "$SEEDS" --reference fedit \
    --out "$OUT/main/$task" --quiet --set threads=1 --set data.data_dir=$DATA --set federation.rounds=$rounds \
    ${EXTRA[$task]} $EXTRA_ALL
  echo "$(date -u +%FT%TZ) main $task: exit $?" | tee -a "$OUT/lane.log"
done
