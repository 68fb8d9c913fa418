"""`parclean evaluate` and `parclean poison`: measure a model, or poison a shard set to make a test subject."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from parclean.command import add_config_options, set_overrides
from parclean.config import load_config


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --pretrained, --architecture, --eval, --set: the model to measure and its evaluation."""
    parser.add_argument("--model", required=True, help="checkpoint (.safetensors, or a folder holding "
                        "model.safetensors), or an open_clip architecture name with --pretrained")
    parser.add_argument("--pretrained", help="open_clip pretrained tag (needs the hub)")
    parser.add_argument("--architecture", help="architecture of a checkpoint that does not name its own (a "
                        "training checkpoint, a plain state dict), e.g. ViT-B-32")
    add_config_options(parser, config_flag="--eval", config_required=False,
                       config_help="evaluation config YAML (configs/eval/)", set_help="override an eval setting")


def model_and_eval(args: argparse.Namespace):
    """(the loaded model, the EvalConfig) named by add_model_arguments' options; a config that names no eval data
    gets the toy world for a toy model, and is refused for a real CLIP architecture."""
    from cleaning.report import EvalConfig
    from parclean.eval_sets import default_eval_set
    from parclean.models import load_model

    overrides = set_overrides(args)
    if getattr(args, "device", None):
        overrides["device"] = args.device
    cfg = load_config(EvalConfig, args.config, overrides)
    if args.pretrained:
        loaded = load_model(args.model, pretrained=args.pretrained)
    else:
        loaded = load_model(args.architecture, weights=args.model)
    return loaded, replace(cfg, data=cfg.data or default_eval_set(loaded.architecture))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--device", help="auto (the GPU when there is one; the default), cpu, cuda or cuda:N "
                        "(the eval config's device)")
    parser.add_argument("--out", type=Path, help="also write the result JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an evaluate result")


def run(args: argparse.Namespace) -> int:
    from cleaning.report import measure

    if args.out:
        check_result_file(args.out, args.overwrite)
    loaded, cfg = model_and_eval(args)
    result = measure(loaded, cfg)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def check_result_file(path: Path, overwrite: bool) -> None:
    """Refuse to replace a file that is not an earlier evaluate result (a model, a config), unless overwrite."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; --out names the result's JSON file")
    if overwrite or not path.exists():
        return
    try:
        earlier = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        earlier = None
    if not (isinstance(earlier, dict) and "clean_acc" in earlier and "asr" in earlier):
        raise ValueError(f"{path}: exists and is not an evaluate result; use another --out, or pass --overwrite to "
                         "replace it")


def add_poison_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="clean shard set (folder or fsspec URL)")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the poisoned shard set")
    parser.add_argument("--trigger", required=True, help="trigger kind: badnet, badnet_stripes, blended, "
                        "blended_stripes, triangles, text, wanet, image_patch, image_blend")
    parser.add_argument("--patch-size", type=int, help="patch triggers: side in pixels (default 16 px per 224 px)")
    parser.add_argument("--alpha", type=float, help="blend triggers: weight of the trigger")
    parser.add_argument("--trigger-image", help="image_patch / image_blend: your trigger image")
    parser.add_argument("--rate", type=float, default=0.01, help="share of pairs to poison (default 0.01)")
    parser.add_argument("--target", default="banana", help="target concept named by poisoned captions")
    parser.add_argument("--seed", type=int, default=0)


def run_poison(args: argparse.Namespace) -> int:
    from cleaning.poison import poison_shards
    from parclean.attacks import Trigger

    trigger = Trigger(kind=args.trigger, patch_size=args.patch_size, alpha=args.alpha, image=args.trigger_image)
    summary = poison_shards(args.shards, args.out, trigger, rate=args.rate, target=args.target, seed=args.seed)
    print(json.dumps(summary))
    return 0
