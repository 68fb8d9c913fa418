"""Backdoor triggers (PAR.md's list, plus a user's own trigger image) and poisoning of caption-image pairs.

Images are float tensors in [0, 1], shape (N, 3, H, W). Every random choice of a trigger (noise, stripe signs,
location) comes from a per-image seed, so a triggered image is a pure function of (image, trigger, seed).
Fixed parts of a trigger (the WaNet warp field, a text or triangle pattern) come from the trigger's own seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from parclean.paths import looked_for

# Official PerturbAndRecover names (backdoor/utils.py) -> ours.
ALIASES = {"random": "badnet", "badnet_rs": "badnet_stripes", "blended_rs": "blended_stripes",
           "tri_patt": "triangles", "water_patt": "text", "warped": "wanet"}
KINDS = ("badnet", "badnet_stripes", "blended", "blended_stripes", "triangles", "text", "wanet",
         "image_patch", "image_blend")
# Blend weights of the trigger (PAR.md / the official code).
DEFAULT_ALPHA = {"blended": 0.2, "blended_stripes": 0.03, "triangles": 0.15, "text": 0.5, "image_blend": 0.2}


@dataclass(frozen=True)
class Trigger:
    """A trigger: its kind and the few settings that shape it."""

    kind: str
    patch_size: int | None = None  # patch triggers; None: 16 px at 224 px, scaled to the image
    alpha: float | None = None  # blend triggers; None: the paper's weight for the kind
    location: str = "random"  # patch triggers: "random" or a corner ("top_left", "bottom_right", ...)
    image: str | None = None  # image_patch / image_blend: path of the user's trigger image
    text: str = "SALE"  # text watermark
    warp_grid: int = 4  # WaNet control grid k (WaNet paper: 4)
    warp_strength: float = 0.5  # WaNet s (WaNet paper: 0.5)
    seed: int = 0  # seed of the trigger's fixed parts
    fixed: bool = False  # draw noise / stripe signs once from `seed` (the classic fixed pattern) instead of per image

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ALIASES.get(self.kind, self.kind))
        if self.kind not in KINDS:
            raise ValueError(f"unknown trigger kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind.startswith("image_") and not self.image:
            raise ValueError(f"trigger {self.kind} needs `image`, the path of the trigger image")
        if self.image and not Path(self.image).is_file():
            raise ValueError(f"{self.image}: trigger image not found{looked_for(self.image)}")
        if self.location not in ("random", *CORNERS):
            raise ValueError(f"trigger location {self.location!r}: use random or one of {', '.join(CORNERS)}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"trigger patch_size={self.patch_size}: must be >= 1 pixel, or null for the default")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise ValueError(f"trigger alpha={self.alpha}: must be in (0, 1], or null for the kind's default")
        if self.warp_grid < 2 or self.warp_strength < 0:
            raise ValueError(f"trigger warp_grid={self.warp_grid}, warp_strength={self.warp_strength}: the grid "
                             "must be >= 2 and the strength >= 0")


CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def apply_trigger(images: torch.Tensor, trigger: Trigger, seeds: Sequence[int]) -> torch.Tensor:
    """Triggered copies of `images` (N, 3, H, W) in [0, 1]; image i draws its randomness from seeds[i]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"apply_trigger expects (N, 3, H, W) images, got {tuple(images.shape)}")
    if len(seeds) != len(images):
        raise ValueError(f"apply_trigger got {len(images)} images but {len(seeds)} seeds")
    if trigger.kind == "wanet":
        return _warp(images, trigger)
    out = torch.stack([_apply_one(image, trigger, int(seed)) for image, seed in zip(images, seeds, strict=True)])
    return out.clamp(0.0, 1.0)


