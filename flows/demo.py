"""`parclean demo`: the whole data-free pipeline, offline on a CPU, on the shipped model organism.

A toy Stable Diffusion generates caption-image pairs from the toy-world bank, the scan looks for a backdoor,
PAR+CleanCLIP cleans the v2 Blended toy CLIP on the pairs, and the before/after table (clean accuracy, ASR, the
scan's verdicts) is printed with the report's path. Sizes live in configs/pipeline/demo.yaml. Without
PREFECT_API_URL, Prefect runs a temporary local server for the run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from parclean.command import add_config_options, set_overrides
from parclean.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "pipeline" / "demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, config_help="pipeline config (default: the demo's)", config_default=str(DEMO_CONFIG),
                       set_help="override a setting, e.g. --set clean.steps=50 (repeatable)",
                       out_help="output folder (default: runs/demo)", out_default="runs/demo")
    parser.add_argument("--overwrite", action="store_true", help="write into --out even if it holds another kind of "
                        "output")


def run(args: argparse.Namespace) -> int:
    from flows.config import PipelineConfig

    overrides = {"out": args.out, **set_overrides(args)}
    cfg = load_config(PipelineConfig, args.config, overrides)  # a bad config fails here, before Prefect starts
    model = Path(cfg.model)
    if not model.exists():
        raise FileNotFoundError(f"{model}: the poisoned CLIP to clean is missing. The organism is built with "
                                "`python -m toyworld.train_clip --config configs/organism/v2/blended.yaml --out "
                                "toyworld/models/v2/clip-blended`; or point the demo at another checkpoint with "
                                "--set model=PATH")
    from flows.serve import run_pipeline

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry attempts
    return run_pipeline(args.config, overrides, f"parclean demo --out {args.out}", args.overwrite)
