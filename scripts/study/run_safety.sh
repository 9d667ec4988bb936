#!/bin/bash
# The safety rows of docs/results.md, on this 2-core CPU: OPCD, off-policy CD and OVD with
# the same prompts, steps, learning rate and LoRA settings, then one comparison table.
# Usage: bash scripts/study/run_safety.sh   (from the repository root, opcd installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
cfg=scripts/study/safety_opcd.yaml
time opcd train "$cfg" --overwrite --quiet
time opcd train "$cfg" method=offpolicy run.dir=runs/study/safety-offpolicy --overwrite --quiet
# OVD: 4 prompts x a group of 2 = the same 8 rollouts per step; expected score (no generation).
time opcd train "$cfg" method=ovd train.batch_size=4 rollout.n=2 run.dir=runs/study/safety-ovd \
    --overwrite --quiet
# Cross-size: the 1.5B model with the system prompt teaches the 0.5B student.
time opcd train "$cfg" teacher.mode=model teacher.model=qwen2.5-coder-1.5b-instruct \
    run.dir=runs/study/safety-opcd-1.5b-teacher --overwrite --quiet
time opcd compare scripts/study/compare_safety.yaml
