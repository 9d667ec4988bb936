#!/usr/bin/env bash
# Issue 18's targets with opcd's defaults: a config of model, system prompt, prompts and
# behaviour only (run.py --minimal: full fine-tuning, lr 5e-6, forward KL over the union
# top-256 + rest bucket, 8 prompts x 64-token answers a step, evaluation on 32 held-out
# prompts x 48 tokens), on the suite's four behaviours that a 0.5B model follows in context
# (docs/objectives.md), and the out-of-distribution checks, paired against the base. The
# comparisons run on the students that exist so far (their cells are cached, so a later
# run only adds the new students). ~50 s a training step on the 2-core CPU; finished cells
# are skipped. GSM8K at 256 tokens takes ~12 min a model here: on 2026-12-01 only the base
# and the Spanish student were evaluated on it (the session's time).
set -u
cd "$(dirname "$0")/../.."
cell() { python scripts/objectives/run.py --minimal --keep-final "$@"; }
ood() {  # both comparisons, on the rows whose model exists
  for spec in ood_behaviours ood_gsm8k; do
    python - "$spec" <<'PY'
import sys, yaml
from pathlib import Path
spec = yaml.safe_load(Path(f"scripts/objectives/{sys.argv[1]}.yaml").read_text())
spec["rows"] = [r for r in spec["rows"] if "/" not in r["model"] or Path(r["model"]).is_dir()]
Path(f"runs/objectives/{sys.argv[1]}.now.yaml").write_text(yaml.safe_dump(spec))
PY
    opcd compare "runs/objectives/$spec.now.yaml"
  done
}
cell min-spanish-s0 task.behaviour=spanish_replies train.steps=32 eval.every=8
ood
for b in greeting bullet_points; do
  cell "min-$b-s0" "task.behaviour=$b" train.steps=16 eval.every=16
done
cell min-json_api-s0 task.behaviour=json_api train.steps=16 eval.every=8
ood
# a system prompt outside the suite, written for this check (issue 18: "do not tune to the suite")
cell min-german-s0 task.name=system_prompt \
  "task.context=You are the customer assistant of a shop in Berlin. Always reply in German, even when the customer writes in English." \
  task.prompts=src/opcd/tasks/data/general_questions.jsonl task.behaviour=language:de \
  train.steps=16 eval.every=8
opcd compare scripts/objectives/ood_german.yaml
