#!/bin/bash
# FrozenLake with experiential knowledge, on this 2-core CPU: the 0.5B model extracts
# experience from its own played episodes, OPCD distils it, one comparison table.
# Usage: bash scripts/study/run_frozenlake.sh   (from the repository root, opcd installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
cfg=scripts/study/frozenlake.yaml
time opcd extract "$cfg" --overwrite
time opcd train "$cfg" task.context_file=runs/study/frozenlake-extract/experience.txt --overwrite --quiet
# Cross-size contrast: the 1.5B extracts experience, placed directly in the 0.5B's prompt.
time opcd extract "$cfg" extract.model=qwen2.5-coder-1.5b-instruct \
    extract.dir=runs/study/frozenlake-extract-1.5b --overwrite
time opcd compare scripts/study/compare_frozenlake.yaml
