#!/usr/bin/env bash
# Start, stop or look at the study lanes (docs/studies_plan.md) in one command each:
#
#   bash bench/lanes.sh start    # restore published runs, freeze HEAD's code, start $LANES lanes
#   bash bench/lanes.sh status   # lanes alive, units running, the log's last lines
#   bash bench/lanes.sh stop     # stop every lane and what it runs (by process group id)
#
# `start` first copies back into $OUT whatever docs/ holds that $OUT lacks (bench/studies_sync.py
# restore: checked against the manifests' SHA-256, existing files kept), so it is the first
# command of a session whether or not the machine kept /work. Each lane runs in its own session
# (setsid): its process group id is its pid, written with its start time to $OUT/lanes.pid, and
# `stop` signals those groups only (the lane, the unit's subshell and its fedlora process), never
# a pid the system has since given to another process. NO_RESTORE=1 skips the
# restore (a rehearsal in another $OUT); the lane's own settings (TASKS, SEEDS, ...) pass through.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/work/studies/evidence}
STUDIES=$(dirname "$OUT")
LANES=${LANES:-2}
PY=${PY:-$ROOT/.venv/bin/python}
PIDS=$OUT/lanes.pid

count() { local n=0 f; for f in "$@"; do [ -e "$f" ] && n=$((n + 1)); done; echo "$n"; }  # files a glob found
started() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}' || true; }  # a pid's start time (clock ticks after boot)
# the lanes still running: a line of $PIDS is "pid start-time", so a pid reused by another process is not taken
alive() { [ -f "$PIDS" ] && while read -r pid since; do [ -n "$since" ] && [ "$(started "$pid")" = "$since" ] && echo "$pid"; done < "$PIDS" || true; }

case ${1:-status} in
  start)
    if [ -n "$(alive)" ]; then echo "lanes already running: $(alive | tr '\n' ' ')(bash bench/lanes.sh stop first)" >&2; exit 2; fi
    mkdir -p "$OUT"
    [ -n "${NO_RESTORE:-}" ] || "$PY" "$ROOT/bench/studies_sync.py" restore --studies "$STUDIES" --docs "$ROOT/docs"
    sha=$(git -C "$ROOT" rev-parse --short HEAD)
    code=$OUT/code-$sha
    if [ ! -d "$code" ]; then
      mkdir -p "$code.part" && git -C "$ROOT" archive HEAD src configs bench | tar -x -C "$code.part" && mv "$code.part" "$code"
    fi
    : > "$PIDS"
    for i in $(seq "$LANES"); do
      CODE=$code OUT=$OUT PY=$PY setsid nohup bash "$code/bench/issue31_lane.sh" > "$OUT/lane-$i.out" 2>&1 < /dev/null &
      echo "$! $(started $!)" >> "$PIDS"
    done
    echo "$(date -u +%FT%TZ) lanes started from $code: $(alive | tr '\n' ' ')" | tee -a "$OUT/lane.log"
    ;;
  stop)
    for pid in $(alive); do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 30); do [ -z "$(alive)" ] && break; sleep 1; done
    for pid in $(alive); do kill -KILL -- "-$pid" 2>/dev/null || true; done
    echo "$(date -u +%FT%TZ) lanes stopped" | tee -a "$OUT/lane.log"
    ;;
  status)
    echo "lanes alive: $(alive | tr '\n' ' ')"
    for lock in "$OUT"/locks/*.lock; do  # a unit runs while its lock is held
      [ -e "$lock" ] || continue
      flock -n "$lock" true 2>/dev/null || echo "running: $(basename "$lock" .lock)"
    done
    eval "$("$PY" "$ROOT/bench/study_plan.py" bash)"  # the tasks (configs/studies/plan.yaml)
    for task in $PLAN_TASKS; do
      points=$(count "$OUT"/tune/$task/validation/seed_*/*/summary.json)
      runs=$(count "$OUT"/main/$task/seed_*/*/summary.json)
      methods=$(echo "${METHODS[$task]}" | tr ',' '\n' | wc -l)
      lrs=$("$PY" -c 'import sys, yaml; print(len(yaml.safe_load(open(sys.argv[1]))["lr"]))' "$OUT/tune/$task/grid.yaml" 2>/dev/null || echo "?")
      mains=$(( $(echo "${MAIN[$task]}" | tr ',' '\n' | wc -l) * $(echo "$PLAN_SEEDS" | tr ',' '\n' | wc -l) ))
      echo "$task (${DTYPE[$task]}): pilot rounds $(cat "$OUT/pilot/$task/ROUNDS" 2>/dev/null || echo -), tuning points" \
        "finished $points of $methods × $lrs, main runs finished $runs of $mains"
    done
    tail -n 5 "$OUT/lane.log" 2>/dev/null || true
    ;;
  *) echo "usage: bash bench/lanes.sh start|status|stop" >&2; exit 2 ;;
esac
