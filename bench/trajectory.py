"""Clean accuracy and ASR along cleaning runs: every kept checkpoint of each run, measured and plotted.

    python -m bench.trajectory --eval configs/eval/toyworld-badnet.yaml --start toyworld/models/clip-badnet \
        --run PAR=out/results-3k/runs/clip-badnet/real-160k/PAR/seed0/<fingerprints> --run FT=... \
        --out docs/results-3k-badnet

writes OUT.json (one row per checkpoint) and OUT.png (accuracy and ASR against the step), and prints a Markdown
table. Step 0 is the starting model. A run keeps only its last `keep_checkpoints` checkpoints: set
`checkpoint_every` and `keep_checkpoints` before the run to see its whole course.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from parclean.command import run_command
from parclean.config import load_config


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    from cleaning.train import CHECKPOINTS, complete_checkpoints

    found = complete_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"{run / CHECKPOINTS}: no complete checkpoints")
    return found


def measure_runs(eval_config: str, start: str, runs: dict[str, Path]) -> list[dict[str, Any]]:
    from cleaning.report import EvalConfig, load_images, measure
    from parclean.models import load_model

    cfg = load_config(EvalConfig, eval_config)
    first = load_model(weights=start)
    images = load_images(cfg, first.image_size)
    before = measure(first, cfg, images)
    rows = []
    for name, run in runs.items():
        rows.append({"run": name, "step": 0, "clean_acc": before["clean_acc"], "asr": before["asr"]})
        for step, path in checkpoints(run):
            result = measure(load_model(first.architecture, weights=path), cfg, images)
            rows.append({"run": name, "step": step, "clean_acc": result["clean_acc"], "asr": result["asr"]})
            print(f"{name} step {step}: clean {result['clean_acc']:.1f}, ASR {result['asr']}", file=sys.stderr)
    return rows


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (acc_axis, asr_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in dict.fromkeys(r["run"] for r in rows):
        line = [r for r in rows if r["run"] == name]
        steps = [r["step"] for r in line]
        acc_axis.plot(steps, [r["clean_acc"] for r in line], "o-", label=name)
        asr_axis.plot(steps, [max(r["asr"].values()) for r in line], "o-", label=name)
    acc_axis.set_ylabel("clean zero-shot accuracy (%)")
    asr_axis.set_ylabel("attack success rate (%)")
    for axis in (acc_axis, asr_axis):
        axis.set_xlabel("cleaning step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | step | clean acc | ASR |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['step']} | {r['clean_acc']:.1f} | "
              f"{', '.join(f'{v:.1f}' for v in r['asr'].values())} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trajectory", description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="evaluation config YAML (configs/eval/)")
    parser.add_argument("--start", required=True, help="the model the runs started from (step 0)")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a cleaning run's --out")
    parser.add_argument("--out", required=True, type=Path, help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    return run_command("python -m bench.trajectory", lambda: measure_and_write(args))


def measure_and_write(args: argparse.Namespace) -> int:
    """Measure every run named by --run; write OUT.json and OUT.png; print the Markdown table."""
    runs = {}
    for text in args.run:
        name, sep, folder = text.partition("=")
        if not sep:
            raise ValueError(f"--run {text!r}: expected NAME=DIR")
        runs[name] = Path(folder)
    rows = measure_runs(args.eval, args.start, runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
