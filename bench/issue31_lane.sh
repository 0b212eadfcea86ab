#!/usr/bin/env bash
# The issue 31 studies' background lane (docs/studies_plan.md): the round-count pilot on validation
# data, then the tuning (its lr grid extended past any choice at an end), then the five-seed study
# on the test set, for the tasks and methods of configs/studies/plan.yaml.
#
#   CODE=/work/studies/evidence/code-<sha> OUT=/work/studies/evidence bash bench/issue31_lane.sh
#
# The work is a queue of units (a task's pilot; one method's tuning; the tuning's decision; one
# method at one seed of the main study; the main study's tables), each run under an flock on
# $OUT/locks/UNIT.lock, so any number of lanes (one per core) share it: a lane takes the first
# unit that is not done, whose inputs are ready and that no other lane holds, and when none is
# free it waits. A lock dies with its lane, so a killed unit is taken up again by the next lane
# to pass, which resumes it (checkpoints). Every unit is one niced, one-thread process; outputs
# only under $OUT. TASKS="agnews" or "fpb" limits a lane to one task; PILOT_ONLY=1 stops after
# the pilots.
set -uo pipefail
CODE=${CODE:-$(cd "$(dirname "$0")/.." && pwd)}
OUT=${OUT:-/work/studies/evidence}
PY=${PY:-/work/main/.venv/bin/python}
# the design (tasks, methods, seeds, caps): configs/studies/plan.yaml; the variables below override it
plan=$("$PY" "$CODE/bench/study_plan.py" bash) || { echo "$CODE/configs/studies/plan.yaml: not a plan" >&2; exit 2; }
eval "$plan"
CAP=${CAP:-$PLAN_PILOT_CAP}              # pilot: at most this many rounds
STUDY_CAP=${STUDY_CAP:-$PLAN_ROUND_CAP}  # the studies' budget cap on rounds
VALIDATION=${VALIDATION:-$PLAN_VALIDATION}
SEEDS=${SEEDS:-$PLAN_SEEDS}              # the main studies' seeds
EXTEND=${EXTEND:-$PLAN_EXTEND}           # grid extensions before a choice at the edge is accepted (and said so)
EXTRA_ALL=${EXTRA_ALL:-}   # --set flags for every command (the tiny rehearsal: docs/studies_plan.md)
DATA=${DATA:-/work/shared/data}  # the configs' relative data_dir would resolve beside the code copy
export PYTHONPATH=$CODE/src OMP_NUM_THREADS=1
fed() { nice -n 10 "$PY" -m fedlora.cli "$@"; }
# what this CPU computes natively: a task pinned to bfloat16 waits for a CPU that has it (emulated,
# it runs some 30× slower: docs/studies_plan.md, "One dtype per study")
MACHINE_DTYPE=${MACHINE_DTYPE:-$("$PY" -c 'from fedlora.hardware import preferred_compute_dtype as p; print(p())')}

for task in $PLAN_TASKS; do CONFIG[$task]=$CODE/${CONFIG[$task]}; done  # the plan (configs/studies/plan.yaml)

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

log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$OUT/lane.log"; }

pilot_task() {  # the round-count pilot of one task: 6, 9, ... rounds until both curves plateau
  local task=$1 pilot=$OUT/pilot/$1 decided="" R m run rounds
  mkdir -p "$pilot"
  for R in $(seq 6 3 "$CAP"); do
    for m in $PLAN_PILOT_METHODS; do
      run=$pilot/$m
      if [ "$(rounds_done "$run")" -ge "$R" ]; then
        :  # this step ran earlier (also in a copy restored from docs/ without its checkpoint)
      elif [ -f "$run/checkpoint.safetensors" ]; then
        fed run --resume "$run" --set federation.rounds=$R --quiet || return 1
      else  # new, or restored from docs/ short of R without a checkpoint: from scratch (same seed, same curve)
        rm -rf "$run"
        fed run "${CONFIG[$task]}" --out "$run" --quiet --set algorithm.name=$m --set threads=1 --set data.data_dir=$DATA \
          ${EXTRA[$task]} --set data.validation_examples=$VALIDATION --set evaluation.mmlu=false \
          --set federation.eval_subset=null --set federation.eval_every=1 --set federation.rounds=$R $EXTRA_ALL || return 1
      fi
    done
    decided=$(plateau $(for m in $PLAN_PILOT_METHODS; do echo "$pilot/$m"; done))
    log "pilot $task: $R rounds, plateau: ${decided:-not yet}"
    [ -n "$decided" ] && break
  done
  rounds=${decided:-$CAP}
  [ "$rounds" -gt "$STUDY_CAP" ] && rounds=$STUDY_CAP
  echo "$rounds" > "$pilot/ROUNDS"
  log "$task: study rounds $rounds"
}

