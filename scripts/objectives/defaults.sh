#!/usr/bin/env bash
# Issue 18's targets with opcd's defaults: a config of model, system prompt, prompts and
# behaviour only (run.py --minimal: full fine-tuning, lr 5e-6, forward KL over the union
# top-256 + rest bucket, 8 prompts x 64-token answers a step, evaluation on 32 held-out
# prompts x 48 tokens), on the suite's four behaviours that a 0.5B model follows in context
# (docs/objectives.md), then the out-of-distribution checks, paired against the base.
# Each cell ~50 s a step on the 2-core CPU; a finished cell or compare cell is skipped.
set -u
cd "$(dirname "$0")/../.."
cell() { python scripts/objectives/run.py --minimal --keep-final "$@"; }
cell min-spanish-s0 task.behaviour=spanish_replies train.steps=32 eval.every=8
for b in greeting bullet_points json_api; do
  cell "min-$b-s0" "task.behaviour=$b" train.steps=16 eval.every=8
done
opcd compare scripts/objectives/ood_behaviours.yaml
opcd compare scripts/objectives/ood_gsm8k.yaml
