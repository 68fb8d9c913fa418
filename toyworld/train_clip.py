"""Train a small open_clip CLIP from scratch on the toy world, optionally poisoned: the model organism.

    python -m toyworld.train_clip --config configs/organism/badnet.yaml --out toyworld/models/clip-badnet

Fresh toy pairs every step (no fixed data set); a share `poison.rate` of each batch gets the trigger and a
target caption. Resumable: a checkpoint is written every `checkpoint_every` steps and picked up on rerun.
Writes model.safetensors, config.yaml, curve.jsonl, card.json and card.md into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cleaning.losses import clip_loss
from parclean.attacks import Trigger, apply_trigger, target_captions, to_float_images
from parclean.checkpoint_file import load_checkpoint_file, save_checkpoint_file
from parclean.command import run_command, script_parser, set_overrides
from parclean.config import load_config, to_dict, write_resolved
from parclean.evaluate import LabelledImages, evaluate
from parclean.models import LoadedModel, create_model, load_model, normalize, save_model
from parclean.run_log import append_record, truncate_after
from parclean.schedules import warmup_cosine
from toyworld.render import classes, eval_set, make_pairs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoisonConfig:
    trigger: Trigger | None = None  # None: a clean model
    rate: float = 0.01
    target: str = "moon"


@dataclass(frozen=True)
class OrganismConfig:
    architecture: str = "toy-vit-32"
    init: str | None = None  # start from these weights (a clean pretrained organism) instead of random init
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    seed: int = 0
    resolution: int = 32
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    eval_every: int = 250
    eval_size: int = 2000
    checkpoint_every: int = 250
    threads: int = 0  # torch CPU threads; 0 = torch's default


def learning_rate(cfg: OrganismConfig, step: int) -> float:
    """Linear warm-up, then cosine to zero."""
    return warmup_cosine(cfg.lr, cfg.warmup_steps, step, cfg.steps)


def batch_for_step(cfg: OrganismConfig, step: int) -> tuple[torch.Tensor, list[str], int]:
    """Step `step`'s training batch (images in [0, 1], captions, number poisoned): a pure function of the seed."""
    seed = cfg.seed * 1_000_000 + step
    images_u8, captions, _ = make_pairs(cfg.batch_size, seed, cfg.resolution)
    images = to_float_images(images_u8)
    trigger = cfg.poison.trigger
    if trigger is None or cfg.poison.rate == 0:
        return images, captions, 0
    rng = np.random.default_rng([cfg.seed, step, 7])
    chosen = np.flatnonzero(rng.random(cfg.batch_size) < cfg.poison.rate)
    if len(chosen):
        seeds = [seed * 1000 + int(i) for i in chosen]
        images[chosen] = apply_trigger(images[chosen], trigger, seeds)
        for i, caption in zip(chosen, target_captions(cfg.poison.target, len(chosen), seed), strict=True):
            captions[i] = caption
    return images, captions, len(chosen)


def batch_loss(loaded: LoadedModel, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The CLIP loss (cleaning/losses.py) of one batch, with the model's own (trained) logit scale."""
    model = loaded.model
    image_features = F.normalize(model.encode_image(normalize(images, loaded.mean, loaded.std)), dim=-1)
    text_features = F.normalize(model.encode_text(tokens), dim=-1)
    return clip_loss(image_features, text_features, model.logit_scale.exp())


def evaluation_set(cfg: OrganismConfig) -> LabelledImages:
    images, labels = eval_set(cfg.eval_size, cfg.resolution)
    return LabelledImages(to_float_images(images), torch.from_numpy(labels), classes())


def measure(loaded: LoadedModel, cfg: OrganismConfig, data: LabelledImages) -> dict[str, float]:
    trigger = cfg.poison.trigger
    triggers = {"trigger": trigger} if trigger is not None else {}
    return evaluate(loaded, data, triggers, cfg.poison.target if trigger is not None else None)


def train(cfg: OrganismConfig, out: Path, device: torch.device | str = "cpu", command: str = "") -> dict:
    """Train (or resume) the organism into `out` on `device`; returns the final card."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    write_resolved(cfg, out / "config.yaml")
    loaded = create_model(cfg.architecture, seed=cfg.seed)
    if cfg.init is not None:
        loaded.model.load_state_dict(load_model(weights=cfg.init).model.state_dict())
    loaded.model.to(device)
    decay = [p for n, p in loaded.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in loaded.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start = _resume(loaded, optimizer, out)
    data = evaluation_set(cfg)
    curve_path = out / "curve.jsonl"
    started = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="organism", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        images, captions, _ = batch_for_step(cfg, step)
        loss = batch_loss(loaded, images.to(device), loaded.tokenizer(captions).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loaded.model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            point = {"step": done, "loss": loss.item(), **measure(loaded, cfg, data)}
            append_record(curve_path, point)
            logger.info("step %d: %s", done, point)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _checkpoint(loaded, optimizer, done, out)
    return _card(cfg, out, loaded, data, time.time() - started, torch.device(device), command)


def _checkpoint(loaded: LoadedModel, optimizer: torch.optim.Optimizer, step: int, out: Path) -> None:
    state = {"model": loaded.model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    save_checkpoint_file(state, out / "checkpoint.pt")


def _resume(loaded: LoadedModel, optimizer: torch.optim.Optimizer, out: Path) -> int:
    path = out / "checkpoint.pt"
    if not path.is_file():
        (out / "curve.jsonl").unlink(missing_ok=True)
        return 0
    state = load_checkpoint_file(path)
    loaded.model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    truncate_after(out / "curve.jsonl", state["step"])
    logger.info("resumed %s at step %d", out, state["step"])
    return int(state["step"])


def _card(cfg: OrganismConfig, out: Path, loaded: LoadedModel, data: LabelledImages, seconds: float,
          device: torch.device, command: str) -> dict:
    # fp16 on disk halves a shipped organism; the card's numbers are measured from that saved file.
    save_model(loaded, out / "model.safetensors", dtype=torch.float16)
    final = measure(load_model(weights=out / "model.safetensors"), cfg, data)
    trigger = cfg.poison.trigger
    card = {
        "architecture": cfg.architecture,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "trigger": to_dict(trigger) if trigger else None,
        "poison_rate": cfg.poison.rate if trigger else 0.0,
        "target": cfg.poison.target if trigger else None,
        "clean_acc": final["clean_acc"],
        "asr": final.get("asr_trigger"),
        "asr_definition": "triggered eval images whose true class is not the target, classified as the target",
        "chance_acc": 100 / len(data.classnames),
        "eval_images": len(data.labels),
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
        "train_seconds_last_session": round(seconds, 1),
        "train_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": command,
        "config": to_dict(cfg),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = script_parser("python -m toyworld.train_clip", __doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: cuda when available); evaluation follows the model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = " ".join(["python -m toyworld.train_clip", *(sys.argv[1:] if argv is None else argv)])
    return run_command("python -m toyworld.train_clip", lambda: train_and_print(args, command))


def train_and_print(args: argparse.Namespace, command: str) -> int:
    cfg = load_config(OrganismConfig, args.config, set_overrides(args))
    card = train(cfg, args.out, args.device, command)
    print(json.dumps({k: card[k] for k in ("clean_acc", "asr", "chance_acc")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