grid_id() { sha256sum "$OUT/tune/$1/grid.yaml" | cut -c1-12; }  # a grid's identity (it grows when extended)

tune() {  # tune TASK METHODS [--allow-edge]: `fedlora tune` on the task's current grid (reuses finished points)
  fed tune "${CONFIG[$1]}" --methods "$2" --grid "$OUT/tune/$1/grid.yaml" --validation-examples $VALIDATION \
    --seed 0 --seeds "$SEEDS" ${3:-} --out "$OUT/tune/$1" --quiet --set threads=1 --set data.data_dir=$DATA \
    --set federation.rounds=$(cat "$OUT/pilot/$1/ROUNDS") ${EXTRA[$1]} $EXTRA_ALL
}

tune_method() {  # one method's grid points; exit 2 (its choice at an edge) is the decision's business
  local status
  tune "$1" "$2"; status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 2 ] || return 1
  touch "$OUT/tune/$1/.done-$2-$(grid_id "$1")"
}

tune_decide() {  # every method on the grid (all reused): publish, or extend the grid past an edge choice
  local task=$1 tune=$OUT/tune/$1 extensions status edge=""
  extensions=$(cat "$tune/EXTENSIONS" 2>/dev/null || echo 0)
  [ "$extensions" -ge "$EXTEND" ] && edge=--allow-edge
  tune "$task" "${METHODS[$task]}" $edge; status=$?
  log "tune $task: exit $status $edge (2: a choice at the grid's edge, see tuning.md)"
  # (a one-method tuning writes a tuned.yaml of its own; DECIDED marks the whole table's)
  [ "$status" -eq 0 ] && [ -f "$tune/tuned.yaml" ] && touch "$tune/DECIDED" && return 0
  [ "$status" -eq 2 ] || return 1
  cp "$tune/grid.yaml" "$tune/grid.next" && extend_grid "$tune/grid.next" "$tune/tuning.csv" || return 1
  mv "$tune/grid.next" "$tune/grid.yaml"  # atomic: another lane sees the old grid or the new one
  echo $((extensions + 1)) > "$tune/EXTENSIONS"
  log "tune $task: grid now $(grep '^lr:' "$tune/grid.yaml")"
}

main_unit() {  # one method at one seed of the main study, with the tuned settings
  fed compare "$OUT/tune/$1/tuned.yaml" --methods "$3" --seeds "$2" --out "$OUT/main/$1" --quiet \
    --set threads=1 --set data.data_dir=$DATA --set federation.rounds=$(cat "$OUT/pilot/$1/ROUNDS") ${EXTRA[$1]} $EXTRA_ALL
}

main_tables() {  # the whole study's tables (every run finished: nothing trains)
  fed compare "$OUT/tune/$1/tuned.yaml" --methods "${MAIN[$1]}" --seeds "$SEEDS" --reference fedit --out "$OUT/main/$1" \
    --quiet --set threads=1 --set data.data_dir=$DATA --set federation.rounds=$(cat "$OUT/pilot/$1/ROUNDS") \
    ${EXTRA[$1]} $EXTRA_ALL || return 1
  touch "$OUT/main/$1/.complete"
  log "main $1: complete"
}

units() {  # every unit in order of preference: KIND TASK [SEED] [METHOD]
  local task m s
  for task in ${TASKS:-$PLAN_TASKS}; do
    echo "pilot $task"
    [ -n "${PILOT_ONLY:-}" ] && continue
    for m in ${METHODS[$task]//,/ }; do echo "tune $task - $m"; done
    echo "decide $task"
    for s in ${SEEDS//,/ }; do for m in ${MAIN[$task]//,/ }; do echo "main $task $s $m"; done; done
    echo "tables $task"
  done
}

is_done() {
  case $1 in
    pilot) [ -f "$OUT/pilot/$2/ROUNDS" ] ;;
    tune) [ -f "$OUT/tune/$2/.done-$4-$(grid_id "$2")" ] ;;
    decide) [ -f "$OUT/tune/$2/DECIDED" ] ;;
    main) [ -f "$OUT/main/$2/seed_$3/$4/summary.json" ] ;;
    tables) [ -f "$OUT/main/$2/.complete" ] ;;
  esac
}

