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


def write_wnid_folder(root: Path, wnids: tuple[str, ...], per_class: int = 2) -> Path:
    """A fake ImageNet layout: ROOT/WNID/WNID_i.JPEG, tiny JPEGs."""
    import numpy as np
    import PIL.Image

    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            PIL.Image.fromarray(np.full((12, 16, 3), 40 * i, dtype=np.uint8)).save(root / wnid / f"{wnid}_{i}.JPEG")
    return root


# tench, goldfish and banana: ImageNet classes 0, 1 and 954 in the standard (sorted WordNet id) order.
WNIDS = ("n01440764", "n01443537", "n07753592")


def test_wordnet_id_folders_get_the_imagenet_class_names_not_their_ids(tmp_path):
    folder = write_wnid_folder(tmp_path / "val", WNIDS)
    data = load_images(EvalConfig(data=str(folder), num_workers=0), 32)
    assert data.classnames == ("tench", "goldfish", "banana") and data.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_classnames_imagenet_puts_wordnet_id_folders_at_their_place_among_the_1000_classes(tmp_path):
    folder = write_wnid_folder(tmp_path / "val", WNIDS)
    data = load_images(EvalConfig(data=str(folder), classnames="imagenet", num_workers=0), 32)
    assert len(data.classnames) == 1000 and data.classnames[954] == "banana"
    assert data.labels.tolist() == [0, 0, 1, 1, 954, 954] and data.images.shape == (6, 3, 32, 32)


def test_an_eval_config_names_imagenet_classes_and_the_openai_templates(tmp_path, write_file):
    from parclean.config import ConfigError, load_config

    config = write_file("imagenet.yaml", "data: /data/imagenet/val\nclassnames: imagenet\ntemplates: openai\n")
    cfg = load_config(EvalConfig, config)
    templates = cfg.template_strings()
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}." and all("{}" in t for t in templates)
    assert load_config(EvalConfig, {"templates": "simple"}).template_strings()[0] == "itap of a {}."
    with pytest.raises(ConfigError,
                       match=r"imagenet.yaml with override templates: templates: 'open_ai': use openai or simple"):
        load_config(EvalConfig, config, {"templates": "open_ai"})
    with pytest.raises(ConfigError,
                       match=r"imagenet.yaml with override classnames: classnames: 'imagenet21k': use imagenet"):
        load_config(EvalConfig, config, {"classnames": "imagenet21k"})


def test_classnames_imagenet_on_folders_that_are_not_imagenet_classes_is_refused(tmp_path):
    folder = tmp_path / "set"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="set: classnames: imagenet needs ImageNet WordNet-id folders .* found 2"):
        load_images(EvalConfig(data=str(folder), classnames="imagenet"), 32)



@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_named_in_one_line_also_from_a_loader_worker(tmp_path, workers):
    folder = write_wnid_folder(tmp_path / "val", WNIDS[:1])
    (folder / WNIDS[0] / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError) as raised:
        load_images(EvalConfig(data=str(folder), num_workers=workers, batch_size=2), 32)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{folder / WNIDS[0] / 'broken.JPEG'}: unreadable image")

@pytest.fixture(scope="module")
def real_clip(tmp_path_factory):
    """A real open_clip architecture (ViT-S-32, 224 px) with random weights, saved in fp16; nothing downloaded."""
    from parclean.models import create_model, save_model

    path = tmp_path_factory.mktemp("vit-s-32") / "model.safetensors"
    return save_model(create_model("ViT-S-32", seed=0), path, dtype=torch.float16)


def test_a_real_clip_is_not_evaluated_on_the_toy_world_unless_asked_to(real_clip, capsys):
    from cleaning.report import measure
    from flows.cli import main
    from parclean.models import load_model

    assert main(["evaluate", "--model", str(real_clip)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("parclean evaluate: error: ViT-S-32 is a real CLIP")
    assert "--eval" in error and "data: toyworld" in error
    assert main(["scan", "--model", str(real_clip)]) == 2  # the same door
    # The flow's before/after steps measure through the same function.
    with pytest.raises(ValueError, match="ViT-S-32 is a real CLIP architecture and no eval data was chosen"):
        measure(load_model(weights=real_clip), EvalConfig())
    capsys.readouterr()
    # Chosen on purpose, the toy world is rendered at the model's 224 px.
    assert main(["evaluate", "--model", str(real_clip), "--set", "data=toyworld", "--set", "count=3"]) == 0
    assert '"eval_images": 3' in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((PYPROJECT.parent / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_eval_config_loads(path):
    from parclean.config import load_config

    cfg = load_config(EvalConfig, path)
    assert cfg.data and cfg.template_strings() and all("{}" in t for t in cfg.template_strings())
