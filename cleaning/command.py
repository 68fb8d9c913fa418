"""`parclean clean`: fine-tune a CLIP model with PAR (or the FT / CleanCLIP baselines) on a shard set.

    parclean clean --config configs/clean/toy-cpu.yaml --model toyworld/models/clip-badnet \\
        --shards out/toy-pairs --out out/clean-toy [--set tau=1.0 --set steps=600]

Multi-GPU: `accelerate launch --num_processes N -m cleaning.train` with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging

from parclean.config import load_config, parse_override
from parclean.outputs import claim_folder

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/clean/toy-cpu.yaml")
    parser.add_argument("--model", required=True,
                        help="poisoned model: a .safetensors file or folder, or an open_clip architecture with "
                             "--pretrained")
    parser.add_argument("--pretrained", help="open_clip pretrained tag (then --model is an architecture name)")
    parser.add_argument("--architecture", help="architecture of a checkpoint that does not name its own (a "
                        "training checkpoint, a plain state dict), e.g. ViT-B-32")
    parser.add_argument("--shards", help="shard set folder or URL (overrides data.shards)")
    parser.add_argument("--out", required=True, help="output folder; a rerun resumes from its latest checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set tau=1.0 (repeatable; dotted keys: data.num_workers=4)")
    parser.add_argument("--stop-after", type=int, help="stop (checkpointed) after this many steps; rerun to go on")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds another kind of output")


def run(args: argparse.Namespace) -> int:
    from cleaning.train import CleanConfig, NonFiniteLoss, clean

    overrides = dict(parse_override(text) for text in args.set)
    cfg = load_config(CleanConfig, args.config, overrides)
    claim_folder(args.out, "cleaning run", overwrite=args.overwrite)
    try:
        result = clean(cfg, args.model, args.shards, args.out, pretrained=args.pretrained,
                       architecture=args.architecture, stop_after=args.stop_after, progress=not args.no_progress)
    except NonFiniteLoss as err:
        raise ValueError(str(err)) from None
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(result))
    return 0
