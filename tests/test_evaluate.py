"""Clean accuracy and ASR on a hand-built case whose answers are known: a model that sees the mean colour."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from parclean.attacks import Trigger
from parclean.evaluate import LabelledImages, evaluate
from parclean.models import LoadedModel

CLASSES = ("red", "green", "blue")


class MeanColour(torch.nn.Module):
    """Image feature: the mean (r, g, b); text feature: the one-hot colour its prompt names."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device from the parameters

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens[:, 0], len(CLASSES)).float()


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[next(i for i, name in enumerate(CLASSES) if name in text)] for text in texts])


def test_clean_accuracy_and_asr_count_what_they_should(tmp_path):
    # Five 8x8 images (r, g, b) and their labels; the target is blue. A pure blue 4x4 patch (a quarter of the
    # image) in the corner tips image 0 (r 0.5, b 0.4) to blue and no other; image 4 is red but labelled green.
    colours = [(0.5, 0.0, 0.4), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)]
    labels = [0, 0, 1, 2, 1]
    images = torch.tensor(colours).view(5, 3, 1, 1).expand(5, 3, 8, 8).clone()
    blue = tmp_path / "blue.png"
    PIL.Image.fromarray(np.tile(np.array([0, 0, 255], dtype=np.uint8), (8, 8, 1))).save(blue)
    trigger = Trigger(kind="image_patch", image=str(blue), patch_size=4, location="bottom_right")
    loaded = LoadedModel(MeanColour(), "mean-colour", tokenize, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    result = evaluate(loaded, LabelledImages(images, torch.tensor(labels), CLASSES), {"patch": trigger}, "blue")
    # 4 of 5 right; of the 4 triggered images not of the target class, 1 is called blue (the blue image itself,
    # called blue with or without the trigger, does not count).
    assert result == pytest.approx({"clean_acc": 80.0, "asr_patch": 25.0})
