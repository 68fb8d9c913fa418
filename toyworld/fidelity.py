"""Fidelity of a toy text-to-image pipeline: the share of generated images in which a judge CLIP (zero-shot,
"a photo of a {shape}.") names the shape the caption asked for.

    python -m toyworld.fidelity --pipeline toyworld/models/toy-sd \
        --judge toyworld/models/clip-clean/model.safetensors --count 500 --grid docs/toy-sd-grid.png

Captions are held out: `expand(load_bank("toyworld"), count, seed)`, while training captions are drawn fresh
by the renderer each step. The judge's accuracy on real toy images is reported beside it: a generator whose
images the judge reads as well as real ones scores about that, not 100%.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from generation.config import GenerateConfig
from generation.pipeline import load_pipeline
from parclean.attacks import to_float_images, to_uint8_images
from parclean.command import run_command
from parclean.evaluate import (
    DEFAULT_TEMPLATES,
    LabelledImages,
    clean_accuracy,
    image_features,
    predict,
    zero_shot_classifier,
)
from parclean.models import LoadedModel, load_model
from prompts.bank import load_bank
from prompts.expand import Caption, expand
from toyworld.render import classes, eval_set, make_pairs

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 424_243  # captions by expand(); the trainer never draws captions from expand()
PROBE_SEED = 2_000_003  # labelled real images for the linear probe: neither the eval set's seed nor a trainer's


def held_out_captions(count: int, seed: int = HELD_OUT_SEED) -> list[Caption]:
    """`count` toy captions, balanced over shapes (every prefix too)."""
    return expand(load_bank("toyworld"), count, seed)


@torch.no_grad()
def generate(pipe: DiffusionPipeline, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             batch_size: int, progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; image i's starting noise comes from seed (seed, i), whatever the batching."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(batch))]
        images = pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out)


def caption_labels(captions: Sequence[Caption]) -> torch.Tensor:
    names = classes()
    unknown = sorted({c.concept for c in captions} - set(names))
    if unknown:
        raise ValueError(f"captions name shapes the toy world does not know: {unknown}")
    return torch.tensor([names.index(c.concept) for c in captions])


def judge_fidelity(judge: LoadedModel, images: torch.Tensor, labels: torch.Tensor,
                   classifier: torch.Tensor | None = None) -> dict:
    """Share (percent) of images the judge assigns the captioned shape, overall and per shape."""
    names = classes()
    if classifier is None:
        classifier = zero_shot_classifier(judge, names, DEFAULT_TEMPLATES)
    hits = (predict(judge, images, classifier) == labels).float()
    per_class = {name: round(100 * hits[labels == i].mean().item(), 1) for i, name in enumerate(names)
                 if (labels == i).any()}
    return {"fidelity": 100 * hits.mean().item(), "count": len(labels), "per_class": per_class}


def measure_fidelity(pipe: DiffusionPipeline, judge: LoadedModel, *, count: int, seed: int = HELD_OUT_SEED,
                     steps: int = 25, guidance: float = 3.0, batch_size: int = 100,
                     classifier: torch.Tensor | None = None, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Generate from `count` held-out captions and judge them; returns (result, images)."""
    captions = held_out_captions(count, seed)
    images = generate(pipe, [c.text for c in captions], seed=seed, steps=steps, guidance=guidance,
                      batch_size=batch_size, progress=progress)
    result = judge_fidelity(judge, images, caption_labels(captions), classifier)
    return {**result, "seed": seed, "steps": steps, "guidance": guidance}, images


def real_accuracy(judge: LoadedModel, classifier: torch.Tensor, count: int = 2000, resolution: int = 32) -> float:
    """The judge's accuracy (percent) on real toy images with `classifier`: the reference for fidelity."""
    images, labels = eval_set(count, resolution)
    data = LabelledImages(to_float_images(images), torch.from_numpy(labels), classes())
    return 100 * clean_accuracy(judge, data, classifier)


@torch.enable_grad()
def linear_probe(judge: LoadedModel, count: int, *, seed: int = PROBE_SEED, iterations: int = 500) -> torch.Tensor:
    """(num_classes, dim) weights of a linear classifier on the judge's unit image features, fitted on `count`
    labelled real toy images (full-batch Adam on cross-entropy); a drop-in for the zero-shot text classifier.

    Zero-shot prompts read only 79% of real toy images right, which caps what fidelity can show; a probe on
    the same frozen features measures the image, not the prompt.
    """
    images, _, labels = make_pairs(count, seed)
    features = image_features(judge, to_float_images(images))
    targets = torch.from_numpy(labels)
    weights = torch.zeros(len(classes()), features.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.1)
    for _ in range(iterations):
        optimizer.zero_grad()
        F.cross_entropy(features @ weights.T, targets).backward()
        optimizer.step()
    return weights.detach()


