#!/usr/bin/env bash
# Issue 22: time the recipes whose headers said "not yet timed on this machine", each exactly
# as its header's command runs it, one after the other on the otherwise idle 2-core CPU.
# For each: the wall time and peak RSS (GNU time) and the run's log in runs/recipes/NAME.log;
# the run's saved config.yaml and metrics.jsonl, and that time line, copied to
# docs/results/recipes/ (the config measured: tests/test_recipes.py checks the recipe still
# equals it). `python scripts/recipes/table.py` prints the table of docs/results/recipes.md.
# A recipe whose run finished (NAME.done) is skipped; delete runs/recipes/NAME* to time it
# again.
#   bash scripts/recipes/time.sh [NAME ...]     (default: the five untimed recipes)
set -u
cd "$(dirname "$0")/../.."
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(suite full_finetune privileged_context system_prompt fsdp)
mkdir -p runs/recipes docs/results/recipes
for n in "${names[@]}"; do
  [ -e "runs/recipes/$n.done" ] && { echo "$n: done, skipped"; continue; }
  rm -rf "runs/recipes/$n"
  if [ "$n" = fsdp ]; then
    # The header's command names the GPU accelerate file; on this CPU the same run uses the
    # CPU one (gloo, 2 processes), as CI's FSDP tests do.
    cmd=(env OMP_NUM_THREADS=1 accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml
         -m opcd train "recipes/$n.yaml" "run.dir=runs/recipes/$n")
  else
    cmd=(opcd train "recipes/$n.yaml" "run.dir=runs/recipes/$n")
  fi
  echo "$(date -u +%FT%TZ) $n: ${cmd[*]}"
  start=$(date +%s)
  /usr/bin/time -f "peak RSS %M KiB (largest process), %e s" "${cmd[@]}" > "runs/recipes/$n.log" 2>&1
  rc=$?
  end=$(date +%s)
  echo "exit $rc, wall $((end - start)) s, $(tail -1 "runs/recipes/$n.log")" | tee -a "runs/recipes/$n.log"
  tail -1 "runs/recipes/$n.log" > "docs/results/recipes/$n.time"
  cp "runs/recipes/$n/config.yaml" "docs/results/recipes/$n.config.yaml"
  cp "runs/recipes/$n/metrics.jsonl" "docs/results/recipes/$n.metrics.jsonl"
  [ $rc -eq 0 ] && echo "$((end - start))" > "runs/recipes/$n.done"
done
