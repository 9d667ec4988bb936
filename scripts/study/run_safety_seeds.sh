#!/bin/bash
# A second training seed for the safety OPCD and off-policy CD rows of docs/results.md (the
# first is run_safety.sh's, train.seed 0): how much of a difference between the methods is
# the training seed. Run after run_safety.sh; the table reuses its cells.
# Usage: bash scripts/study/run_safety_seeds.sh   (from the repository root, opcd installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
cfg=scripts/study/safety_opcd.yaml
time opcd train "$cfg" train.seed=1 run.dir=runs/study/safety-opcd-seed1 --overwrite --quiet
time opcd train "$cfg" method=offpolicy train.seed=1 run.dir=runs/study/safety-offpolicy-seed1 \
    --overwrite --quiet
time opcd compare scripts/study/compare_safety_seeds.yaml
