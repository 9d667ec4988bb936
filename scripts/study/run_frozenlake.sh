#!/bin/bash
# FrozenLake with experiential knowledge, on this 2-core CPU: the 0.5B model extracts
# experience from its own played episodes, OPCD distils it, one comparison table.
# Usage: bash scripts/study/run_frozenlake.sh   (from the repository root, opcd installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
cfg=scripts/study/frozenlake.yaml
time opcd extract "$cfg" --overwrite
time opcd train "$cfg" task.context_file=runs/study/frozenlake-extract/experience.txt --overwrite --quiet
time opcd compare scripts/study/compare_frozenlake.yaml
