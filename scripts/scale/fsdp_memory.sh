#!/usr/bin/env bash
# Peak resident memory of each process for one process, 2 data-parallel processes and 2 FSDP
# processes on the same run (fsdp_memory.yaml), from /usr/bin/time -v around each worker.
# Usage: bash scripts/scale/fsdp_memory.sh [MODEL] [OUT_DIR]   (from the repository root,
# with opcd installed; run alone on the machine). Prints one line per process.
set -uo pipefail
model=${1:-qwen2.5-coder-0.5b-instruct}
out=${2:-runs/scale-memory}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
worker() {  # $1: label; run as each torchrun worker (LOCAL_RANK set by torchrun)
  cat > "$out/worker-$1.sh" <<WORKER
#!/bin/sh
exec /usr/bin/time -v -o "$out/rss-$1.\$LOCAL_RANK" python -m opcd train "$here/fsdp_memory.yaml" \
  model=$model run.dir="$out/run-$1" --overwrite --quiet
WORKER
  chmod +x "$out/worker-$1.sh"
}
/usr/bin/time -v -o "$out/rss-one.0" python -m opcd train "$here/fsdp_memory.yaml" model="$model" \
  run.dir="$out/run-one" --overwrite --quiet; echo "one process: exit $?"
for kind in ddp fsdp; do
  worker "$kind"
  if [ "$kind" = fsdp ]; then export ACCELERATE_USE_FSDP=true; else unset ACCELERATE_USE_FSDP; fi
  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --no-python "$out/worker-$kind.sh" \
    > "$out/$kind.log" 2>&1; echo "2 processes, $kind: exit $?"
done
unset ACCELERATE_USE_FSDP
for f in "$out"/rss-*; do
  kib=$(awk -F': ' '/Maximum resident/ {print $2}' "$f")
  wall=$(awk -F': ' '/Elapsed/ {print $2}' "$f")
  awk -v n="$(basename "$f")" -v k="$kib" -v w="$wall" \
    'BEGIN {printf "%s: peak %.2f GiB, wall %s\n", n, k / 1048576, w}'
done
for kind in one ddp fsdp; do
  m="$out/run-$kind/metrics.jsonl"
  [ -f "$m" ] && python - "$m" "$kind" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"type": "train"' in l]
print(sys.argv[2], "losses:", [round(s["loss"], 5) for s in steps])
PY
done
# The final weights of the launched runs against one process's (when they finished).
python - "$out" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
def weights(run):
    return {k: v for f in sorted((out / run / "final").glob("*.safetensors")) for k, v in load_file(f).items()}
one = weights("run-one")
for run in ("run-ddp", "run-fsdp"):
    if (out / run / "final").is_dir():
        w = weights(run)
        print(run, "final weights against one process: largest difference",
              max(float((w[k] - one[k]).abs().max()) for k in one))
PY
