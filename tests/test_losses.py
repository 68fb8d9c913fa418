"""The cleaning losses (cleaning/losses.py) against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cleaning.losses import (
    FeatureBatch,
    aligned_reference,
    capped,
    cleanclip_loss,
    clip_loss,
    ft_loss,
    gather_features,
    inmodal_loss,
    par_cleanclip_loss,
    par_loss,
    perturbation_distance,
)


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_loss_matches_hand_computation() -> None:
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    scale = 2.0
    # logits = 2 * image @ text.T = [[1.6, 0.0], [1.92, 1.6]]
    row0 = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(0.0)))  # image 0 -> text 0
    row1 = -math.log(math.exp(1.6) / (math.exp(1.92) + math.exp(1.6)))  # image 1 -> text 1
    col0 = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(1.92)))  # text 0 -> image 0
    col1 = -math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6)))  # text 1 -> image 1
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert clip_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-6)
    total, terms = ft_loss(FeatureBatch(image, text), scale)
    assert total.item() == pytest.approx(expected, rel=1e-6) and set(terms) == {"clip"}


def test_distance_is_two_minus_two_cosine_on_unit_vectors() -> None:
    a, b = unit(16, 8, seed=0), unit(16, 8, seed=1)
    expected = (2 - 2 * (a * b).sum(dim=-1)).mean()
    assert perturbation_distance(a, b).item() == pytest.approx(expected.item(), rel=1e-6)
    assert perturbation_distance(a, a).item() == 0.0
    assert perturbation_distance(a, -a).item() == pytest.approx(4.0)  # antipodal: the largest possible
    with pytest.raises(ValueError, match="differ"):
        perturbation_distance(a, b[:8])


@pytest.mark.parametrize("d, tau, kept", [(0.5, 2.15, True), (2.15, 2.15, True), (2.2, 2.15, False), (1.0, 0.3, False)])
def test_capped_keeps_value_and_gradient_below_tau_and_drops_both_above(d: float, tau: float, kept: bool) -> None:
    x = torch.tensor(d, requires_grad=True)
    value = capped(x, tau)
    value.backward()
    if kept:
        assert value.item() == pytest.approx(d) and x.grad.item() == 1.0
    else:
        assert value.item() == 0.0 and x.grad.item() == 0.0


def test_par_total_is_clip_minus_half_the_capped_distances() -> None:
    image, text = unit(8, 16, seed=2), unit(8, 16, seed=3)
    ref_image, ref_text = unit(8, 16, seed=4), unit(8, 16, seed=5)
    d_img = perturbation_distance(image, ref_image).item()
    d_txt = perturbation_distance(text, ref_text).item()
    clip = clip_loss(image, text, 10.0).item()
    total, terms = par_loss(FeatureBatch(image, text, reference=(ref_image, ref_text)), 10.0, tau=5.0)  # both below tau
    assert total.item() == pytest.approx(clip - 0.5 * (d_img + d_txt), rel=1e-6)
    assert terms["pert"].item() == pytest.approx(0.5 * (d_img + d_txt), rel=1e-6)
    assert (terms["clip"].item(), terms["d_img"].item(), terms["d_txt"].item()) == pytest.approx((clip, d_img, d_txt))
    # tau between the two distances: only the smaller one stays in the loss; the distances are still logged.
    tau = (d_img + d_txt) / 2
    total, terms = par_loss(FeatureBatch(image, text, reference=(ref_image, ref_text)), 10.0, tau=tau)
    assert total.item() == pytest.approx(clip - 0.5 * min(d_img, d_txt), rel=1e-6)
    assert terms["d_img"].item() == pytest.approx(d_img) and terms["d_txt"].item() == pytest.approx(d_txt)


def test_par_pushes_features_away_from_the_reference_only_below_tau() -> None:
    image = unit(4, 8, seed=6).requires_grad_(True)
    text, ref_image, ref_text = unit(4, 8, seed=7), unit(4, 8, seed=8), unit(4, 8, seed=9)
    total, _ = par_loss(FeatureBatch(image, text, reference=(ref_image, ref_text)), 1.0, tau=100.0)
    with_pert = torch.autograd.grad(total, image)[0]
    clip_only = torch.autograd.grad(clip_loss(image, text, 1.0), image)[0]
    # d/dx of -0.5 * mean ||x - r||^2 is -(x - r) / batch: the extra gradient points away from the reference.
    assert torch.allclose(with_pert - clip_only, -(image - ref_image).detach() / 4, atol=1e-6)
    batch = FeatureBatch(image, text, reference=(ref_image, ref_text))
    total, _ = par_loss(batch, 1.0, tau=1e-3)  # above the cap: CLIP alone
    assert torch.allclose(torch.autograd.grad(total, image)[0], clip_only, atol=1e-7)


def test_reference_model_gets_no_gradient() -> None:
    from parclean.models import create_model

    model = create_model("tiny-test", seed=0).model.train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 1000, (4, 24), generator=torch.Generator().manual_seed(0))
    tokens[:, 6] = 49407
    tokens[:, 7:] = 0
    with torch.no_grad():  # as the trainer runs the reference
        ref_image, ref_text, _ = reference(image=images, text=tokens)
    # Perturb the trained copy so that the distance (and its gradient) is not zero.
    with torch.no_grad():
        model.visual.proj.add_(0.1)
    image, text, _ = model(image=images, text=tokens)
    total, terms = par_loss(FeatureBatch(image, text, reference=(ref_image, ref_text)), 10.0)
    total.backward()
    assert terms["d_img"].item() > 0
    assert all(p.grad is None for p in reference.parameters())
    assert model.visual.proj.grad is not None and model.visual.proj.grad.abs().sum() > 0


def test_cleanclip_adds_the_inmodal_losses_with_their_weights() -> None:
    image, text, aug_image, aug_text = (unit(6, 8, seed=s) for s in (10, 11, 12, 13))
    clip = clip_loss(image, text, 5.0).item()
    # In-modal: rows are the original views, columns the augmented ones (one direction, as CleanCLIP's code).
    logits = 5.0 * image @ aug_image.T
    by_hand = (-logits.diag() + logits.logsumexp(dim=1)).mean().item()
    assert inmodal_loss(image, aug_image, 5.0).item() == pytest.approx(by_hand, rel=1e-6)
    inmodal = (by_hand + inmodal_loss(text, aug_text, 5.0).item()) / 2
    total, terms = cleanclip_loss(FeatureBatch(image, text, augmented=(aug_image, aug_text)), 5.0)
    assert total.item() == pytest.approx(clip + inmodal, rel=1e-6)
    total, terms = cleanclip_loss(FeatureBatch(image, text, augmented=(aug_image, aug_text)), 5.0, clip_weight=0.5,
                                  inmodal_weight=2.0)
    assert total.item() == pytest.approx(0.5 * clip + 2.0 * inmodal, rel=1e-6)
    assert set(terms) == {"clip", "inmodal_img", "inmodal_txt", "inmodal"}


def test_par_cleanclip_is_cleanclip_minus_the_capped_perturbation() -> None:
    image, text, aug_image, aug_text, ref_image, ref_text = (unit(6, 8, seed=s) for s in range(20, 26))
    cleanclip, _ = cleanclip_loss(FeatureBatch(image, text, augmented=(aug_image, aug_text)), 5.0)
    d_img = perturbation_distance(image, ref_image).item()
    d_txt = perturbation_distance(text, ref_text).item()
    tau = (d_img + d_txt) / 2  # one distance under the cap, the other over it: only the first counts
    batch = FeatureBatch(image, text, augmented=(aug_image, aug_text), reference=(ref_image, ref_text))
    total, terms = par_cleanclip_loss(batch, 5.0, tau=tau)
    kept = min(d_img, d_txt)
    assert total.item() == pytest.approx(cleanclip.item() - 0.5 * kept, rel=1e-6)
    assert terms["pert"].item() == pytest.approx(0.5 * kept, rel=1e-6)
    assert set(terms) == {"clip", "inmodal_img", "inmodal_txt", "inmodal", "d_img", "d_txt", "pert"}


def test_gather_is_identity_without_a_process_group() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_features(x) is x


def test_aligned_reference_does_not_count_a_rotation_of_the_shared_space_as_a_perturbation() -> None:
    gen = torch.Generator().manual_seed(0)
    reference_image = F.normalize(torch.randn(32, 16, generator=gen), dim=-1)
    reference_text = F.normalize(torch.randn(32, 16, generator=gen), dim=-1)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    image, text = reference_image @ rotation, reference_text @ rotation  # every similarity kept
    assert perturbation_distance(image, reference_image) > 1.0  # plain PAR: far away
    aligned_image, aligned_text = aligned_reference(image, text, reference_image, reference_text)
    assert perturbation_distance(image, aligned_image) < 1e-10 and perturbation_distance(text, aligned_text) < 1e-10
    # A change of geometry still counts: noise on the images is measured after the alignment.
    noisy = F.normalize(image + 0.3 * torch.randn(32, 16, generator=gen), dim=-1)
    aligned_image, _ = aligned_reference(noisy, text, reference_image, reference_text)
    assert perturbation_distance(noisy, aligned_image) > 0.05
