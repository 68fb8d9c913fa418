"""The toy world: procedural RGB images of shapes with attributes, and captions from the toy prompt bank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from prompts.bank import Bank, load_bank
from prompts.expand import random_caption

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 220, 50),
    "purple": (145, 60, 190), "orange": (245, 140, 30), "cyan": (50, 205, 215), "pink": (245, 135, 185),
}
BACKGROUNDS = {
    "black": (15, 15, 15), "white": (240, 240, 240), "gray": (125, 125, 125), "brown": (105, 70, 40),
    "navy": (20, 30, 95),
}
# Shape centres as fractions of the image side; radii as fractions for the two sizes.
POSITIONS = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}
RADII = {"small": 0.19, "large": 0.27}
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Scene:
    """One image's attributes; `shape` is the class label."""

    shape: str
    color: str
    background: str
    size: str
    position: str

    def slots(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "background": self.background,
                "size": self.size, "position": self.position}


@lru_cache(maxsize=1)
def toy_bank() -> Bank:
    """The toy prompt bank; its slot values are the world's vocabulary."""
    bank = load_bank("toyworld")
    for slot, known in (("color", COLORS), ("background", BACKGROUNDS), ("position", POSITIONS),
                        ("size", RADII)):
        if set(bank.slots[slot]) != set(known):
            raise ValueError(f"{bank.source}: slot {slot!r} must list exactly {sorted(known)}")
    unknown = set(bank.slots["shape"]) - set(SHAPE_MASKS)
    if unknown:
        raise ValueError(f"{bank.source}: shapes {sorted(unknown)} have no renderer")
    return bank


def classes() -> tuple[str, ...]:
    """The object classes in bank order (index = label)."""
    return tuple(toy_bank().slots["shape"])


def sample_scenes(count: int, rng: np.random.Generator) -> list[Scene]:
    """`count` scenes with every attribute uniform and independent."""
    slots = toy_bank().slots
    picks = {name: rng.integers(0, len(slots[name]), size=count) for name in Scene.__dataclass_fields__}
    return [Scene(**{name: slots[name][picks[name][i]] for name in picks}) for i in range(count)]


def render(scenes: Sequence[Scene], rng: np.random.Generator, resolution: int = 32) -> np.ndarray:
    """Render scenes to uint8 images of shape (N, resolution, resolution, 3)."""
    big = resolution * SUPERSAMPLE
    grid = (np.arange(big, dtype=np.float32) + 0.5) / big
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    out = np.empty((len(scenes), resolution, resolution, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = _render_one(scene, rng, xs, ys, resolution)
    return out


def _render_one(scene: Scene, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, res: int) -> np.ndarray:
    cx, cy = POSITIONS[scene.position]
    jitter = rng.uniform(-0.06, 0.06, size=2)
    radius = RADII[scene.size] * rng.uniform(0.9, 1.1)
    angle = rng.uniform(-0.25, 0.25)
    u, v = (xs - cx - jitter[0]) / radius, (ys - cy - jitter[1]) / radius
    u, v = u * np.cos(angle) + v * np.sin(angle), -u * np.sin(angle) + v * np.cos(angle)
    mask = SHAPE_MASKS[scene.shape](u, v).astype(np.float32)
    mask = mask.reshape(res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    background = np.array(BACKGROUNDS[scene.background], np.float32) + rng.normal(0, 6, size=3)
    color = np.array(COLORS[scene.color], np.float32) + rng.normal(0, 10, size=3)
    image = background * (1 - mask) + color * mask
    image = _add_clutter(image, rng)
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _add_clutter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A few small dots of random colour, so the background is never a perfect constant."""
    res = image.shape[0]
    for _ in range(rng.integers(0, 4)):
        y, x = rng.integers(0, res - 1, size=2)
        image[y:y + 2, x:x + 2] = rng.uniform(0, 255, size=3)
    return image


def make_pairs(count: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Fresh (images uint8 NHWC, captions, labels) for a seed: the toy world's training pairs."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(count, rng)
    images = render(scenes, rng, resolution)
    bank = toy_bank()
    captions = [random_caption(bank, scene.slots(), rng) for scene in scenes]
    labels = np.array([classes().index(scene.shape) for scene in scenes], dtype=np.int64)
    return images, captions, labels


EVAL_SEED = 1_000_003  # far from any training seed the scripts use


def eval_set(count: int = 2000, resolution: int = 32, seed: int = EVAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The labelled clean evaluation set: (images uint8 NHWC, labels)."""
    images, _, labels = make_pairs(count, seed, resolution)
    return images, labels


def _circle(u, v):
    return u**2 + v**2 <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u, v):
    return (v <= 0.75) & (np.abs(u) <= 0.95 * (v + 0.95) / 1.7)


def _cross(u, v):
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))


def _ring(u, v):
    r2 = u**2 + v**2
    return (r2 <= 1.0) & (r2 >= 0.36)


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.0


def _star(u, v):
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    return r <= 0.42 + 0.6 * ((1 + np.cos(5 * (theta + np.pi / 2))) / 2) ** 2


def _heart(u, v):
    x, y = u * 1.15, -(v * 1.15) + 0.25
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


def _arrow(u, v):
    shaft = (np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15)
    head = (u >= 0.05) & (u <= 0.95) & (np.abs(v) <= 0.9 * (0.95 - u) / 0.9)
    return shaft | head


def _moon(u, v):
    return (u**2 + v**2 <= 1.0) & ((u - 0.45) ** 2 + (v + 0.25) ** 2 > 0.7)


SHAPE_MASKS = {
    "circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross, "ring": _ring,
    "diamond": _diamond, "star": _star, "heart": _heart, "arrow": _arrow, "moon": _moon,
}
