"""prompts/bank.py: the packaged banks, text banks, the Bank value, and the errors of bad banks."""

from __future__ import annotations

import collections
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

from prompts.bank import Bank, BankError, load_bank, packaged_bank_names, template_slots
from prompts.expand import Caption, combination_count, expand, random_caption

# The toy world's vocabulary, as docs/HELPERS.md defines it (order matters: renderers index these lists).
TOY_SLOTS = {
    "shape": ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "heart", "arrow", "moon"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"),
    "background": ("black", "white", "gray", "brown", "navy"),
    "size": ("small", "large"),
    "position": ("top left", "top right", "bottom left", "bottom right", "center"),
}


def imagenet_classnames() -> tuple[str, ...]:
    """open_clip's class names, read from its data module without importing open_clip (and torch: 5 s)."""
    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("zero_shot_metadata", Path(package_dir, "zero_shot_metadata.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.IMAGENET_CLASSNAMES)


@pytest.fixture(scope="module")
def general() -> Bank:
    return load_bank("general")


def concept_counts(captions: list[Caption]) -> collections.Counter:
    return collections.Counter(c.concept for c in captions)


# --- packaged banks -------------------------------------------------------------------------------------------


def test_packaged_banks_are_listed():
    assert {"toyworld", "general"} <= set(packaged_bank_names())


def test_toy_bank_matches_the_toy_world_vocabulary(toy):
    assert dict(toy.slots) == TOY_SLOTS
    assert list(toy.slots) == list(TOY_SLOTS)
    assert toy.concept == "shape" and toy.concepts == TOY_SLOTS["shape"]
    assert 4 <= len(toy.templates) <= 6
    for template in toy.templates:  # a caption must describe its whole image
        assert sorted(template_slots(template)) == sorted(TOY_SLOTS), template
    assert combination_count(toy) == len(toy.templates) * 10 * 8 * 5 * 2 * 5


def test_general_bank_has_the_imagenet_classes_and_5000_distinct_captions(general):
    assert general.concept == "object"
    objects = general.slots["object"]
    assert len(objects) == 1000 and len(set(objects)) == 1000
    # open_clip's names, except two repeats it has, renamed after their WordNet synsets.
    differ = [i for i, (ours, theirs) in enumerate(zip(objects, imagenet_classnames(), strict=True)) if ours != theirs]
    assert differ == [744, 836]
    assert "Geoffroy's spider monkey" in objects and "potter's wheel" in objects
    captions = expand(general, 5000, seed=0)
    assert len({c.text for c in captions}) == 5000
    assert set(concept_counts(captions).values()) == {5}
    assert len(concept_counts(captions)) == 1000
    assert combination_count(general) > 1_000_000


# --- text banks -------------------------------------------------------------------------------------------------


def test_text_bank(write_file):
    path = write_file("mine.txt", "# my captions\n\na red bus\n  a dog on a sofa  \n# end\na {brace} ok\n")
    bank = load_bank(path)
    assert bank.name == "mine" and bank.concept is None and bank.templates == ()
    assert bank.captions == ("a red bus", "a dog on a sofa", "a {brace} ok")
    captions = expand(bank, 3, seed=0)
    assert sorted((c.prompt_id, c.text) for c in captions) == [
        ("line3", "a red bus"), ("line4", "a dog on a sofa"), ("line6", "a {brace} ok")
    ]
    assert all(c.concept is None for c in captions)
    assert captions == expand(bank, 3, seed=0)
    with pytest.raises(BankError, match=r"mine.txt.*at most 3 distinct captions, asked for 4"):
        expand(bank, 4, seed=0)
    assert len(expand(bank, 10, seed=0, allow_duplicates=True)) == 10
    with pytest.raises(BankError, match="has no templates"):
        random_caption(bank, {}, np.random.default_rng(0))


# --- the Bank value ------------------------------------------------------------------------------------------------


def test_bank_is_read_only_and_picklable(toy):
    with pytest.raises(TypeError):
        toy.slots["shape"] = ("blob",)
    with pytest.raises(AttributeError):
        toy.concept = "color"
    again = pickle.loads(pickle.dumps(toy))
    assert again == toy and hash(again) == hash(toy)
    assert expand(again, 50, seed=0) == expand(toy, 50, seed=0)


# --- bad banks --------------------------------------------------------------------------------------------------

GOOD_HEAD = "name: bad\nconcept: shape\n"
BAD_BANKS = {
    "bad YAML": ("templates: [\"a {shape}\"\nslots:\n  shape: [a, b\n", r"line \d+: not valid YAML"),
    "undefined slot": (
        GOOD_HEAD + "templates:\n  - \"a {shape}\"\n  - \"a {colour} {shape}\"\nslots:\n  shape: [a, b]\n",
        r"line 5: template 'a \{colour\} \{shape\}' uses undefined slot\(s\) colour",
    ),
    "empty slot": (
        GOOD_HEAD + "templates: [\"a {color} {shape}\"]\nslots:\n  shape: [a, b]\n  color: []\n",
        r"line 6: slot 'color' needs a non-empty list",
    ),
    "concept not a slot": (
        "concept: kind\ntemplates: [\"a {shape}\"]\nslots:\n  shape: [a, b]\n",
        r"line 1: concept 'kind' is not a slot",
    ),
    "duplicate slot value": (
        GOOD_HEAD + "templates: [\"a {shape}\"]\nslots:\n  shape:\n    - a\n    - b\n    - a\n",
        r"line 8: slot 'shape' lists 'a' twice",
    ),
    "unknown key": (
        GOOD_HEAD + "templates: [\"a {shape}\"]\nslot:\n  shape: [a, b]\n",
        r"line 4: unknown key 'slot'",
    ),
    "template without the concept": (
        GOOD_HEAD + "templates:\n  - \"a {shape}\"\n  - \"a thing\"\nslots:\n  shape: [a, b]\n",
        r"line 5: template 'a thing' does not use the concept slot",
    ),
    "malformed placeholder": (
        GOOD_HEAD + "templates: [\"a {shape:>5}\"]\nslots:\n  shape: [a, b]\n",
        r"line 3: template .* must be a plain slot name",
    ),
    "duplicate slot name": (
        GOOD_HEAD + "templates: [\"a {shape}\"]\nslots:\n  shape: [a]\n  shape: [b]\n",
        r"line 6: duplicate key 'shape'",
    ),
    "missing templates": ("slots:\n  shape: [a]\n", r"missing 'templates'"),
    "not a mapping": ("- a\n- b\n", r"expected a mapping"),
}


@pytest.mark.parametrize("case", list(BAD_BANKS))
def test_bad_bank_names_file_and_line(write_file, case):
    text, pattern = BAD_BANKS[case]
    path = write_file("broken.yaml", text)
    with pytest.raises(BankError, match=pattern) as err:
        load_bank(path)
    assert str(err.value).startswith(str(path))


def test_duplicate_text_caption_names_both_lines(write_file):
    path = write_file("dup.txt", "a cat\n# x\na dog\na cat\n")
    with pytest.raises(BankError, match=r"dup.txt: line 4: duplicate caption 'a cat' \(first on line 1\)"):
        load_bank(path)


def test_empty_text_bank(write_file):
    with pytest.raises(BankError, match=r"empty.txt: no captions"):
        load_bank(write_file("empty.txt", "# nothing\n\n"))


def test_missing_bank_lists_packaged_banks(tmp_path):
    with pytest.raises(BankError, match=r"nosuch.*not found.*general.*toyworld"):
        load_bank("nosuch")
    with pytest.raises(BankError, match=r"missing.yaml: prompt bank not found"):
        load_bank(tmp_path / "missing.yaml")


def test_unknown_bank_suffix(write_file):
    with pytest.raises(BankError, match=r"bank.json: unknown bank type"):
        load_bank(write_file("bank.json", "{}"))


def test_a_missing_bank_path_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BankError) as error:
        load_bank("banks/missing.yaml")
    assert str(error.value).startswith(f"banks/missing.yaml: prompt bank not found (looked for {tmp_path}/banks/"
                                       "missing.yaml: relative paths start at the working directory); give")
