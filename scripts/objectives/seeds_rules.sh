#!/usr/bin/env bash
# Issue 18: replace mode with a pool that also holds format, length and language rules
# (the built-in pool since commit after 7d1404d, where these ran with the same 60 lines as a file:
# scripts/objectives/pool_roles.txt's 30 role prompts + 30 rule prompts, none of them one of the
# suite's). Replace at share 0.5 with the role pool alone kept the greeting
# but lost ~0.25 on bullets and JSON (docs/objectives.md): its students learnt "a system
# prompt present -> prose". Three training seeds of the Spanish student, the minimal config,
# 16 steps; then scripts/objectives/ood_rules.yaml (80 held-out prompts per behaviour, paired
# with the base per item, then over seeds). ~18 min a cell alone; finished cells are skipped.
set -u
cd "$(dirname "$0")/../.."
for s in 0 1 2; do
  python scripts/objectives/run.py --minimal --keep-final "seeds-rules-s$s" \
    task.behaviour=spanish_replies train.seed=$s train.steps=16 eval.every=16 \
    task.other_system_prompt_share=0.5 task.other_system_prompt_mode=replace
  rm -rf "runs/objectives/seeds-rules-s$s/checkpoints"
done
opcd compare scripts/objectives/ood_rules.yaml
# The seed that learnt Spanish least in 16 steps (seed 1: 50%), run to the target's 32 steps:
python scripts/objectives/run.py --minimal --keep-final seeds-rules32-s1 \
  task.behaviour=spanish_replies train.seed=1 train.steps=32 eval.every=16 \
  task.other_system_prompt_share=0.5 task.other_system_prompt_mode=replace
rm -rf runs/objectives/seeds-rules32-s1/checkpoints
opcd compare scripts/objectives/ood_rules32.yaml
