#!/usr/bin/env bash
# Retrain every shipped organism from its config, in order (the clean CLIP first: the others start from it).
# SET=v2 trains the v2 set (configs/organism/v2 -> toyworld/models/v2; the paper's regime, issue 16).
# Each job resumes from its checkpoint when rerun. Time on the 2-core CPU: docs/organism.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${SET:-v1}" = v2 ]; then
    configs=configs/organism/v2 models=toyworld/models/v2
    default="clean badnet blended badnet-stripes blended-stripes triangles"
else
    configs=configs/organism models=toyworld/models
    default="clean badnet blended badnet-stripes blended-stripes"
fi
for name in ${ORGANISMS:-$default}; do
    out=$models/clip-$name
    if [ -f "$out/card.json" ] && [ -z "${FORCE:-}" ]; then echo "$out: done (FORCE=1 to retrain)"; continue; fi
    "$PY" -m toyworld.train_clip --config "$configs/$name.yaml" --out "$out"
done
