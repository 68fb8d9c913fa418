"""Losses for cleaning a CLIP model: CLIP (FT), PAR (Perturb and Recover) and CleanCLIP.

All functions take L2-normalised features. In a multi-process run, gather them first with `gather_features`
(keeps the gradient) so that every process computes the loss of the whole global batch: the contrastive loss
sees every negative, and PAR's distances and their cap are global batch means, as in the official code
(nmndeep/PerturbAndRecover, losses.py, which gathers with `torch.distributed.nn.all_gather`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_gather

# PAR's threshold tau on the squared embedding distance: official train.py `--loss-thresh` default 2.15, used
# for every encoder (trigger.sh changes only --model). The paper (arXiv 2412.00727, method section) writes
# L_PAR = L_CLIP - L_PERT with L_PERT capped at tau; its text was not reachable here to quote a section number.
DEFAULT_TAU = 2.15
# CleanCLIP's weights of the cross-modal and the in-modal term (Bansal et al. 2023, ICCV:
# L = lambda1 * L_CLIP + lambda2 * L_SS, lambda1 = lambda2 = 1 by default; official nishadsinghi/CleanCLIP
# src/parser.py `--clip_weight 1 --inmodal_weight 1`).
DEFAULT_CLIP_WEIGHT = 1.0
DEFAULT_INMODAL_WEIGHT = 1.0

# torch 2.14 marks this all_gather deprecated in favour of a private module (_functional_collectives); it is the
# public autograd-aware gather (its backward sums every process's gradient), so keep it and silence the notice.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated",
                        category=FutureWarning)


def gather_features(features: Tensor) -> Tensor:
    """Rows of every process concatenated in rank order, with a gradient path back to this process's rows.

    Every process then computes the same global loss; the all-gather's backward sums the gradient of all
    processes for each process's rows (world_size x the true gradient), and DDP's averaging over processes
    divides it out again, so the update equals that of one process holding the whole batch.
    Identity when not distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return torch.cat(all_gather(features), dim=0)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor) -> Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, pair i being the positive of row i."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def perturbation_distance(features: Tensor, reference_features: Tensor) -> Tensor:
    """Mean over the batch of the squared L2 distance, summed over the embedding (2 - 2 cos on unit vectors)."""
    if features.shape != reference_features.shape:
        raise ValueError(f"features {tuple(features.shape)} and reference {tuple(reference_features.shape)} differ")
    return (features - reference_features).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def aligned_reference(image_features: Tensor, text_features: Tensor, reference_image_features: Tensor,
                      reference_text_features: Tensor) -> tuple[Tensor, Tensor]:
    """The reference features turned by the rotation that best maps them onto the current ones (orthogonal
    Procrustes over the batch's images and captions together), for a variant of PAR, not the paper's.

    A rotation of the shared embedding space moves every embedding away from the reference and leaves every
    image-caption similarity as it was: the cheapest way to satisfy PAR's perturbation, and one that keeps a
    backdoor intact. Measured against the aligned reference, only a change of the embeddings' geometry counts.
    The rotation is the minimiser of the distance, so holding it constant gives the distance's true gradient.
    """
    reference = torch.cat([reference_image_features, reference_text_features]).float()
    current = torch.cat([image_features, text_features]).detach().float()
    u, _, vh = torch.linalg.svd(reference.T @ current)
    rotation = (u @ vh).to(reference_image_features.dtype)
    return reference_image_features @ rotation, reference_text_features @ rotation


def capped(d: Tensor, tau: float) -> Tensor:
    """T(d) = d when d <= tau, else exactly 0 (value and gradient dropped): the official threshold on the batch mean."""
    return torch.where(d <= tau, d, torch.zeros_like(d))


@dataclass(frozen=True)
class FeatureBatch:
    """Unit features of one global batch: the (first) view's, CleanCLIP's augmented view's when the objective
    has one, and the frozen reference model's of the first view when it has one."""

    image: Tensor
    text: Tensor
    augmented: tuple[Tensor, Tensor] | None = None  # (image, text)
    reference: tuple[Tensor, Tensor] | None = None  # (image, text)


