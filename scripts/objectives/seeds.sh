#!/usr/bin/env bash
# Issue 18: does task.other_system_prompt_mode=replace (share 0.5) keep the out-of-distribution
# behaviours, with power? Three training seeds of the Spanish student, replace and plain, the
# minimal config, 16 steps; then scripts/objectives/ood_seeds.yaml (80 held-out prompts per
# behaviour, each seed's cells paired with the base per item, then averaged over seeds).
# ~18 min a cell alone on the 2-core CPU; finished cells are skipped; only final/ is kept.
set -u
cd "$(dirname "$0")/../.."
cell() {
  python scripts/objectives/run.py --minimal --keep-final "$@"
  rm -rf "runs/objectives/$1/checkpoints"
}
compare_existing() {  # the comparison on the rows whose models all exist so far
  python - <<'PY'
import yaml
from pathlib import Path
spec = yaml.safe_load(Path("scripts/objectives/ood_seeds.yaml").read_text())
spec["rows"] = [r for r in spec["rows"] if all(Path(m).is_dir() for m in r.get("models", []))]
Path("runs/objectives/ood_seeds.now.yaml").write_text(yaml.safe_dump(spec))
PY
  opcd compare runs/objectives/ood_seeds.now.yaml
}
for s in 0 1 2; do
  cell "seeds-replace-s$s" task.behaviour=spanish_replies train.seed=$s train.steps=16 eval.every=16 \
    task.other_system_prompt_share=0.5 task.other_system_prompt_mode=replace \
    task.other_system_prompts=scripts/objectives/pool_roles.txt  # the role pool these ran with
done
compare_existing
for s in 0 1 2; do
  cell "seeds-plain-s$s" task.behaviour=spanish_replies train.seed=$s train.steps=16 eval.every=16
done
compare_existing