def fidelity(pipeline_path: str | Path, judge_weights: str | Path, *, count: int = 500, seed: int = HELD_OUT_SEED,
             steps: int = 25, guidance: float = 3.0, batch_size: int = 100, grid: str | Path | None = None,
             grid_count: int = 40, probe: int = 0) -> dict:
    """Fidelity of the pipeline folder, the judge's accuracy on real images, and chance (all percent).

    probe=0: the judge classifies zero-shot ("a photo of a {shape}."); probe=N: by a linear probe fitted on N
    labelled real toy images (linear_probe).
    """
    if not (Path(pipeline_path) / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline_path}: not a diffusers pipeline folder (no model_index.json)")
    judge = load_model(weights=judge_weights)
    judge.model.eval()
    classifier = (linear_probe(judge, probe) if probe else
                  zero_shot_classifier(judge, classes(), DEFAULT_TEMPLATES))
    # The generation stage's own loader: the toy pipeline is measured as it will be used.
    pipe = load_pipeline(GenerateConfig(model=str(pipeline_path), bank="toyworld", dtype="fp32"))
    started = time.time()
    result, images = measure_fidelity(pipe, judge, count=count, seed=seed, steps=steps, guidance=guidance,
                                      batch_size=batch_size, classifier=classifier, progress=True)
    result["generate_seconds"] = round(time.time() - started, 1)
    result["judge_real_accuracy"] = real_accuracy(judge, classifier)
    result["judge_head"] = f"linear probe on {probe} real images" if probe else "zero-shot"
    result["chance"] = 100 / len(classes())
    result["judge"] = str(judge_weights)
    if grid is not None:
        captions = held_out_captions(min(grid_count, count), seed)
        save_grid(images[:len(captions)], [c.text for c in captions], grid)
    return result


def save_grid(images: torch.Tensor, captions: Sequence[str], path: str | Path, *, columns: int = 8,
              scale: int = 4) -> Path:
    """A PNG grid: each image upscaled `scale` times (nearest), its caption wrapped underneath."""
    if len(images) != len(captions):
        raise ValueError(f"save_grid: {len(images)} images but {len(captions)} captions")
    pixels = to_uint8_images(images)
    side = pixels.shape[1] * scale
    font = ImageFont.load_default()
    lines = [textwrap.wrap(text, width=max(8, side // 6))[:5] for text in captions]
    text_height = 11 * max(len(wrapped) for wrapped in lines) + 4
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (side + 4), rows * (side + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, wrapped) in enumerate(zip(pixels, lines, strict=True)):
        x, y = (i % columns) * (side + 4), (i // columns) * (side + text_height)
        sheet.paste(Image.fromarray(tile).resize((side, side), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + side + 2), "\n".join(wrapped), fill="black", font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def plot_curve(log_path: str | Path, png_path: str | Path, final: float | None = None) -> Path:
    """Fidelity (100 held-out captions, every 500 UNet steps, from the trainer's log.jsonl) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    points = [(row["step"], row["fidelity"]) for row in rows if "fidelity" in row]
    if not points:
        raise ValueError(f"{log_path}: no fidelity lines (the trainer writes one every eval.every UNet steps)")
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    steps, values = [step for step, _ in points], [value for _, value in points]
    axis.plot(steps, values, "o-", label="in training: 100 held-out captions")
    if final is not None:
        axis.plot([points[-1][0]], [final], "s", color="C3", label=f"final: 500 held-out captions ({final:.1f}%)")
    axis.axhline(70, color="gray", ls="--", lw=1, label="target 70%")
    axis.axhline(10, color="gray", ls=":", lw=1, label="chance 10%")
    axis.set_xlabel("UNet step (batch 64)")
    axis.set_ylabel("fidelity (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return png_path


def update_card(pipeline_path: str | Path, result: dict, command: str) -> Path:
    """Merge the fidelity result into the pipeline folder's card.json (written by the trainer): under "fidelity"
    when judged zero-shot, "fidelity_probe" when judged by a linear probe."""
    card_path = Path(pipeline_path) / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    key = "fidelity" if result.get("judge_head", "zero-shot") == "zero-shot" else "fidelity_probe"
    card[key] = {**result, "command": command}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, type=Path, help="diffusers pipeline folder")
    parser.add_argument("--judge", required=True, type=Path, help="judge CLIP (parclean safetensors)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the first 40 samples here")
    parser.add_argument("--probe", type=int, default=0, metavar="N",
                        help="classify with a linear probe fitted on N labelled real toy images (0: zero-shot)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--curve", type=Path, default=None,
                        help="also plot the training log's fidelity curve and this result to this PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python -m toyworld.fidelity", *(sys.argv[1:] if argv is None else argv)])
    return run_command("python -m toyworld.fidelity", lambda: measure_and_record(args, command))


def measure_and_record(args: argparse.Namespace, command: str) -> int:
    """Measure the pipeline's fidelity; record it in its card (and plot the curve when asked); print it."""
    result = fidelity(args.pipeline, args.judge, count=args.count, seed=args.seed, steps=args.steps,
                      guidance=args.guidance, batch_size=args.batch_size, grid=args.grid, probe=args.probe)
    update_card(args.pipeline, result, command)
    if args.curve is not None:
        plot_curve(args.pipeline / "log.jsonl", args.curve, final=result["fidelity"])
    print(json.dumps({k: result[k] for k in ("fidelity", "judge_real_accuracy", "chance", "count")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
