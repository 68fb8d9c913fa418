"""parclean/eval_sets.py: eval sets found by name through the entry points that pyproject.toml declares."""

from __future__ import annotations

import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from cleaning.report import EvalConfig, load_images
from parclean.eval_sets import ENTRY_POINT_GROUP, eval_set_names, load_eval_set
from toyworld.render import classes, eval_set

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_declares_the_toy_world_eval_set_as_an_importable_function():
    section = PYPROJECT.read_text().split(f'[project.entry-points."{ENTRY_POINT_GROUP}"]')[1].split("\n[")[0]
    target = re.search(r'^toyworld = "([\w.:]+)"$', section, re.MULTILINE).group(1)
    maker = EntryPoint("toyworld", target, ENTRY_POINT_GROUP).load()
    data = maker(5, 32)
    assert data.images.shape == (5, 3, 32, 32) and data.classnames == classes()


def test_the_installed_toy_world_eval_set_is_the_rendered_one_in_zero_to_one():
    assert "toyworld" in eval_set_names()
    data = load_eval_set("toyworld", 20, 32)
    images, labels = eval_set(20, 32)
    assert torch.equal(data.labels, torch.from_numpy(labels))
    assert torch.equal(data.images, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def test_an_eval_config_reads_a_named_set_and_keeps_its_own_class_names():
    names = tuple(f"class {i}" for i in range(len(classes())))
    data = load_images(EvalConfig(data="toyworld", count=8, classnames=names), 32)
    assert data.classnames == names and len(data.labels) == 8


def test_an_unknown_name_fails_with_the_registered_names(tmp_path):
    with pytest.raises(ValueError, match="registered eval sets: .*toyworld"):
        load_eval_set("no-such-set", 4, 32)
    with pytest.raises(FileNotFoundError, match="registered eval sets"):
        load_images(EvalConfig(data=str(tmp_path / "missing")), 32)
