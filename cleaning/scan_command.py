"""`parclean scan`: trigger-agnostic evidence of a backdoor in a CLIP checkpoint (cleaning/scan.py)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from parclean.config import load_config, parse_override


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint (.safetensors, or a folder holding "
                        "model.safetensors), or an open_clip architecture name with --pretrained")
    parser.add_argument("--pretrained", help="open_clip pretrained tag (needs the hub)")
    parser.add_argument("--architecture", help="architecture of a checkpoint that does not name its own")
    parser.add_argument("--eval", dest="eval_config", default=None,
                        help="evaluation config YAML (images, class names, templates; its triggers are ignored)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an eval setting")
    parser.add_argument("--threshold", type=float, default=2.0, help="anomaly index that flags a class (default 2, "
                        "Neural Cleanse's)")
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps per class and trigger form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    from cleaning.models import load_model
    from cleaning.report import EvalConfig, load_images
    from cleaning.scan import ScanConfig, scan

    eval_cfg = load_config(EvalConfig, args.eval_config, dict(parse_override(s) for s in args.set))
    scan_cfg = ScanConfig(threshold=args.threshold, seed=args.seed,
                          **({"steps": args.steps} if args.steps is not None else {}))
    if args.pretrained:
        loaded = load_model(args.model, pretrained=args.pretrained)
    else:
        loaded = load_model(args.architecture, weights=args.model)
    start = time.perf_counter()
    result = scan(loaded, load_images(eval_cfg, loaded.image_size), scan_cfg, eval_cfg.templates)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result) if args.json else table(args.model, result))
    return 0


def table(model: str, result: dict[str, Any]) -> str:
    """The verdict in one line, then each class's smallest inverted triggers and anomaly indices."""
    if result["suspicious"]:
        head = (f"{model}: SUSPICIOUS: backdoor target {result['target']!r} ({result['form']} trigger), score "
                f"{result['score']:.2f} > threshold {result['threshold']:.1f}")
    else:
        head = (f"{model}: no backdoor found: score {result['score']:.2f} <= threshold {result['threshold']:.1f} "
                f"(most anomalous class {result['most_anomalous']!r})")
    lines = [head, "", f"{'class':<16}{'patch area':>11}{'index':>8}{'blend alpha':>13}{'index':>8}"]
    for name, row in result["classes"].items():
        lines.append(f"{name:<16}{row['patch_size']:>11.3f}{row['patch_index']:>8.2f}{row['blend_size']:>13.3f}"
                     f"{row['blend_index']:>8.2f}")
    lines.append(f"\n{result['seconds']:.0f} s. Smallest trigger (share of the image covered, or blend weight) "
                 "that sends the other classes' images to each class; index = MADs below the median.")
    return "\n".join(lines)