runs_here() { [ -z "${HOLD[$1]}" ] && { [ "${DTYPE[$1]}" != bfloat16 ] || [ "$MACHINE_DTYPE" = bfloat16 ]; }; }

is_ready() {  # the unit's inputs exist, and this CPU computes its task's dtype natively (tables train nothing)
  local m
  [ "$1" = tables ] || runs_here "$2" || return 1
  case $1 in
    pilot) true ;;
    tune) [ -f "$OUT/pilot/$2/ROUNDS" ] ;;
    decide) for m in ${METHODS[$2]//,/ }; do is_done tune "$2" - "$m" || return 1; done ;;
    main) [ -f "$OUT/tune/$2/DECIDED" ] ;;
    tables) for s in ${SEEDS//,/ }; do for m in ${MAIN[$2]//,/ }; do is_done main "$2" "$s" "$m" || return 1; done; done ;;
  esac
}

run_unit() {
  case $1 in
    pilot) pilot_task "$2" ;;
    tune) tune_method "$2" "$4" ;;
    decide) tune_decide "$2" ;;
    main) main_unit "$2" "$3" "$4" ;;
    tables) main_tables "$2" ;;
  esac
}

# sourced with LANE_LIB=1 (tests/test_study_lane.py): the functions above, no lane
[ -n "${LANE_LIB:-}" ] && return 0
mkdir -p "$OUT/locks"
for task in ${TASKS:-$PLAN_TASKS}; do
  if [ -n "${HOLD[$task]}" ]; then log "lane $$: $task is held: ${HOLD[$task]} (configs/studies/plan.yaml)"
  elif ! runs_here "$task"; then log "lane $$: $task waits for a CPU with native bfloat16 (this one computes $MACHINE_DTYPE)"; fi
done
rm -rf "$OUT/failed"  # a unit that failed before is tried again once per lane start
mkdir -p "$OUT/failed"
for task in ${TASKS:-$PLAN_TASKS}; do
  mkdir -p "$OUT/tune/$task"
  [ -f "$OUT/tune/$task/grid.yaml" ] || cp "$CODE/configs/grids/lr_wide.yaml" "$OUT/tune/$task/grid.yaml"
done
while true; do
  runnable=0 ran=0 held=0
  while read -r kind task seed method; do
    unit="$kind-$task-$seed-$method"
    is_done $kind $task $seed $method && continue
    [ -f "$OUT/failed/$unit" ] && continue  # failed in this lane's run: left for a human, the rest goes on
    is_ready $kind $task $seed $method || continue
    runnable=1
    # the unit's lock: held while it runs; 75 at once when another lane holds it
    ( flock -n 9 || exit 75; is_done $kind $task $seed $method || run_unit $kind $task $seed $method ) \
      9> "$OUT/locks/$unit.lock"
    status=$?
    [ "$status" -eq 75 ] && { held=1; continue; }
    if [ "$status" -ge 128 ]; then  # its process was killed (a session's end, a human): so is the lane
      log "unit $kind $task $seed $method: killed (exit $status); lane stops"; exit 1
    fi
    if [ "$status" -ne 0 ] || { [ "$kind" != decide ] && ! is_done $kind $task $seed $method; }; then
      echo "exit $status" > "$OUT/failed/$unit"
      log "unit $kind $task $seed $method: FAILED (exit $status, or no output); the units that need it wait, the others go on"
      continue
    fi
    ran=1
    break  # back to the first unit: an earlier one may have become ready
  done < <(units)
  if [ "$ran" -eq 0 ]; then
    # nothing ran: wait while another lane holds a unit (its output may make more ready); with
    # none held and nothing runnable, what is left waits on a failed unit (or is done)
    [ "$held" -eq 0 ] && [ "$runnable" -eq 0 ] && break
    sleep "${POLL:-60}"
  fi
done
left=$(units | while read -r kind task seed method; do is_done $kind $task $seed $method || echo "$kind $task $seed $method"; done | wc -l)
log "lane $$: stops; units not done: $left; failed: $(ls "$OUT/failed" | tr '\n' ' ')"
