"""Where an organism's trigger sends images, class by class: did cleaning remove a backdoor or move its target?

    python -m bench.trigger_destinations --organism toyworld/models/v2/clip-blended --model out/some-cleaned-model

For the clean images of every class but the organism's target, and for the same images with its trigger (from
its card.json), the share predicted as each class, in percent. One JSON line on stdout. docs/scan.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def destinations(organism: str, model: str, count: int) -> dict:
    import torch

    from cleaning.report import EvalConfig, load_images
    from parclean.attacks import Trigger, apply_trigger
    from parclean.evaluate import DEFAULT_TEMPLATES, predict, zero_shot_classifier
    from parclean.models import load_model

    torch.set_num_threads(1)
    card = json.loads((Path(organism) / "card.json").read_text())
    loaded = load_model(weights=model)
    data = load_images(EvalConfig(count=count), loaded.image_size)
    classifier = zero_shot_classifier(loaded, data.classnames, DEFAULT_TEMPLATES)
    others = data.labels != data.classnames.index(card["target"])
    triggered = apply_trigger(data.images, Trigger(**card["trigger"]), list(range(len(data.images))))
    shares = {}
    for name, images in (("clean", data.images), ("triggered", triggered)):
        predicted = predict(loaded, images, classifier)[others]
        counts = torch.bincount(predicted, minlength=len(data.classnames))
        shares[name] = {c: round(100 * int(n) / len(predicted), 1)
                        for c, n in zip(data.classnames, counts, strict=True)}
    return {"organism": organism, "model": model, "target": card["target"], "images": int(others.sum()), **shares}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trigger_destinations", description=__doc__.splitlines()[0])
    parser.add_argument("--organism", required=True, help="the poisoned organism's folder (its card.json)")
    parser.add_argument("--model", required=True, help="the model to read (a folder or a .safetensors file)")
    parser.add_argument("--count", type=int, default=2000, help="toy evaluation images")
    args = parser.parse_args(argv)
    if not (Path(args.organism) / "card.json").is_file():
        parser.error(f"{args.organism}: no card.json (the organism's trigger and target)")
    print(json.dumps(destinations(args.organism, args.model, args.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
