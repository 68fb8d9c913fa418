"""The toy world: deterministic, balanced, captions that describe the image."""

from __future__ import annotations

import numpy as np

from prompts.bank import load_bank
from toyworld.render import classes, eval_set, make_pairs


def test_pairs_are_deterministic_per_seed():
    a_images, a_captions, a_labels = make_pairs(50, seed=7)
    b_images, b_captions, b_labels = make_pairs(50, seed=7)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions and np.array_equal(a_labels, b_labels)
    c_images, _, _ = make_pairs(50, seed=8)
    assert not np.array_equal(a_images, c_images)


def test_captions_name_the_labelled_shape_and_use_the_bank_vocabulary():
    images, captions, labels = make_pairs(300, seed=1, resolution=64)
    assert images.shape == (300, 64, 64, 3) and images.dtype == np.uint8
    bank = load_bank("toyworld")
    assert classes() == tuple(bank.slots["shape"])
    for caption, label in zip(captions, labels, strict=True):
        assert classes()[label] in caption
        assert any(color in caption for color in bank.slots["color"])


def test_classes_are_roughly_balanced_and_the_eval_set_is_fixed():
    _, labels = eval_set(2000)
    counts = np.bincount(labels, minlength=len(classes()))
    assert counts.min() > 150 and counts.max() < 250
    again_images, again_labels = eval_set(2000)
    assert np.array_equal(labels, again_labels)


def test_shape_pixels_have_the_captioned_colour():
    images, captions, _ = make_pairs(20, seed=3)
    # the shape covers a good share of the image and differs from the background
    spread = images.reshape(20, -1, 3).std(axis=1).mean(axis=1)
    assert (spread > 10).all()
