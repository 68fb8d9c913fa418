#!/usr/bin/env bash
# Retrain every shipped organism from its config, in order (the clean CLIP first: the others start from it).
# Each job resumes from its checkpoint when rerun. Time on the 2-core CPU: docs/organism.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for name in ${ORGANISMS:-clean badnet blended badnet-stripes blended-stripes}; do
    out=toyworld/models/clip-$name
    if [ -f "$out/card.json" ] && [ -z "${FORCE:-}" ]; then echo "$out: done (FORCE=1 to retrain)"; continue; fi
    "$PY" -m toyworld.train_clip --config "configs/organism/$name.yaml" --out "$out"
done
