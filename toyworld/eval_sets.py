"""The toy world's evaluation set as a named eval set ("toyworld"), registered in pyproject.toml's
`parclean.eval_sets` entry points so that stages reach it by name (parclean/eval_sets.py)."""

from __future__ import annotations

import torch

from parclean.attacks import to_float_images
from parclean.evaluate import LabelledImages
from toyworld.render import classes, eval_set


def labelled_eval_set(count: int, image_size: int) -> LabelledImages:
    """The toy world's labelled clean evaluation set: `count` images rendered at `image_size`."""
    images, labels = eval_set(count, image_size)
    return LabelledImages(to_float_images(images), torch.from_numpy(labels), classes())
