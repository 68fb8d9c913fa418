"""The options of `parclean clean` (cleaning.train.run runs it): fine-tune a CLIP model with PAR, FT or CleanCLIP.

    parclean clean --config configs/clean/toy-cpu.yaml --model toyworld/models/clip-badnet \\
        --shards out/toy-pairs --out out/clean-toy [--set tau=1.0 --set steps=600]

Multi-GPU: `accelerate launch --num_processes N -m cleaning.train` with the same arguments.
"""

from __future__ import annotations

import argparse

from parclean.command import add_config_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, config_help="YAML recipe, e.g. configs/clean/toy-cpu.yaml",
                       set_help="override a setting, e.g. --set tau=1.0 (repeatable; dotted keys: "
                                "data.num_workers=4)",
                       out_help="output folder; a rerun resumes from its latest checkpoint")
    parser.add_argument("--model", required=True,
                        help="poisoned model: a .safetensors file or folder, or an open_clip architecture with "
                             "--pretrained")
    parser.add_argument("--pretrained", help="open_clip pretrained tag (then --model is an architecture name)")
    parser.add_argument("--architecture", help="architecture of a checkpoint that does not name its own (a "
                        "training checkpoint, a plain state dict), e.g. ViT-B-32")
    parser.add_argument("--shards", help="shard set folder or URL (overrides data.shards)")
    parser.add_argument("--stop-after", type=int, help="stop (checkpointed) after this many steps; rerun to go on")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds another kind of output")