def par_loss(batch: FeatureBatch, logit_scale: float | Tensor, *,
             tau: float = DEFAULT_TAU) -> tuple[Tensor, dict[str, Tensor]]:
    """L_PAR = L_CLIP - L_PERT with L_PERT = 0.5 * (T(d_img) + T(d_txt)); returns (total, detached terms).

    The weight 0.5 and the cap of each modality's batch mean at tau follow the official losses.py
    (`loss_sum = lossclip - 0.5 * (img_loss + text_loss)`, each thresholded to 0 above `loss_thresh`).
    """
    clip = clip_loss(batch.image, batch.text, logit_scale)
    pert, distances = perturbation(batch, tau)
    terms = {"clip": clip, **distances, "pert": pert}
    return clip - pert, {name: value.detach() for name, value in terms.items()}


def perturbation(batch: FeatureBatch, tau: float) -> tuple[Tensor, dict[str, Tensor]]:
    """L_PERT = 0.5 * (T(d_img) + T(d_txt)) against the batch's reference features, and the two distances."""
    if batch.reference is None:
        raise ValueError("the perturbation term needs the frozen reference model's features")
    d_img = perturbation_distance(batch.image, batch.reference[0])
    d_txt = perturbation_distance(batch.text, batch.reference[1])
    return 0.5 * (capped(d_img, tau) + capped(d_txt, tau)), {"d_img": d_img, "d_txt": d_txt}


def ft_loss(batch: FeatureBatch, logit_scale: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain fine-tuning (the FT baseline): L_CLIP alone; returns (total, detached terms)."""
    clip = clip_loss(batch.image, batch.text, logit_scale)
    return clip, {"clip": clip.detach()}


def inmodal_loss(features: Tensor, augmented_features: Tensor, logit_scale: float | Tensor) -> Tensor:
    """One modality's self-supervised InfoNCE: row i (original view) against all augmented views, i positive."""
    logits = logit_scale * features @ augmented_features.T
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def cleanclip_loss(batch: FeatureBatch, logit_scale: float | Tensor, *, clip_weight: float = DEFAULT_CLIP_WEIGHT,
                   inmodal_weight: float = DEFAULT_INMODAL_WEIGHT) -> tuple[Tensor, dict[str, Tensor]]:
    """CleanCLIP: lambda1 * L_CLIP(original views) + lambda2 * (L_ss(images) + L_ss(texts)) / 2.

    As in the official CleanCLIP src/train.py: the cross-modal loss pairs the original views, and each in-modal
    loss is one cross-entropy of original rows against augmented columns, the two averaged.
    """
    if batch.augmented is None:
        raise ValueError("CleanCLIP's loss needs the features of its augmented view")
    clip = clip_loss(batch.image, batch.text, logit_scale)
    inmodal_img = inmodal_loss(batch.image, batch.augmented[0], logit_scale)
    inmodal_txt = inmodal_loss(batch.text, batch.augmented[1], logit_scale)
    inmodal = (inmodal_img + inmodal_txt) / 2
    total = clip_weight * clip + inmodal_weight * inmodal
    terms = {"clip": clip, "inmodal_img": inmodal_img, "inmodal_txt": inmodal_txt, "inmodal": inmodal}
    return total, {name: value.detach() for name, value in terms.items()}


def par_cleanclip_loss(batch: FeatureBatch, logit_scale: float | Tensor, *, tau: float = DEFAULT_TAU,
                       clip_weight: float = DEFAULT_CLIP_WEIGHT,
                       inmodal_weight: float = DEFAULT_INMODAL_WEIGHT) -> tuple[Tensor, dict[str, Tensor]]:
    """PAR's perturbation on top of CleanCLIP (not in the paper; a variant measured beside it):
    L_CleanCLIP - L_PERT, the distance taken on the original views against the frozen reference."""
    cleanclip, terms = cleanclip_loss(batch, logit_scale, clip_weight=clip_weight, inmodal_weight=inmodal_weight)
    pert, distances = perturbation(batch, tau)
    return cleanclip - pert, {**terms, **{name: value.detach() for name, value in distances.items()},
                              "pert": pert.detach()}
