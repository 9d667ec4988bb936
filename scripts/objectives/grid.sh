#!/usr/bin/env bash
# The objective comparison of docs/objectives.md, one cell after the other (each ~8-10 min on
# the 2-core CPU; a finished cell is skipped). Seeds: train.seed (rollout sampling and data
# order); the held-out prompts and their sampling seeds are the same in every cell.
#   scripts/objectives/grid.sh            # all cells below
#   python scripts/objectives/table.py    # the table from runs/objectives/*.json
set -u
cd "$(dirname "$0")/../.."
run() { python scripts/objectives/run.py "$1" train.steps=8 eval.every=2 rollout.batch_size=24 "${@:2}"; }
for seed in 0 1 2; do
  run "fkl-union-s$seed" "train.seed=$seed"                                     # the default
  run "rkl-tail-s$seed" "train.seed=$seed" loss.objective=reverse_kl loss.union=false
  run "rkl-ref-s$seed" "train.seed=$seed" loss.objective=reverse_kl loss.union=false loss.tail=false
  run "akl-union-s$seed" "train.seed=$seed" loss.objective=akl
done
# A system prompt the defaults were not chosen on (the suite's persona_ada), with the defaults:
run suite-persona_ada-s0 task.name=suite task.behaviour=persona_ada train.steps=16 eval.every=4