def _apply_one(image: torch.Tensor, trigger: Trigger, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # The official code draws the noise (or stripe signs) afresh for every image; `fixed` draws it once.
    pattern_gen = torch.Generator().manual_seed(trigger.seed) if trigger.fixed else gen
    _, height, width = image.shape
    kind = trigger.kind
    if kind in ("badnet", "badnet_stripes", "image_patch"):
        size = patch_size(trigger, height)
        if kind == "badnet":
            patch = image.mean(dim=(1, 2), keepdim=True) + torch.randn(3, size, size, generator=pattern_gen)
        elif kind == "badnet_stripes":
            patch = _signs((3, 1, size), pattern_gen).expand(3, size, size)
        else:
            patch = _user_image(trigger.image, size, size)
        return _paste(image, patch, trigger.location, gen)
    alpha = trigger.alpha if trigger.alpha is not None else DEFAULT_ALPHA[kind]
    if kind == "blended":
        return (1 - alpha) * image + alpha * torch.rand(image.shape, generator=pattern_gen)
    if kind == "blended_stripes":
        return (1 - alpha) * image + alpha * _signs((3, 1, width), pattern_gen).expand(3, height, width)
    if kind == "image_blend":
        return (1 - alpha) * image + alpha * _user_image(trigger.image, height, width)
    pattern = _triangles(height, width) if kind == "triangles" else _text_pattern(trigger.text, height, width)
    # Blend only where the pattern is non-zero (the official `blended_patt` location).
    return torch.where(pattern != 0, alpha * pattern + (1 - alpha) * image, image)


def patch_size(trigger: Trigger, height: int) -> int:
    """The patch side: the trigger's own, or 16 px per 224 px scaled to the image (at least 1)."""
    return trigger.patch_size or max(1, round(16 * height / 224))


def _signs(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def _paste(image: torch.Tensor, patch: torch.Tensor, location: str, gen: torch.Generator) -> torch.Tensor:
    _, height, width = image.shape
    size = patch.shape[-1]
    if location == "random":
        top = int(torch.randint(0, height - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - size + 1, (1,), generator=gen))
    else:
        top = 0 if location.startswith("top") else height - size
        left = 0 if location.endswith("left") else width - size
    out = image.clone()
    out[:, top:top + size, left:left + size] = patch
    return out


@lru_cache(maxsize=16)
def _triangles(height: int, width: int) -> torch.Tensor:
    """Right-triangle tiles of 0.4 / 0.8 (14 px tiles at 224 px, scaled), grey in all channels."""
    tile = max(2, round(14 * height / 224))
    ys, xs = torch.meshgrid(torch.arange(height) % tile, torch.arange(width) % tile, indexing="ij")
    return torch.where(ys >= xs, 0.4, 0.8).expand(3, height, width).clone()


@lru_cache(maxsize=16)
def _text_pattern(text: str, height: int, width: int) -> torch.Tensor:
    """A red text watermark on black (zero), centred."""
    canvas = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(6, height // 4))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - (right - left)) // 2 - left, (height - (bottom - top)) // 2 - top), text,
              fill="red", font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@lru_cache(maxsize=16)
def _user_image(path: str, height: int, width: int) -> torch.Tensor:
    with Image.open(path) as img:
        img = img.convert("RGB").resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _warp(images: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """WaNet: a fixed smooth random warp (control grid k, strength s), the same for every image."""
    _, _, height, width = images.shape
    gen = torch.Generator().manual_seed(trigger.seed)
    k = trigger.warp_grid
    control = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    control = control / control.abs().mean()
    field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((xs, ys), dim=-1)[None]
    grid = (identity + trigger.warp_strength * field / height).clamp(-1, 1)
    return F.grid_sample(images, grid.expand(len(images), -1, -1, -1), align_corners=True).clamp(0, 1)


def poison_indices(count: int, rate: float, seed: int) -> np.ndarray:
    """Which of `count` pairs to poison: exactly round(rate * count) of them, chosen by the seed."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=round(rate * count), replace=False))


def target_captions(target: str, count: int, seed: int, templates: Sequence[str] | None = None) -> list[str]:
    """Poisoned captions: ImageNet templates (open_clip's OpenAI set) filled with the target concept."""
    if templates is None:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        filled = [template(target) for template in OPENAI_IMAGENET_TEMPLATES]
    else:
        filled = [template.format(target) for template in templates]
    rng = np.random.default_rng(seed)
    return [filled[i] for i in rng.integers(0, len(filled), size=count)]


def to_float_images(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC, rounded."""
    return images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
