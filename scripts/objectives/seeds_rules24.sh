#!/usr/bin/env bash
# Issue 18: the role + rule pool at share 0.5 (seeds_rules.sh) between its two measured
# lengths. Seed 1 learnt Spanish only halfway at 16 steps (50%; the rate target needs 70%)
# and lost the JSON prompt at 32 (-0.225): is there a step count that meets both? Seed 1
# to 24 steps, evaluated every 8, then scripts/objectives/ood_rules24.yaml (80 held-out
# prompts per behaviour, paired with the base per item). ~35 min of training alone.
#   SEEDS="0 1 2" bash scripts/objectives/seeds_rules24.sh    (default: 1; finished seeds are skipped)
set -u
cd "$(dirname "$0")/../.."
for s in ${SEEDS:-1}; do
  python scripts/objectives/run.py --minimal --keep-final "seeds-rules24-s$s" \
    task.behaviour=spanish_replies train.seed=$s train.steps=24 eval.every=8 \
    task.other_system_prompt_share=0.5 task.other_system_prompt_mode=replace
  rm -rf "runs/objectives/seeds-rules24-s$s/checkpoints"
done
opcd compare scripts/objectives/ood_rules24.yaml
