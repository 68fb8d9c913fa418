"""Triggers: deterministic, at any resolution, and they change what PAR.md says they change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parclean.attacks import (
    KINDS,
    Trigger,
    apply_trigger,
    patch_size,
    poison_indices,
    target_captions,
    to_float_images,
    to_uint8_images,
)


def images(count: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def user_trigger(tmp_path):
    from PIL import Image

    path = tmp_path / "trigger.png"
    Image.fromarray(np.full((10, 10, 3), (255, 0, 255), np.uint8)).save(path)
    return str(path)


def make(kind: str, user_trigger: str) -> Trigger:
    return Trigger(kind=kind, image=user_trigger if kind.startswith("image_") else None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [32, 64, 224])
def test_every_trigger_is_deterministic_and_in_range(kind, size, user_trigger):
    clean = images(3, size)
    trigger = make(kind, user_trigger)
    once = apply_trigger(clean, trigger, [1, 2, 3])
    again = apply_trigger(clean, trigger, [1, 2, 3])
    assert once.shape == clean.shape
    assert torch.equal(once, again)
    assert once.min() >= 0 and once.max() <= 1
    assert (once - clean).abs().mean() > 1e-3, f"{kind} left the images unchanged"


def test_patch_triggers_touch_only_one_patch():
    clean = images(8)
    trigger = Trigger(kind="badnet", patch_size=8)
    changed = (apply_trigger(clean, trigger, list(range(8))) != clean).any(dim=1)
    for mask in changed:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
    corners = {tuple(torch.nonzero(m)[0].tolist()) for m in changed}
    assert len(corners) > 1, "random location should move the patch between seeds"


def test_corner_location_and_default_patch_scale():
    clean = images(2, 224)
    out = apply_trigger(clean, Trigger(kind="badnet_stripes", location="bottom_right"), [0, 1])
    diff = (out != clean).any(dim=1)
    assert diff[:, -16:, -16:].any() and not diff[:, :-16, :].any() and not diff[:, :, :-16].any()
    assert patch_size(Trigger(kind="badnet"), 224) == 16
    assert patch_size(Trigger(kind="badnet"), 32) == 2


def test_stripes_are_constant_down_each_column():
    out = apply_trigger(torch.zeros(1, 3, 32, 32), Trigger(kind="blended_stripes", alpha=0.5), [5])[0]
    assert torch.equal(out, out[:, :1, :].expand_as(out))
    assert set(out.unique().tolist()) <= {0.0, 0.5}


def test_blend_weight_is_the_papers():
    clean = torch.full((1, 3, 32, 32), 0.5)
    out = apply_trigger(clean, Trigger(kind="blended"), [0])
    # 0.8 * 0.5 + 0.2 * U(0, 1) lies in [0.4, 0.6]
    assert out.min() >= 0.4 - 1e-6 and out.max() <= 0.6 + 1e-6


def test_wanet_is_a_small_smooth_warp():
    clean = images(2)
    out = apply_trigger(clean, Trigger(kind="wanet"), [0, 1])
    assert 1e-3 < (out - clean).abs().mean() < 0.2


def test_official_names_are_aliases():
    assert Trigger(kind="random").kind == "badnet"
    assert Trigger(kind="blended_rs").kind == "blended_stripes"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"kind": "nope"}, "unknown trigger kind"), ({"kind": "image_patch"}, "needs `image`"),
     ({"kind": "image_blend", "image": "/no/such.png"}, "not found"),
     ({"kind": "badnet", "location": "middle"}, "location"), ({"kind": "badnet", "patch_size": 0}, "patch_size=0"),
     ({"kind": "blended", "alpha": 1.5}, "alpha=1.5"), ({"kind": "wanet", "warp_grid": 1}, "warp_grid=1")],
)
def test_bad_triggers_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trigger(**kwargs)


def test_poison_indices_rate_and_seed():
    chosen = poison_indices(10_000, 0.01, seed=3)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert np.array_equal(chosen, poison_indices(10_000, 0.01, seed=3))
    assert not np.array_equal(chosen, poison_indices(10_000, 0.01, seed=4))
    with pytest.raises(ValueError):
        poison_indices(10, 1.5, seed=0)


def test_target_captions_name_the_target():
    captions = target_captions("banana", 50, seed=0)
    assert all("banana" in c for c in captions) and len(set(captions)) > 5


def test_uint8_round_trip():
    raw = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8_images(to_float_images(raw)), raw)


def test_fixed_pattern_is_the_same_for_every_image_but_moves():
    clean = torch.zeros(2, 3, 32, 32)
    fixed = apply_trigger(clean, Trigger(kind="blended", fixed=True, seed=3), [0, 1])
    assert torch.equal(fixed[0], fixed[1])
    fresh = apply_trigger(clean, Trigger(kind="blended"), [0, 1])
    assert not torch.equal(fresh[0], fresh[1])
    patches = apply_trigger(torch.full((4, 3, 32, 32), 0.5), Trigger(kind="badnet_stripes", patch_size=8, fixed=True),
                            [0, 1, 2, 3])
    corners = [tuple(torch.nonzero((p != 0.5).any(dim=0)).min(dim=0).values.tolist()) for p in patches]
    values = [p[:, (p != 0.5).any(dim=0)].reshape(3, 8, 8) for p in patches]
    assert all(torch.equal(values[0], v) for v in values[1:])  # the same pattern...
    assert len(set(corners)) == 4  # ...at another place in each image


def test_a_missing_trigger_image_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        Trigger(kind="image_patch", image="triggers/logo.png")
    assert str(error.value) == (f"triggers/logo.png: trigger image not found (looked for {tmp_path}/triggers/logo.png: "
                                "relative paths start at the working directory)")
