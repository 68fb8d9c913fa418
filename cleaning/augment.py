"""Training augmentations on image batches already resized and centre-cropped, floats in [0, 1] (N, 3, H, W).

Every random choice of sample i comes from a generator seeded by (run seed, step, global index of the sample in
the step's batch, stream), so an augmented batch is a pure function of those: a resumed run sees exactly what an
uninterrupted one saw, and N processes each holding a slice of the global batch augment it exactly as one
process holding all of it would. (Noise is drawn on the images' device: CPU and CUDA give different streams.)

- `par_augment`: PAR's augmentation, as the official code builds it (nmndeep/PerturbAndRecover utils.py,
  `load_clip_model`: open_clip's val transform, then `RandomApply([AddGaussianNoise(0, 0.2)], p=0.5)`, the
  normalisation, then `RandomErasing(p=0.5, scale=(0.005, 0.01), ratio=(1, 1), value=0)`).
- `cleanclip_image_view` / `cleanclip_text_view`: the second views of CleanCLIP's in-modal loss. CleanCLIP uses
  torchvision's AutoAugment on images and EDA on captions; here a batched tensor equivalent (see each function).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from parclean.models import normalize

# Official utils.py: AddGaussianNoise(mean=0, std=0.2) applied with p=0.5; the noise is clipped to [0, 1]
# (so non-negative) before it is added, and the sum clipped to [0, 1].
NOISE_P = 0.5
NOISE_STD = 0.2
# Official utils.py: RandomErasing(p=0.5, scale=(0.005, 0.01), ratio=(1, 1), value=0) after normalisation, and
# its size rule `h < img_h - 4 and w < img_w - 4`.
ERASE_P = 0.5
ERASE_SCALE = (0.005, 0.01)
ERASE_MARGIN = 4

# Streams keep the draws of different augmentations independent.
_PAR_STREAM, _NOISE_STREAM, _IMAGE_VIEW_STREAM, _TEXT_VIEW_STREAM = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, step: int, index: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one sample (SplitMix64 over the four numbers)."""
    state = 0
    for value in (seed, step, index, stream):
        state = (state + (value & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def sample_uniforms(count: int, draws: int, *, seed: int, step: int, offset: int, stream: int) -> Tensor:
    """(count, draws) uniforms in [0, 1); row i from sample `offset + i`'s own generator (on the CPU)."""
    generator = torch.Generator()
    rows = []
    for i in range(count):
        generator.manual_seed(sample_seed(seed, step, offset + i, stream))
        rows.append(torch.rand(draws, generator=generator))
    return torch.stack(rows) if rows else torch.empty(0, draws)


def par_augment(images: Tensor, mean: Sequence[float], std: Sequence[float], *, seed: int, step: int,
                offset: int = 0) -> Tensor:
    """PAR's augmentation: p=0.5 non-negative Gaussian noise, normalisation, p=0.5 small square erased to 0.

    `offset` is the index of the first row in the step's global batch (rank * local batch size).
    Returns normalised images, ready for the model.
    """
    count, _, height, width = images.shape
    u = sample_uniforms(count, 5, seed=seed, step=step, offset=offset, stream=_PAR_STREAM)
    noisy = torch.nonzero(u[:, 0] < NOISE_P).flatten().tolist()
    images = images.clone()
    if noisy:
        generator = torch.Generator(device=images.device)
        noise = []
        for i in noisy:
            generator.manual_seed(sample_seed(seed, step, offset + i, _NOISE_STREAM))
            noise.append(torch.randn(images.shape[1:], generator=generator, device=images.device, dtype=images.dtype))
        noise_t = (torch.stack(noise) * NOISE_STD).clamp(0, 1)
        images[noisy] = (images[noisy] + noise_t).clamp(0, 1)
    images = normalize(images, mean, std)
    # Square side from the erased share of the area; top-left corner uniform over the valid positions.
    area = (ERASE_SCALE[0] + u[:, 2] * (ERASE_SCALE[1] - ERASE_SCALE[0])) * height * width
    side = area.sqrt().round().long()
    erase = (u[:, 1] < ERASE_P) & (side >= 1) & (side < height - ERASE_MARGIN) & (side < width - ERASE_MARGIN)
    top = (u[:, 3] * (height - side + 1)).floor().long()
    left = (u[:, 4] * (width - side + 1)).floor().long()
    return _erase_squares(images, erase, top, left, side)


def _erase_squares(images: Tensor, erase: Tensor, top: Tensor, left: Tensor, side: Tensor) -> Tensor:
    """Set the square [top, top + side) x [left, left + side) of each chosen image to 0 (all channels)."""
    if not bool(erase.any()):
        return images
    device = images.device
    rows = torch.arange(images.shape[2], device=device).view(1, -1, 1)
    cols = torch.arange(images.shape[3], device=device).view(1, 1, -1)
    top, left, side, erase = (t.to(device).view(-1, 1, 1) for t in (top, left, side, erase))
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side) & erase
    return images.masked_fill(inside.unsqueeze(1), 0.0)


# CleanCLIP's image view. AutoAugment's ImageNet policy picks one of 25 sub-policies of two operations, each applied
# with its own probability and magnitude. The equivalent here: two operations per image, each drawn uniformly
# from the batchable AutoAugment operations and applied with p=0.5 at a uniform magnitude in AutoAugment's range
# (torchvision `_augmentation_space`: brightness/color/contrast/sharpness 0.9, rotate 30 degrees, shear 0.3,
# translate 150/331 of the side, posterize down to 4 bits, solarize threshold over [0, 1]). Equalize is left
# out (a per-image histogram, not batchable). Pixels moved in from outside are 0, as in torchvision.
_VIEW_OPS = ("identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast",
             "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "invert")
_VIEW_OP_P = 0.5


def cleanclip_image_view(images: Tensor, *, seed: int, step: int, offset: int = 0) -> Tensor:
    """An AutoAugment-style view of each image, in [0, 1] (normalise it before the model)."""
    count = images.shape[0]
    u = sample_uniforms(count, 6, seed=seed, step=step, offset=offset, stream=_IMAGE_VIEW_STREAM).to(images.device)
    out = images.clone()
    for slot in range(2):
        choice = (u[:, 3 * slot] * len(_VIEW_OPS)).long().clamp(max=len(_VIEW_OPS) - 1)
        apply = u[:, 3 * slot + 1] < _VIEW_OP_P
        # Signed magnitude in [-1, 1] for operations with a direction, |.| for the others.
        magnitude = u[:, 3 * slot + 2] * 2 - 1
        for index, name in enumerate(_VIEW_OPS):
            rows = torch.nonzero((choice == index) & apply).flatten()
            if len(rows) and name != "identity":
                out[rows] = _view_op(name, out[rows], magnitude[rows]).clamp(0, 1)
    return out


def _view_op(name: str, x: Tensor, m: Tensor) -> Tensor:
    """One AutoAugment operation on a batch, magnitude m in [-1, 1] per image."""
    per_image = m.view(-1, 1, 1, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    if name == "brightness":
        return x * (1 + 0.9 * per_image)
    if name == "color":
        return gray + (x - gray) * (1 + 0.9 * per_image)
    if name == "contrast":
        mean = gray.mean(dim=(2, 3), keepdim=True)
        return mean + (x - mean) * (1 + 0.9 * per_image)
    if name == "sharpness":
        kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
        return smooth + (x - smooth) * (1 + 0.9 * per_image)
    if name == "posterize":
        levels = 2 ** (8 - (m.abs() * 4).round()).view(-1, 1, 1, 1)  # keep 8 down to 4 bits
        return torch.floor(x * 255 / (256 / levels)) * (256 / levels) / 255
    if name == "solarize":
        threshold = (1 - m.abs()).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 1 - x, x)
    if name == "autocontrast":
        low = x.amin(dim=(2, 3), keepdim=True)
        high = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-6), x)
    if name == "invert":
        return 1 - x
    return _affine(name, x, m)


