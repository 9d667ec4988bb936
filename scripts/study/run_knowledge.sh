#!/usr/bin/env bash
# Issue 20, the knowledge context: OPCD and off-policy CD (same prompts, steps, lr, LoRA),
# training seeds 0, 1, 2 (scripts/study/knowledge_opcd.yaml), then
# scripts/study/compare_knowledge.yaml. Finished runs (a final/ folder) are skipped; a run
# stopped half way resumes from its last checkpoint. Seeds first, methods interleaved, so
# that a partial run still compares the methods on the same seeds.
#   bash scripts/study/run_knowledge.sh [SEED ...]      (from the repository root)
set -u
cd "$(dirname "$0")/../.."
cfg=scripts/study/knowledge_opcd.yaml
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
for s in "${seeds[@]}"; do
  for m in opcd offpolicy; do
    dir=runs/study/knowledge-$m-s$s
    [ -d "$dir/final" ] && { echo "$dir: done"; continue; }
    flag=(); [ -e "$dir/checkpoints" ] && flag=(--resume)
    [ ${#flag[@]} -eq 0 ] && [ -e "$dir" ] && flag=(--overwrite)  # started, no checkpoint yet
    echo "$(date -u +%FT%TZ) $dir ${flag[*]}"
    /usr/bin/time -f "%e s, peak RSS %M KiB" opcd train "$cfg" method=$m train.seed=$s run.dir=$dir \
        --quiet "${flag[@]}"
  done
done
opcd compare scripts/study/compare_knowledge.yaml   # lists the seeds trained so far
