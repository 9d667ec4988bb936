#!/usr/bin/env bash
# Issue 20, the knowledge context: OPCD and off-policy CD (same prompts, steps, lr, LoRA),
# training seeds 0, 1, 2 (scripts/study/knowledge_opcd.yaml), then
# scripts/study/compare_knowledge.yaml. Finished runs (a final/ folder) are skipped; a run
# stopped half way resumes from its last checkpoint. Seeds first, methods interleaved, so
# that a partial run still compares the methods on the same seeds.
#   bash scripts/study/run_knowledge.sh [SEED ...]      (from the repository root)
# ROWS picks the rows (default "opcd offpolicy"); the others of issue 20:
#   opcd-paper     OPCD with the paper's exact objective (reverse KL over the student's
#                  top-256, no rest bucket)
#   offpolicy-sft  off-policy CD with SFT on the teacher's responses
#   ROWS="opcd-paper offpolicy-sft" bash scripts/study/run_knowledge.sh 0
set -u
cd "$(dirname "$0")/../.."
cfg=scripts/study/knowledge_opcd.yaml
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
read -r -a rows <<< "${ROWS:-opcd offpolicy}"
for s in "${seeds[@]}"; do
  for m in "${rows[@]}"; do
    case $m in
      opcd) args=(method=opcd) ;;
      offpolicy) args=(method=offpolicy) ;;
      opcd-paper) args=(method=opcd loss.objective=reverse_kl loss.union=false loss.tail=false) ;;
      offpolicy-sft) args=(method=offpolicy offpolicy.loss=sft) ;;
      *) echo "unknown row $m"; exit 2 ;;
    esac
    dir=runs/study/knowledge-$m-s$s
    [ -d "$dir/final" ] && { echo "$dir: done"; continue; }
    flag=(); [ -e "$dir/checkpoints" ] && flag=(--resume)
    [ ${#flag[@]} -eq 0 ] && [ -e "$dir" ] && flag=(--overwrite)  # started, no checkpoint yet
    echo "$(date -u +%FT%TZ) $dir ${flag[*]}"
    /usr/bin/time -f "%e s, peak RSS %M KiB" opcd train "$cfg" "${args[@]}" train.seed=$s \
        run.dir=$dir --quiet "${flag[@]}"
  done
done
opcd compare scripts/study/compare_knowledge.yaml   # lists the seeds trained so far
