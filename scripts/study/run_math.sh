#!/bin/bash
# Math with experiential knowledge, on this 2-core CPU: the 0.5B model extracts experience
# from its own solutions to reasoning-gym problems, OPCD distils it, one comparison table.
# Usage: bash scripts/study/run_math.sh   (from the repository root, opcd installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
cfg=scripts/study/math.yaml
time opcd extract "$cfg" --overwrite
time opcd train "$cfg" task.context_file=runs/study/math-extract/experience.txt --overwrite --quiet
time opcd compare scripts/study/compare_math.yaml
