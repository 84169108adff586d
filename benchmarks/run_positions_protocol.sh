#!/usr/bin/env bash
# Multi-object positions at the public CompLift protocol, on a 2-core CPU: two lanes of one thread.
#   lane A: train eps -> eval eps (background + null base; CompLift fixed / adaptive / public one-trial)
#           -> eval energy HMC
#   lane B: train energy -> eval energy reverse + MALA
# The energy cells are scored by the eps model with the public one-trial scorer (lift vs null and vs
# background) and compkern's fixed 24 trials vs background only (vs null it keeps no multi-object
# scene of the eps model, see eval_eps.json), added to the same --out in a second pass.
# Every step resumes: rerun the script after an interruption. Logs: $ROOT/logs/lane{A,B}.log.
#   bash benchmarks/run_positions_protocol.sh                 # runs/positions_protocol
#   SMOKE=1 ROOT=/tmp/pp bash benchmarks/run_positions_protocol.sh   # seconds, tiny settings
set -euo pipefail
ROOT=${ROOT:-runs/positions_protocol}
if [[ "${SMOKE:-0}" == 1 ]]; then
  EPS_STEPS=3; ENERGY_STEPS=3; N=4; OBJ="1 2"; TR="--size 8 --channels 8 16 --batch 4"; TRIALS="--lift-trials 4 --lift-max-trials 8"
  EPS_GEN="--steps 3"; MCMC="--steps 3 --mcmc-steps 1 --leapfrog 2"
else
  EPS_STEPS=2000; ENERGY_STEPS=3000; N=64; OBJ="1 2 3 4 5"; TR=""; TRIALS="--lift-trials 24 --lift-max-trials 48"
  EPS_GEN="--steps 50"; MCMC="--steps 20 --mcmc-steps 1 --leapfrog 2"
fi
mkdir -p "$ROOT/logs"
CK="python -m compkern.cli positions"
EV="--n $N --objects $OBJ --threads 1 --lift-t 928"

timed() {  # timed LABEL CMD...: run CMD, log its wall time
  local label=$1; shift
  local t0=$SECONDS
  echo "[$(date -u +%H:%M:%S)] start $label: $*"
  "$@"
  echo "[$(date -u +%H:%M:%S)] done $label: $((SECONDS - t0)) s wall"
}

laneA() {
  timed train-eps $CK train --out "$ROOT/eps" --steps $EPS_STEPS --threads 1 $TR
  touch "$ROOT/eps.done"
  timed eval-eps $CK eval --eps-run "$ROOT/eps" --methods eps:reverse:background eps:reverse:null $EPS_GEN $EV \
    --lift fixed adaptive public $TRIALS --out "$ROOT/eval_eps.json"
  while [[ ! -f "$ROOT/energy.done" ]]; do sleep 15; done
  energy_eval hmc energy:hmc:background
}

energy_eval() {  # energy_eval NAME CELL...: generate, score with the public scorer, then with fixed trials vs background
  local name=$1; shift
  local args=(eval --eps-run "$ROOT/eps" --energy-run "$ROOT/energy" --methods "$@" $MCMC $EV $TRIALS
              --out "$ROOT/eval_energy_$name.json")
  timed "eval-energy-$name" $CK "${args[@]}" --lift public --lift-bases null background
  timed "lift-energy-$name" $CK "${args[@]}" --lift fixed --lift-bases background
}

laneB() {
  timed train-energy $CK train --out "$ROOT/energy" --energy --steps $ENERGY_STEPS --threads 1 $TR
  touch "$ROOT/energy.done"
  while [[ ! -f "$ROOT/eps.done" ]]; do sleep 15; done
  energy_eval rev_mala energy:reverse:background energy:mala:background
}

laneA > "$ROOT/logs/laneA.log" 2>&1 &
A=$!
laneB > "$ROOT/logs/laneB.log" 2>&1 &
B=$!
wait $A
wait $B
echo "all done: $ROOT"