def _affine(name: str, x: Tensor, m: Tensor) -> Tensor:
    """Rotate, shear or translate each image about its centre; outside pixels become 0."""
    count = x.shape[0]
    theta = torch.zeros(count, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if name == "rotate":
        angle = m * math.radians(30)
        theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
        theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    elif name == "shear_x":
        theta[:, 0, 1] = 0.3 * m
    elif name == "shear_y":
        theta[:, 1, 0] = 0.3 * m
    elif name == "translate_x":
        theta[:, 0, 2] = 2 * (150 / 331) * m  # grid units: the image spans [-1, 1]
    elif name == "translate_y":
        theta[:, 1, 2] = 2 * (150 / 331) * m
    else:
        raise ValueError(f"unknown view operation {name!r}")
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# CleanCLIP's text view: EDA (Wei & Zou 2019) with alpha 0.1, one augmented sentence, so one of its four
# operations per caption. Synonym replacement and random insertion need WordNet; the two that need nothing
# (random swap, random deletion) are applied here, on the caption's BPE tokens (on the toy captions, words).
_EDA_ALPHA = 0.1


def cleanclip_text_view(tokens: Tensor, *, seed: int, step: int, offset: int = 0) -> Tensor:
    """An EDA-style view of each tokenised caption: swap or delete about 10% of its tokens.

    Tokens follow open_clip's layout: start token, caption tokens, end token (the largest id), zero padding.
    """
    out = torch.zeros(tokens.shape, dtype=tokens.dtype)
    for i, row in enumerate(tokens.tolist()):
        rng = random.Random(sample_seed(seed, step, offset + i, _TEXT_VIEW_STREAM))
        end = row.index(max(row))
        words = row[1:end]
        count = max(1, int(_EDA_ALPHA * len(words)))
        if len(words) >= 2 and rng.random() < 0.5:
            for _ in range(count):
                a, b = rng.randrange(len(words)), rng.randrange(len(words))
                words[a], words[b] = words[b], words[a]
        elif len(words) >= 2:
            kept = [w for w in words if rng.random() >= _EDA_ALPHA]
            words = kept or [words[rng.randrange(len(words))]]
        new = [row[0], *words, row[end]]
        out[i, :len(new)] = torch.tensor(new, dtype=tokens.dtype)
    return out.to(tokens.device)
