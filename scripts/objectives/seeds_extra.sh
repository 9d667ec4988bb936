#!/usr/bin/env bash
# Issue 18: anchor rows on top of the batch (task.other_system_prompt_rows=4: the step's first
# 4 prompts again, each under a system prompt from the built-in pool, the teacher seeing that
# prompt alone) instead of in place of half of it (share 0.5, seeds_rules.sh: seed 1 learnt
# Spanish only halfway at 16 steps). The Spanish student, the minimal config, 16 steps,
# train.seed 1 (the slow one) first, then 0 and 2; then scripts/objectives/ood_extra.yaml
# (80 held-out prompts per behaviour, paired with the base per item, then over seeds).
# ~1.5x the time of a plain cell (12 rows a step); finished cells are skipped.
set -u
cd "$(dirname "$0")/../.."
for s in 1 0 2; do
  python scripts/objectives/run.py --minimal --keep-final "seeds-extra-s$s" \
    task.behaviour=spanish_replies train.seed=$s train.steps=16 eval.every=16 \
    task.other_system_prompt_rows=4 task.other_system_prompt_mode=replace
  rm -rf "runs/objectives/seeds-extra-s$s/checkpoints"
done
opcd compare scripts/objectives/ood_extra.yaml
