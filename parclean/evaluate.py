"""Zero-shot clean accuracy and attack success rate (ASR) of a CLIP model.

Images enter as float tensors in [0, 1] at the model's input size (N, 3, H, W): triggers are applied in that
pixel space (as the official code does, after resizing), then the model's normalisation.
ASR here counts only triggered images whose true class is not the target (the usual definition; the official
ImageNet ASR counts all images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parclean.attacks import Trigger, apply_trigger
from parclean.models import LoadedModel, normalize

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class LabelledImages:
    """A labelled evaluation set: images (N, 3, H, W) in [0, 1], labels, and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: tuple[str, ...]


@torch.no_grad()
def zero_shot_classifier(loaded: LoadedModel, classnames: Sequence[str],
                         templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(num_classes, dim) unit text embeddings, each the normalised mean over the templates."""
    model = loaded.model
    device = next(model.parameters()).device
    weights = []
    for name in classnames:
        tokens = loaded.tokenizer([template.format(name) for template in templates]).to(device)
        embedding = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)
        weights.append(F.normalize(embedding, dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def image_features(loaded: LoadedModel, images: torch.Tensor, batch_size: int = 500,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit image embeddings of images (N, 3, H, W) in [0, 1], computed batch by batch on `device`."""
    model, mean, std = loaded.model, loaded.mean, loaded.std
    return torch.cat([F.normalize(model.encode_image(normalize(batch.to(device), mean, std)), dim=-1)
                      for batch in images.split(batch_size)])


@torch.no_grad()
def predict(loaded: LoadedModel, images: torch.Tensor, classifier: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Top-1 class index per image."""
    features = image_features(loaded, images, batch_size, classifier.device)
    return (features @ classifier.T).argmax(dim=-1).cpu()


def clean_accuracy(loaded: LoadedModel, data: LabelledImages, classifier: torch.Tensor) -> float:
    """Zero-shot top-1 accuracy on clean images, in [0, 1]."""
    return (predict(loaded, data.images, classifier) == data.labels).float().mean().item()


def attack_success_rate(loaded: LoadedModel, data: LabelledImages, classifier: torch.Tensor, trigger: Trigger,
                        target: int, seed: int = 0) -> float:
    """Share of triggered images of classes other than `target` that the model calls `target`, in [0, 1]."""
    keep = data.labels != target
    images = data.images[keep]
    seeds = [seed * 1_000_003 + i for i in range(len(images))]
    triggered = apply_trigger(images, trigger, seeds)
    return (predict(loaded, triggered, classifier) == target).float().mean().item()


def evaluate(loaded: LoadedModel, data: LabelledImages, triggers: dict[str, Trigger], target: str | None,
             templates: Sequence[str] = DEFAULT_TEMPLATES, seed: int = 0) -> dict[str, float]:
    """Clean accuracy and, when a target is given, ASR per named trigger (all in percent)."""
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        classifier = zero_shot_classifier(loaded, data.classnames, templates)
        result = {"clean_acc": 100 * clean_accuracy(loaded, data, classifier)}
        if target is not None:
            if target not in data.classnames:
                raise ValueError(f"target {target!r} is not one of the evaluation classes")
            index = data.classnames.index(target)
            for name, trigger in triggers.items():
                result[f"asr_{name}"] = 100 * attack_success_rate(loaded, data, classifier, trigger, index, seed)
        return result
    finally:
        loaded.model.train(was_training)
