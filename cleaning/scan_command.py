"""`parclean scan`: trigger-agnostic evidence of a backdoor in a CLIP checkpoint (cleaning/scan.py)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from cleaning.evaluate_command import add_model_arguments, model_and_eval
from cleaning.scan import TRANSFER_CONFIRMS, verdict_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)  # the eval config gives images, class names, templates; its triggers are ignored
    parser.add_argument("--threshold", type=float, default=2.0, help="anomaly index that flags a class (default 2, "
                        "Neural Cleanse's)")
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps per class and trigger form")
    parser.add_argument("--images-per-class", type=int, default=None,
                        help="clean images of each other class the inverted trigger must flip (default 4; 8 separates "
                        "a target from its look-alike class better, at twice the time)")
    parser.add_argument("--reference", help="a trusted model of the same architecture (checkpoint, or an open_clip "
                        "architecture name with --reference-pretrained): it is scanned too, and the verdict reads each "
                        "class's trigger against the reference's (docs/scan.md, 'Against a trusted reference')")
    parser.add_argument("--reference-pretrained", help="open_clip pretrained tag of --reference (needs the hub)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    from cleaning.report import load_images
    from cleaning.scan import ScanConfig, against_reference, scan

    given = {"steps": args.steps, "images_per_class": args.images_per_class}
    scan_cfg = ScanConfig(threshold=args.threshold, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    loaded, eval_cfg = model_and_eval(args)
    reference = load_reference(args, loaded.image_size) if args.reference else None
    start = time.perf_counter()
    data = load_images(eval_cfg, loaded.image_size)
    result = scan(loaded, data, scan_cfg, eval_cfg.template_strings(), reference)
    if reference is not None:
        result = against_reference(result, scan(reference, data, scan_cfg, eval_cfg.template_strings()), args.reference)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(result))
    else:
        print(reference_table(args.model, result) if reference is not None else table(args.model, result))
    return 0


def load_reference(args: argparse.Namespace, image_size: int):
    """The trusted reference model named by --reference (and --reference-pretrained); it must read the scanned
    model's image size, as both are scanned on the same images."""
    from parclean.models import load_model

    if args.reference_pretrained:
        reference = load_model(args.reference, pretrained=args.reference_pretrained)
    else:
        reference = load_model(args.architecture, weights=args.reference)
    if reference.image_size != image_size:
        raise ValueError(f"{args.reference}: the reference reads {reference.image_size} px images, the scanned model "
                         f"{image_size} px; a reference must be of the same architecture")
    return reference


def table(model: str, result: dict[str, Any]) -> str:
    """The verdict in one line, then each class's smallest inverted triggers and anomaly indices."""
    lines = [f"{model}: {verdict_text(result)}", "",
             f"{'class':<16}{'patch area':>11}{'index':>8}{'blend alpha':>13}{'index':>8}{'token loss':>12}"
             f"{'index':>8}"]
    for name, row in result["classes"].items():
        works = "" if row.get("token_works", True) else " (flips too few)"
        lines.append(f"{name:<16}{row['patch_size']:>11.3f}{row['patch_index']:>8.2f}{row['blend_size']:>13.3f}"
                     f"{row['blend_index']:>8.2f}{10 ** row['token_size']:>12.2g}{row['token_index']:>8.2f}{works}")
    lines.append(f"\n{result['seconds']:.0f} s. Smallest trigger (share of the image covered, or blend weight) "
                 "that sends the other classes' images to each class, and the loss one token-sized pattern reaches; "
                 "index = MADs below the median.")
    return "\n".join(lines)


def reference_table(model: str, result: dict[str, Any]) -> str:
    """The verdict against the reference, the scan's own verdict, then each class's readings."""
    lines = [f"{model}: {verdict_text(result)}",
             f"without the reference: {verdict_text(result['scan'])}", "",
             f"{'class':<16}{'transfer':>10}{'halvings':>10}{'token':>8}{'patch':>8}{'blend':>8}"]
    for name, row in result["classes"].items():
        transfer = (f"{row['transfer']:>10.2f}{row['transfer_halvings']:>10.2f}" if "transfer" in row
                    else f"{'-':>10}{'-':>10}")
        token = f"{row['token_halvings']:>8.2f}" if "token_halvings" in row else f"{'-':>8}"
        lines.append(f"{name:<16}{transfer}{token}{row['patch_halvings']:>8.2f}{row['blend_halvings']:>8.2f}")
    lines.append(f"\n{result['seconds']:.0f} s. transfer: the share of the images that this model's smallest patch "
                 "or blend trigger for the class (the larger) sends there in the reference, and its halvings below "
                 "0.9; token: halvings of the one-token trigger's loss, where only this model has a working one; "
                 "patch, blend: halvings of the trigger's size against the reference's; the class first by size "
                 f"counts double where its transfer exceeds {TRANSFER_CONFIRMS:g} halvings.")
    return "\n".join(lines)
