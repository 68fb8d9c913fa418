"""Trigger-agnostic backdoor scan of a CLIP's zero-shot classifier: Neural Cleanse's trigger inversion per class.

For every candidate target class, the smallest trigger that sends clean images of the other classes to it is
searched for by gradient descent, in two forms: a patch (a mask and a pattern pasted over the image, Neural
Cleanse, Wang et al., S&P 2019) and a full-image blend (a pattern mixed in at weight alpha, the form of Blended
and of Chen et al.'s blended injection). A backdoor target needs a much smaller trigger than the other classes:
each form's sizes are compared across classes with the median absolute deviation, and a class whose size lies
more than `threshold` MADs below the median (Neural Cleanse's anomaly index, threshold 2) is flagged.
Only clean images, class names and templates are used; the eval config's triggers are ignored. docs/scan.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from parclean.evaluate import LabelledImages, zero_shot_classifier
from parclean.models import LoadedModel, normalize

FORMS = ("patch", "blend")
MAD_TO_SIGMA = 1.4826  # consistency constant: MAD * 1.4826 estimates a normal's standard deviation


@dataclass(frozen=True)
class ScanConfig:
    """How hard to search for each class's smallest trigger, and when to call a class anomalous."""

    images_per_class: int = 4  # clean images of each other class that the inverted trigger must flip
    steps: int = 100  # optimisation steps per class and form
    lr: float = 0.2  # Adam, on the trigger's logits
    success: float = 0.9  # share of those images the trigger must send to the class
    cost: float = 0.1  # starting weight of the trigger's size in the loss (adapted as in Neural Cleanse)
    threshold: float = 2.0  # anomaly index above which a class is flagged (Neural Cleanse: 2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images_per_class < 1 or self.steps < 1 or not 0 < self.success <= 1 or self.lr <= 0:
            raise ValueError("scan: images_per_class and steps must be >= 1, success in (0, 1], lr > 0")


def scan(loaded: LoadedModel, data: LabelledImages, cfg: ScanConfig = ScanConfig(),
         templates: tuple[str, ...] = ("a photo of a {}.",)) -> dict[str, Any]:
    """The scan's verdict: suspicious, target, score, threshold, and per class each form's smallest trigger."""
    model = loaded.model
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        classifier = zero_shot_classifier(loaded, data.classnames, templates)
        sizes = {form: [] for form in FORMS}
        for target in range(len(data.classnames)):
            images = _others(data, target, cfg)
            for form in FORMS:
                sizes[form].append(_smallest_trigger(loaded, classifier, images, target, form, cfg))
    finally:
        for parameter, grad in zip(model.parameters(), grads, strict=True):
            parameter.requires_grad_(grad)
        model.train(was_training)
    return verdict(sizes, data.classnames, cfg.threshold)


def verdict(sizes: dict[str, list[float]], classnames: tuple[str, ...], threshold: float) -> dict[str, Any]:
    """Anomaly index per class and form; flagged when the largest exceeds `threshold`."""
    indices = {form: anomaly_indices(values) for form, values in sizes.items()}
    form, target = max(((f, c) for f in indices for c in range(len(classnames))), key=lambda fc: indices[fc[0]][fc[1]])
    score = indices[form][target]
    suspicious = score > threshold
    classes = {name: {f"{f}_size": round(sizes[f][c], 4) for f in sizes} | {
        f"{f}_index": round(indices[f][c], 2) for f in indices} for c, name in enumerate(classnames)}
    return {"suspicious": suspicious, "target": classnames[target] if suspicious else None,
            "score": round(score, 3), "threshold": threshold, "form": form if suspicious else None,
            "most_anomalous": classnames[target], "classes": classes}


def verdict_text(result: dict[str, Any]) -> str:
    """'backdoor suspected: target 'moon' (patch trigger), score 5.44 > 2' or 'no backdoor found (score 1.20 <= 2)'."""
    if result["suspicious"]:
        return (f"backdoor suspected: target {result['target']!r} ({result['form']} trigger), score "
                f"{result['score']:.2f} > {result['threshold']:g}")
    return (f"no backdoor found (score {result['score']:.2f} <= {result['threshold']:g}, most anomalous class "
            f"{result['most_anomalous']!r})")


def anomaly_indices(values: list[float]) -> list[float]:
    """(median - value) / (1.4826 * MAD) per value: how far below the others' typical size it lies."""
    x = torch.tensor(values, dtype=torch.float64)
    median = x.median()
    mad = MAD_TO_SIGMA * (x - median).abs().median()
    scale = max(float(mad), 1e-3 * max(float(median), 1e-6))  # equal sizes: no anomaly, not a division by 0
    return [float((median - v) / scale) for v in x]


def _others(data: LabelledImages, target: int, cfg: ScanConfig) -> torch.Tensor:
    """Up to images_per_class clean images of every class but `target` (the first ones: deterministic)."""
    chosen = []
    for label in range(len(data.classnames)):
        if label != target:
            chosen.append(data.images[data.labels == label][: cfg.images_per_class])
    return torch.cat(chosen)


def _smallest_trigger(loaded: LoadedModel, classifier: torch.Tensor, images: torch.Tensor, target: int, form: str,
                      cfg: ScanConfig) -> float:
    """The smallest size (patch: mask area as a share of the image; blend: alpha) at which an optimised trigger
    sends at least cfg.success of `images` to `target`; 1.0 when none does."""
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + target * 2 + FORMS.index(form))
    _, _, height, width = images.shape
    pattern = torch.randn(1, 3, height, width, generator=gen).requires_grad_(True)
    # A patch has a mask weight per pixel (its size: the share of the image it covers), a blend one weight alpha.
    size_logit = torch.full((1, 1, height, width) if form == "patch" else (1, 1, 1, 1), -3.0, requires_grad=True)
    optimizer = torch.optim.Adam([pattern, size_logit], lr=cfg.lr)
    labels = torch.full((len(images),), target)
    cost, best = cfg.cost, 1.0
    for step in range(cfg.steps):
        weight = torch.sigmoid(size_logit)
        triggered = (1 - weight) * images + weight * torch.sigmoid(pattern)
        features = F.normalize(loaded.model.encode_image(normalize(triggered, loaded.mean, loaded.std)), dim=-1)
        logits = 100.0 * features @ classifier.T  # CLIP's usual logit scale, the same for every model
        size = weight.mean()
        loss = F.cross_entropy(logits, labels) + cost * size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rate = (logits.argmax(dim=-1) == target).float().mean().item()
        if rate >= cfg.success:
            best = min(best, size.item())
            cost *= 1.5  # met: ask for a smaller trigger
        elif step % 5 == 4:
            cost /= 1.5  # not met: let it grow
    return best
