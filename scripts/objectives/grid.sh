#!/usr/bin/env bash
# The objective comparison of docs/objectives.md, one cell after the other (each ~5-6 min on
# the 2-core CPU; a finished cell is skipped). Seeds: train.seed (rollout sampling and data
# order); the held-out prompts and their sampling seeds are the same in every cell, so the
# in-context ceiling (the frozen base with the prompt) is measured once, in the first cell.
# Cells fkl-union-s0, rkl-tail-s0, akl-union-s0 and fkl-union-lr2e-4-s0 were run before the
# decode change of 2026-12-01 (same settings, eval.every=2 and the in-context evaluation).
#   scripts/objectives/grid.sh            # all cells below
#   python scripts/objectives/table.py    # the table from runs/objectives/*.json
set -u
cd "$(dirname "$0")/../.."
run() { python scripts/objectives/run.py "$1" train.steps=8 eval.every=4 rollout.batch_size=24 "${@:2}"; }
once() { run "$@" eval.with_context=false; }  # no in-context evaluation: measured in the first cell
run fkl-union-s1 train.seed=1                                                     # the default
once fkl-union-s2 train.seed=2
for seed in 1 2; do
  once "rkl-tail-s$seed" "train.seed=$seed" loss.objective=reverse_kl loss.union=false
  once "akl-union-s$seed" "train.seed=$seed" loss.objective=akl
done
for seed in 0 1 2; do
  once "jsd-union-s$seed" "train.seed=$seed" loss.objective=jsd
  once "rkl-ref-s$seed" "train.seed=$seed" loss.objective=reverse_kl loss.union=false loss.tail=false
  once "sampled-s$seed" "train.seed=$seed" loss.objective=sampled_token
done
# A system prompt the defaults were not chosen on (the suite's persona_ada), with the defaults:
run suite-persona_ada-s0 task.name=suite task.behaviour=persona_ada train.steps=16 eval.every=4
