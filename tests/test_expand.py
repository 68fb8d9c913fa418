"""prompts/expand.py: deterministic, balanced, distinct expansion of a bank into captions."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prompts import expand as expand_module
from prompts.bank import BankError, load_bank
from prompts.expand import Caption, expand, fill, random_caption

REPO = Path(__file__).resolve().parents[1]

# The toy world's vocabulary, as docs/HELPERS.md defines it (order matters: renderers index these lists).
TOY_SLOTS = {
    "shape": ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "heart", "arrow", "moon"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"),
    "background": ("black", "white", "gray", "brown", "navy"),
    "size": ("small", "large"),
    "position": ("top left", "top right", "bottom left", "bottom right", "center"),
}


def concept_counts(captions: list[Caption]) -> collections.Counter:
    return collections.Counter(c.concept for c in captions)


# --- expansion --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bank_name,count", [("toyworld", 2000), ("general", 3000)])
def test_expand_is_deterministic_and_seed_dependent(bank_name, count):
    bank = load_bank(bank_name)
    first = expand(bank, count, seed=7)
    assert first == expand(load_bank(bank_name), count, seed=7)
    other = expand(bank, count, seed=8)
    assert sum(a.text == b.text for a, b in zip(first, other, strict=True)) < count // 10
    assert [c.index for c in first] == list(range(count))


def test_expand_is_the_same_in_another_process_with_another_hash_seed(toy):
    code = (
        "import json; from prompts.bank import load_bank; from prompts.expand import expand; "
        "print(json.dumps([c.prompt_id for c in expand(load_bank('toyworld'), 300, seed=3)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [c.prompt_id for c in expand(toy, 300, seed=3)]


def test_expand_golden_prompt_ids(toy):
    # The caption list is a contract (bank, count, seed) -> captions; changing the algorithm changes datasets.
    ids = [c.prompt_id for c in expand(toy, 3, seed=0)]
    assert ids == [
        "t2-shape4-color0-background4-size0-position4",
        "t1-shape6-color0-background2-size1-position4",
        "t0-shape2-color1-background4-size1-position3",
    ]


@pytest.mark.parametrize("bank_name", ["toyworld", "general"])
def test_shorter_list_is_a_prefix_of_longer(bank_name):
    bank = load_bank(bank_name)
    assert expand(bank, 333, seed=1) == expand(bank, 2500, seed=1)[:333]


def test_full_toy_expansion_is_distinct_and_exactly_balanced(toy):
    captions = expand(toy, 20_000, seed=0)
    assert len({c.text for c in captions}) == 20_000
    assert len({c.prompt_id for c in captions}) == 20_000
    assert set(concept_counts(captions).values()) == {2000}


@pytest.mark.parametrize("count", [1, 9, 1234, 5555])
def test_every_prefix_is_balanced_over_concepts(toy, count):
    captions = expand(toy, count, seed=4)
    for end in (count, count // 2, count // 3 + 1):
        counts = concept_counts(captions[:end])
        sizes = [counts.get(shape, 0) for shape in TOY_SLOTS["shape"]]
        assert max(sizes) - min(sizes) <= 1, (end, sizes)


def test_prompt_id_names_the_combination(toy):
    for caption in expand(toy, 200, seed=2):
        template, *parts = caption.prompt_id.split("-")
        values = {}
        for part in parts:
            name, index = re.fullmatch(r"([a-z]+)(\d+)", part).groups()
            values[name] = toy.slots[name][int(index)]
        assert fill(toy.templates[int(template[1:])], values) == caption.text
        assert values["shape"] == caption.concept


def test_too_many_captions_says_how_many_the_bank_can_give(toy):
    with pytest.raises(BankError, match=r"at most 20000 distinct captions.*asked for 20001") as err:
        expand(toy, 20_001, seed=0)
    assert "toyworld.yaml" in str(err.value)


def test_allow_duplicates_goes_past_the_distinct_limit_and_stays_balanced(toy):
    captions = expand(toy, 20_500, seed=5, allow_duplicates=True)
    assert len(captions) == 20_500
    assert len({c.text for c in captions}) < 20_000
    assert set(concept_counts(captions).values()) == {2050}
    assert captions[:100] == expand(toy, 100, seed=5, allow_duplicates=True)


COLLIDING = """\
concept: c
templates: ["{c} {d}"]
slots:
  c: [u, u v]
  d: [v w, w]
"""


def test_distinct_limit_is_exact_when_texts_collide(write_file):
    # "u" + "v w" and "u v" + "w" are the same text, so "u v" has one distinct caption and "u" two.
    bank = load_bank(write_file("colliding.yaml", COLLIDING))
    captions = expand(bank, 3, seed=0)
    assert sorted(c.text for c in captions) == ["u v v w", "u v w", "u w"]
    assert concept_counts(captions) == {"u": 2, "u v": 1}
    with pytest.raises(BankError, match="at most 3 distinct captions"):
        expand(bank, 4, seed=0)


def test_sampled_banks_report_exhaustion(write_file, monkeypatch):
    monkeypatch.setattr(expand_module, "ENUMERATE_LIMIT", 0)  # sample even this tiny bank
    monkeypatch.setattr(expand_module, "MAX_TRIES", 500)
    bank = load_bank(write_file("colliding.yaml", COLLIDING))
    assert len(expand(bank, 2, seed=0)) == 2
    with pytest.raises(BankError, match=r"colliding.yaml.*no new distinct caption for c '(u|u v)'"):
        expand(bank, 4, seed=0)


@pytest.mark.parametrize("count,seed", [(-1, 0), (1.5, 0), (3, -2), (3, "x")])
def test_bad_count_or_seed(toy, count, seed):
    with pytest.raises(BankError, match="count|seed"):
        expand(toy, count, seed)


# --- captions for rendered images ---------------------------------------------------------------------------------


def test_random_caption_fills_the_given_values(toy):
    values = {"shape": "moon", "color": "cyan", "background": "navy", "size": "large", "position": "top right"}
    rng = np.random.default_rng(0)
    texts = {random_caption(toy, values, rng) for _ in range(200)}
    assert texts == {fill(t, values) for t in toy.templates}  # every template gets picked
    for text in texts:
        assert all(v in text for v in values.values())
    first = [random_caption(toy, values, np.random.default_rng(9)) for _ in range(2)]
    assert first[0] == first[1]
    with pytest.raises(BankError, match="needs a value for slot.*position"):
        fill(toy.templates[0], {k: v for k, v in values.items() if k != "position"})
