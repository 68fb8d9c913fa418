"""Zero-shot clean accuracy and attack success rate (ASR) of a CLIP model, streamed batch by batch.

Images enter as float tensors in [0, 1] at the model's input size (N, 3, H, W): triggers are applied in that
pixel space (as the official code does, after resizing), then the model's normalisation. An eval set is read one
batch at a time (`EvalData.batches`), and each batch's triggered copies are made and dropped with it, so memory
does not grow with the set's size.
ASR here counts only triggered images whose true class is not the target (the usual definition; the official
ImageNet ASR counts all images).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from parclean.attacks import Trigger, apply_trigger
from parclean.models import LoadedModel, normalize

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEFAULT_BATCH_SIZE = 500
DEVICES = ("auto", "cpu", "cuda")
# Image i of the non-target images draws its trigger randomness from seed * SEED_STRIDE + i.
SEED_STRIDE = 1_000_003


class EvalData(Protocol):
    """A labelled eval set read in batches: (images (B, 3, H, W) in [0, 1] on the CPU, labels (B,))."""

    classnames: tuple[str, ...]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class LabelledImages:
    """A labelled evaluation set held in memory: images (N, 3, H, W) in [0, 1], labels, and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(self.images.split(batch_size), self.labels.split(batch_size), strict=True)


def resolve_device(device: str) -> torch.device:
    """The torch device of a `device` setting: auto (the GPU when there is one, else the CPU), cpu, cuda[:N]."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in DEVICES[1:]:
        raise ValueError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA GPU is visible to torch here; use device=auto or cpu")
    return torch.device(device)


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
def image_features(loaded: LoadedModel, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit image embeddings of images (N, 3, H, W) in [0, 1], computed batch by batch on `device`."""
    model, mean, std = loaded.model, loaded.mean, loaded.std
    return torch.cat([F.normalize(model.encode_image(normalize(batch.to(device), mean, std)), dim=-1)
                      for batch in images.split(batch_size)])


@torch.no_grad()
def predict(loaded: LoadedModel, images: torch.Tensor, classifier: torch.Tensor,
            batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Top-1 class index per image (on the CPU)."""
    features = image_features(loaded, images, batch_size, classifier.device)
    return (features @ classifier.T).argmax(dim=-1).cpu()


def clean_accuracy(loaded: LoadedModel, data: EvalData, classifier: torch.Tensor,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Zero-shot top-1 accuracy on clean images, in [0, 1]."""
    counts = _count(loaded, data, classifier, {}, None, 0, batch_size)
    return counts.correct / counts.images


def evaluate(loaded: LoadedModel, data: EvalData, triggers: dict[str, Trigger], target: str | None,
             templates: Sequence[str] = DEFAULT_TEMPLATES, seed: int = 0, *,
             batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None) -> dict[str, float]:
    """Clean accuracy and, when a target is given, ASR per named trigger (all in percent).

    device: "auto", "cpu" or "cuda[:N]" moves the model there for the evaluation (and back after); None leaves it
    where it is.
    """
    index = None
    if target is not None:
        if target not in data.classnames:
            raise ValueError(f"target {target!r} is not one of the evaluation classes")
        index = data.classnames.index(target)
    model = loaded.model
    was_training, home = model.training, next(model.parameters()).device
    model.eval()
    if device is not None:
        model.to(resolve_device(device))
    try:
        classifier = zero_shot_classifier(loaded, data.classnames, templates)
        counts = _count(loaded, data, classifier, triggers if index is not None else {}, index, seed, batch_size)
    finally:
        model.to(home)
        model.train(was_training)
    result = {"clean_acc": 100 * counts.correct / counts.images}
    for name, hits in counts.hits.items():
        result[f"asr_{name}"] = 100 * hits / counts.others if counts.others else float("nan")
    return result


@dataclass
class _Counts:
    images: int = 0
    correct: int = 0
    others: int = 0  # images whose class is not the target: the ones that get triggered
    hits: dict[str, int] = field(default_factory=dict)  # per trigger: triggered images called the target


def _count(loaded: LoadedModel, data: EvalData, classifier: torch.Tensor, triggers: dict[str, Trigger],
           target: int | None, seed: int, batch_size: int) -> _Counts:
    """The counts behind clean accuracy and ASR, one batch at a time."""
    counts = _Counts(hits=dict.fromkeys(triggers, 0))
    for images, labels in data.batches(batch_size):
        _count_batch(loaded, images, labels, classifier, triggers, target, seed, counts)
    if not counts.images:
        raise ValueError("the evaluation set has no images")
    return counts


def _count_batch(loaded: LoadedModel, images: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                 triggers: dict[str, Trigger], target: int | None, seed: int, counts: _Counts) -> None:
    """Add one batch to `counts`; its triggered copies are made here and dropped on return."""
    counts.images += len(labels)
    counts.correct += int((predict(loaded, images, classifier, len(images)) == labels).sum())
    others = images[labels != target] if triggers else images[:0]
    if not len(others):
        return
    seeds = [seed * SEED_STRIDE + counts.others + i for i in range(len(others))]
    counts.others += len(others)
    for name, trigger in triggers.items():
        triggered = apply_trigger(others, trigger, seeds)
        counts.hits[name] += int((predict(loaded, triggered, classifier, len(triggered)) == target).sum())
