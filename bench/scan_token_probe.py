"""What the scan's token form sees, class by class, on the models of the scan table (docs/scan.md).

    python -m bench.scan_token_probe --config configs/scan/table.yaml [--name "v2 clip-clean" ...]

For every model and candidate class: the token form's two measures as the scan takes them (log10 of the loss over
the last tenth of the steps, and the share of the scan's images flipped), the same for the learnt pattern pasted
on held-out images of the other classes (40 per class, the next ones after the scan's), and the anomaly index of
the loss over classes with no success gate. One JSON line per model on stdout. Seed 0 starting patterns, one
thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from bench.scan_table import TableConfig, scan_inputs
from parclean.config import load_config

HELD_OUT = 40


def probe(path: str, eval_count: int) -> dict:
    import torch
    import torch.nn.functional as F

    from cleaning.scan import ScanConfig, _others, anomaly_indices, paste_token, token_trigger, zero_shot_logits

    cfg = ScanConfig()
    loaded, data, classifier = scan_inputs(path, eval_count)
    classes = {}
    for target, name in enumerate(data.classnames):
        log_loss, rate, pattern = token_trigger(loaded, classifier, _others(data, target, cfg), target, cfg)
        held = torch.cat([data.images[data.labels == label][cfg.images_per_class:cfg.images_per_class + HELD_OUT]
                          for label in range(len(data.classnames)) if label != target])
        with torch.no_grad():
            triggered = paste_token(held, torch.sigmoid(pattern), torch.Generator().manual_seed(5))
            logits = zero_shot_logits(loaded, classifier, triggered)
            held_loss = F.cross_entropy(logits, torch.full((len(held),), target)).item()
            held_rate = (logits.argmax(dim=-1) == target).float().mean().item()
        classes[name] = {"log_loss": round(log_loss, 2), "rate": round(rate, 2),
                         "held_out_log_loss": round(math.log10(held_loss), 2), "held_out_rate": round(held_rate, 3)}
    indices = anomaly_indices([c["log_loss"] for c in classes.values()])
    for c, index in zip(classes.values(), indices, strict=True):
        c["index"] = round(index, 2)
    return classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scan_token_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/scan/table.yaml")
    parser.add_argument("--name", action="append", default=[], help="only these models (default: all)")
    args = parser.parse_args(argv)
    table = load_config(TableConfig, args.config)
    for model in table.models:
        if args.name and model.name not in args.name:
            continue
        start = time.perf_counter()
        classes = probe(model.path, table.eval_count)
        print(json.dumps({"name": model.name, "seconds": round(time.perf_counter() - start), "classes": classes}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
