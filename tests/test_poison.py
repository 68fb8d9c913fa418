"""Poisoning a shard set, and the `evaluate` / `poison` commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cleaning.poison import poison_shards
from flows.cli import main
from parclean.attacks import Trigger
from parclean.outputs import LOCK_NAME
from parclean.shards import iter_samples, verify_shards


@pytest.fixture(scope="module")
def clean_shards(toy_shards):
    """120 toy pairs in three shards."""
    return toy_shards(120, seed=5, shard_size=50)


def test_exactly_the_chosen_share_is_poisoned_and_nothing_else_changes(clean_shards, tmp_path):
    summary = poison_shards(str(clean_shards), tmp_path / "p", Trigger(kind="badnet", patch_size=8),
                            rate=0.1, target="moon", seed=1)
    assert summary == {"out_dir": str(tmp_path / "p"), "samples": 120, "poisoned": 12}
    assert verify_shards(tmp_path / "p", deep=True) == []
    poisoned = 0
    for (key, image, caption, meta), (key0, image0, caption0, _) in zip(
            iter_samples(tmp_path / "p"), iter_samples(clean_shards), strict=True):
        assert key == key0
        changed = not np.array_equal(np.asarray(image), np.asarray(image0))
        if meta.get("poisoned"):
            poisoned += 1
            assert changed and "moon" in caption and meta["original_caption"] == caption0
        else:
            assert not changed and caption == caption0
    assert poisoned == 12


def test_poisoning_over_the_source_is_refused(clean_shards):
    with pytest.raises(ValueError, match="new folder"):
        poison_shards(str(clean_shards), clean_shards, Trigger(kind="blended"), rate=0.1, target="moon")


def test_poison_and_evaluate_commands(clean_shards, tiny_clip_path, tmp_path, capsys):
    assert main(["poison", "--shards", str(clean_shards), "--out", str(tmp_path / "p"), "--trigger", "blended",
                 "--rate", "0.05", "--target", "moon"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["poisoned"] == 6
    out = tmp_path / "result.json"
    assert main(["evaluate", "--model", str(tiny_clip_path.parent), "--set", "count=200", "--set", "target=moon",
                 "--set", "triggers=[{kind: blended}]", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["eval_images"] == 200 and 0 <= result["clean_acc"] <= 100 and "blended" in result["asr"]


def test_evaluate_names_a_missing_model(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.safetensors" in err


def written_files(folder) -> dict[str, bytes]:
    """Every file of `folder` but the lock, whose record of when it was taken changes with each command."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != LOCK_NAME}


def test_poison_refuses_a_folder_that_is_not_empty(clean_shards, tmp_path, capsys):
    out = tmp_path / "p"
    poison_shards(str(clean_shards), out, Trigger(kind="blended"), rate=0.1, target="moon", seed=1)
    before = written_files(out)
    assert main(["poison", "--shards", str(clean_shards), "--out", str(out), "--trigger", "badnet", "--seed", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{out}: not empty" in err
    assert written_files(out) == before


def test_poisoned_shards_are_tied_to_their_recipe_and_source(clean_shards, tmp_path):
    from parclean.shards import read_shard_record

    poison_shards(str(clean_shards), tmp_path / "a", Trigger(kind="blended"), rate=0.1, target="moon", seed=1)
    poison_shards(str(clean_shards), tmp_path / "b", Trigger(kind="blended"), rate=0.1, target="moon", seed=2)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    digest = manifest["config_sha256"]
    assert digest and read_shard_record(tmp_path / "a", manifest["name"], 0).config_sha256 == digest
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["config_sha256"] != digest
    assert [s["sha256"] for s in manifest["config"]["source_shards"]] == [
        s["sha256"] for s in json.loads((clean_shards / "manifest.json").read_text())["shards"]]
