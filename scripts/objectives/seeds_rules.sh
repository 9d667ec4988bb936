#!/usr/bin/env bash
# Issue 18: replace mode with a pool that also holds format, length and language rules
# (scripts/objectives/pool_mixed.txt: the 30 built-in role prompts + 30 rule prompts, none of
# them one of the suite's). Replace at share 0.5 with the role pool alone kept the greeting
# but lost ~0.25 on bullets and JSON (docs/objectives.md): its students learnt "a system
# prompt present -> prose". Three training seeds of the Spanish student, the minimal config,
# 16 steps; then scripts/objectives/ood_rules.yaml (80 held-out prompts per behaviour, paired
# with the base per item, then over seeds). ~18 min a cell alone; finished cells are skipped.
set -u
cd "$(dirname "$0")/../.."
for s in 0 1 2; do
  python scripts/objectives/run.py --minimal --keep-final "seeds-rules-s$s" \
    task.behaviour=spanish_replies train.seed=$s train.steps=16 eval.every=16 \
    task.other_system_prompt_share=0.5 task.other_system_prompt_mode=replace \
    task.other_system_prompts=scripts/objectives/pool_mixed.txt
  rm -rf "runs/objectives/seeds-rules-s$s/checkpoints"
done
opcd compare scripts/objectives/ood_rules.yaml
