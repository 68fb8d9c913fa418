"""The cleaning objectives, one definition each: whether it needs the frozen reference model, which views of a
batch it reads, and its loss, which returns (total, named terms). A new objective is one more entry here (and its
loss in losses.py); the trainer and CleanConfig read everything from this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from cleaning.losses import FeatureBatch, cleanclip_loss, ft_loss, par_cleanclip_loss, par_loss


class LossSettings(Protocol):
    """The recipe's loss weights (CleanConfig has them)."""

    tau: float
    clip_weight: float
    inmodal_weight: float


Loss = Callable[[FeatureBatch, float, LossSettings], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Objective:
    """What the trainer needs to know about one objective."""

    needs_reference: bool  # a frozen copy of the starting model (PAR's perturbation term, with tau)
    cleanclip_view: bool  # CleanCLIP's augmented second view of every pair
    augment_first_view: bool  # PAR's augmentation (CleanConfig.augment) applies to the first view
    loss: Loss


OBJECTIVES: dict[str, Objective] = {
    "par": Objective(needs_reference=True, cleanclip_view=False, augment_first_view=True,
                     loss=lambda batch, scale, cfg: par_loss(batch, scale, tau=cfg.tau)),
    "ft": Objective(needs_reference=False, cleanclip_view=False, augment_first_view=True,
                    loss=lambda batch, scale, cfg: ft_loss(batch, scale)),
    # CleanCLIP's first view is the original pair.
    "cleanclip": Objective(needs_reference=False, cleanclip_view=True, augment_first_view=False,
                           loss=lambda batch, scale, cfg: cleanclip_loss(
                               batch, scale, clip_weight=cfg.clip_weight, inmodal_weight=cfg.inmodal_weight)),
    # PAR's perturbation added to CleanCLIP: a variant measured beside the paper's methods.
    "par_cleanclip": Objective(needs_reference=True, cleanclip_view=True, augment_first_view=True,
                               loss=lambda batch, scale, cfg: par_cleanclip_loss(
                                   batch, scale, tau=cfg.tau, clip_weight=cfg.clip_weight,
                                   inmodal_weight=cfg.inmodal_weight)),
}
PERTURBING = tuple(name for name, objective in OBJECTIVES.items() if objective.needs_reference)  # tau matters
