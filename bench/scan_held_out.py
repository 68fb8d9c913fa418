"""Would checking each inverted trigger on unseen images separate a planted target from a natural easy class?

    python -m bench.scan_held_out --name "v2 clip-clean" --name "v2 clip-blended" > docs/scan-held-out.jsonl

For every model (of configs/scan/table.yaml) and candidate class, the patch and blend forms' smallest trigger as the
scan measures it (it flips the scan's own images), and the smallest that also flips as many unseen clean images of
the other classes (the next images_per_class of each); then each measure's anomaly indices over classes. Both come
from the same optimisation path (same seed and steps), so only what counts as a trigger differs. Seed 0, one
thread; about the cost of two scans per model. One JSON line per model on stdout (docs/scan.md, session 13).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.scan_table import TableConfig, scan_inputs
from parclean.config import load_config


def held_out_sizes(path: str, eval_count: int) -> dict:
    from cleaning.scan import FORMS, ScanConfig, _others, _smallest_trigger, anomaly_indices

    cfg = ScanConfig()
    loaded, data, classifier = scan_inputs(path, eval_count)
    sizes = {(measure, form): [] for measure in ("fitted", "universal") for form in FORMS[:2]}
    for target in range(len(data.classnames)):
        images = _others(data, target, cfg)
        unseen = _others(data, target, cfg, start=cfg.images_per_class)
        for form in FORMS[:2]:
            sizes["fitted", form].append(_smallest_trigger(loaded, classifier, images, target, form, cfg)[0])
            sizes["universal", form].append(_smallest_trigger(loaded, classifier, images, target, form, cfg,
                                                                unseen)[0])
    result = {}
    for (measure, form), values in sizes.items():
        indices = anomaly_indices(values)
        top = max(range(len(indices)), key=indices.__getitem__)
        result[f"{measure}_{form}"] = {"top": data.classnames[top], "index": round(indices[top], 2),
                                       "sizes": dict(zip(data.classnames, (round(v, 4) for v in values), strict=True))}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scan_held_out", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/scan/table.yaml")
    parser.add_argument("--name", action="append", required=True, help="a model of the table (repeatable)")
    args = parser.parse_args(argv)
    table = load_config(TableConfig, args.config)
    for model in table.models:
        if model.name in args.name:
            start = time.perf_counter()
            measures = held_out_sizes(model.path, table.eval_count)
            print(json.dumps({"name": model.name, "seconds": round(time.perf_counter() - start), **measures}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
