"""cleaning/objectives.py: one definition per objective, read by CleanConfig and the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cleaning.losses import FeatureBatch
from cleaning.objectives import OBJECTIVES, PERTURBING
from cleaning.train import CleanConfig


def unit(seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_the_recipe_accepts_exactly_the_registered_objectives():
    for name in OBJECTIVES:
        assert CleanConfig(objective=name).objective == name
    with pytest.raises(ValueError, match="objective='sgd': use one of " + ", ".join(OBJECTIVES)):
        CleanConfig(objective="sgd")


def test_the_perturbing_objectives_are_those_that_need_the_frozen_reference():
    assert PERTURBING == ("par", "par_cleanclip")


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_loss_returns_a_total_with_a_gradient_and_detached_named_terms(name):
    image = unit(0).requires_grad_(True)
    objective = OBJECTIVES[name]
    batch = FeatureBatch(image, unit(1), augmented=(unit(2), unit(3)) if objective.cleanclip_view else None,
                         reference=(unit(4), unit(5)) if objective.needs_reference else None)
    total, terms = objective.loss(batch, 10.0, CleanConfig(objective=name))
    assert total.shape == () and total.requires_grad
    assert "clip" in terms and all(not value.requires_grad for value in terms.values())
