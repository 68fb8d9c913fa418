"""Batched text-to-image generation with one seeded generator per image."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image

from generation.config import GenerateConfig
from generation.pipeline import FLAG_ONLY_CHECKER

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class GeneratedImages(NamedTuple):
    images: list[Image.Image]
    nsfw: list[bool]  # True where the pipeline's safety checker fired (the image is kept as generated)


def image_seed(run_seed: int, caption_index: int) -> int:
    """The seed of caption `caption_index`'s image: a stable hash of (run seed, index), 63 bits."""
    state = np.random.SeedSequence([run_seed, caption_index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def generate_batch(
    pipe: DiffusionPipeline, captions: list[str], seeds: list[int], cfg: GenerateConfig
) -> GeneratedImages:
    """Images for up to `cfg.batch_size` captions, image i from `seeds[i]`; no more images than captions.

    An image can still differ with the batch size (batched kernels sum in another order), so the same seed
    gives the same image only under the same config (the batches of a run are a function of its config).
    """
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    if not 1 <= len(captions) <= cfg.batch_size:
        raise ValueError(f"batch of {len(captions)} captions; expected 1..batch_size={cfg.batch_size}")
    prompts = list(captions)
    # CPU generators on purpose: diffusers draws the starting noise on the generator's device and moves
    # it, so a seed gives the same noise on any machine, and one generator per image makes image i
    # independent of its neighbours in the batch.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    kwargs = {}
    if cfg.negative_prompt is not None:
        kwargs["negative_prompt"] = [cfg.negative_prompt] * len(prompts)
    output = pipe(
        prompt=prompts,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        height=cfg.height,
        width=cfg.width,
        generator=generators,
        output_type="pil",
        **kwargs,
    )
    images = list(output.images)
    return GeneratedImages(images, nsfw_flags(pipe, images))


def nsfw_flags(pipe: DiffusionPipeline, images: list[Image.Image]) -> list[bool]:
    """Run the pipeline's safety checker (when kept) on a copy of the images; the images stay untouched."""
    checker = getattr(pipe, FLAG_ONLY_CHECKER, None)
    if checker is None:
        return [False] * len(images)
    param = next(checker.parameters())
    clip_input = pipe.feature_extractor(images, return_tensors="pt").pixel_values.to(param.device, param.dtype)
    copies = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])  # it blackens these
    # Its warning says "a black image will be returned", which is not true here: quiet it for this call.
    checker_log = logging.getLogger(type(checker).__module__)
    level = checker_log.level
    checker_log.setLevel(logging.ERROR)
    try:
        _, flags = checker(images=copies, clip_input=clip_input)
    finally:
        checker_log.setLevel(level)
    return [bool(flag) for flag in flags]


def resize_for_storage(image: Image.Image, size: int | None) -> Image.Image:
    """Resize so the shorter side is `size` (aspect kept); None keeps the image as generated."""
    if size is None or min(image.size) == size:
        return image
    scale = size / min(image.size)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(target, Image.Resampling.LANCZOS)
