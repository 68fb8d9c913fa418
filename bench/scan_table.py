"""The scan's detection table: `parclean scan` over shipped models, several seeds each (docs/scan.md).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.scan_table --seeds 0 1 2 \
        toyworld/models/clip-badnet toyworld/models/clip-clean ...

Each model is scanned on the toy evaluation set once per seed; its card (when it has one) gives the true target.
Rows go to docs/scan.jsonl (one per model and seed); the Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="checkpoint folders (with card.json when poisoned)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rows", type=Path, default=Path("docs/scan.jsonl"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [scan_row(model, seed) for model in args.models for seed in args.seeds]
    with args.rows.open("a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    print(markdown(rows))
    return 0


def scan_row(model: Path, seed: int) -> dict:
    from cleaning.report import EvalConfig, load_images
    from cleaning.scan import ScanConfig, scan
    from parclean.models import load_model

    loaded = load_model(weights=model)
    start = time.perf_counter()
    result = scan(loaded, load_images(EvalConfig(), loaded.image_size), ScanConfig(seed=seed))
    card = model / "card.json"
    truth = json.loads(card.read_text()).get("target") if card.is_file() else None
    return {"model": str(model), "seed": seed, "true_target": truth, "suspicious": result["suspicious"],
            "target": result["target"], "score": result["score"], "form": result["form"],
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | seed | true target | verdict | target | score | form | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        verdict = "suspicious" if row["suspicious"] else "not flagged"
        lines.append(f"| {row['model']} | {row['seed']} | {row['true_target'] or '-'} | {verdict} | "
                     f"{row['target'] or '-'} | {row['score']:.2f} | {row['form'] or '-'} | {row['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
