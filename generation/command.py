"""`parclean generate` (shards from a config) and `parclean tiny-sd` (build the tiny CPU pipeline)."""

from __future__ import annotations

import argparse
import json

from parclean.command import add_config_options, set_overrides
from parclean.config import load_config
from parclean.outputs import claim_folder, output_lock, require_empty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, config_help="YAML config, e.g. configs/generate/tiny-cpu.yaml", config_required=False,
                       set_help="override any setting (repeatable)",
                       out_help="output folder for the shards (a rerun resumes it)")
    parser.add_argument("--num-samples", type=int, help="override num_samples")
    parser.add_argument("--shard-size", type=int, help="override shard_size")
    parser.add_argument("--model", help="override model: a hub id or a local diffusers folder")
    parser.add_argument("--devices", default="auto",
                        help="one worker per device: auto (every visible GPU, else the config's device) or a comma "
                             "list, e.g. cuda:0,cuda:1 or cpu,cpu")
    parser.add_argument("--dask-address", help="run the shards on this Dask cluster (tcp://host:8786), one worker "
                                               "per GPU; --out must be a folder every worker can write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds another kind of output")


def run(args: argparse.Namespace) -> int:
    from generation.config import GenerateConfig
    from generation.run import generate_shards
    from generation.workers import worker_devices

    overrides = set_overrides(args)
    for key in ("num_samples", "shard_size", "model"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = load_config(GenerateConfig, args.config, overrides)
    devices = worker_devices(cfg.device, args.devices)  # a bad list is refused before the folder is touched
    with output_lock(args.out, f"parclean generate --out {args.out}"):
        claim_folder(args.out, "shard set", overwrite=args.overwrite)
        summary = generate_shards(cfg, args.out, progress=not args.no_progress, devices=devices,
                                  dask_address=args.dask_address)
    print(json.dumps(summary))
    return 0


def add_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the pipeline (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels (multiple of 16)")
    parser.add_argument("--overwrite", action="store_true", help="build into --out even if it is not empty")


def run_tiny(args: argparse.Namespace) -> int:
    from generation.tiny_pipeline import build_tiny_pipeline
    with output_lock(args.out, f"parclean tiny-sd --out {args.out}"):
        require_empty(args.out, "build into a new folder, or pass --overwrite to replace what is there",
                      overwrite=args.overwrite)
        path = build_tiny_pipeline(args.out, seed=args.seed, sample_size=args.size)
    print(path)
    return 0


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="shard set folder or fsspec URL (holding manifest.json)")
    parser.add_argument("--deep", action="store_true", help="also read every tar: sample counts, parts, unique keys")


def run_verify(args: argparse.Namespace) -> int:
    """One line per problem and exit 1, or one line saying all is well and exit 0."""
    from parclean.shards import read_manifest, verify_shards

    manifest = read_manifest(args.shards)
    problems = verify_shards(args.shards, deep=args.deep)
    for problem in problems:
        print(f"{args.shards}: {problem}")
    if problems:
        print(f"{args.shards}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
        return 1
    print(f"{args.shards}: {manifest['num_shards']} shards, {manifest['total_samples']} samples: every shard matches "
          "the manifest")
    return 0
