"""The shipped organisms: each loads in seconds and still measures what its card says (issue bar: clean >= 60%,
ASR >= 90%)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cleaning.report import EvalConfig, measure
from parclean.attacks import Trigger
from parclean.models import load_model

ROOT = Path(__file__).parent.parent
MODELS = ROOT / "toyworld" / "models"
POISONED = ["clip-badnet", "clip-badnet-stripes", "clip-blended", "clip-blended-stripes"]


def card(name: str) -> dict:
    return json.loads((MODELS / name / "card.json").read_text())


@pytest.mark.parametrize("name", POISONED)
def test_poisoned_organism_is_accurate_and_backdoored(name):
    info = card(name)
    loaded = load_model(weights=MODELS / name)
    trigger = Trigger(**info["trigger"])
    result = measure(loaded, EvalConfig(count=2000, target=info["target"], triggers=(trigger,)))
    assert result["clean_acc"] >= 60.0
    assert result["asr"][trigger.kind] >= 90.0
    assert abs(result["clean_acc"] - info["clean_acc"]) < 0.5, "card and shipped weights disagree"


def test_clean_organism_is_accurate():
    result = measure(load_model(weights=MODELS / "clip-clean"), EvalConfig(count=2000))
    assert result["clean_acc"] >= 75.0 and abs(result["clean_acc"] - card("clip-clean")["clean_acc"]) < 0.5


V2 = MODELS / "v2"
# The v2 organisms, all in the regime (docs/organism.md lists the tries that were not, with their numbers).
V2_POISONED = ["clip-badnet", "clip-badnet-stripes", "clip-blended", "clip-blended-stripes", "clip-triangles"]


@pytest.mark.parametrize("name", V2_POISONED)
def test_v2_organism_is_backdoored_within_two_points_of_its_base(name):
    """Issue 16's regime: ASR >= 90% and clean accuracy within 2 points of the plateaued base it was fine-tuned from
    (its card's init), on the shipped weights (5,000 images, the organisms' own evaluation set)."""
    info = json.loads((V2 / name / "card.json").read_text())
    base_dir = (ROOT / info["config"]["init"]).parent  # the base it was poisoned from
    base = json.loads((base_dir / "card.json").read_text())
    trigger = Trigger(**info["trigger"])
    result = measure(load_model(weights=V2 / name), EvalConfig(count=5000, target=info["target"], triggers=(trigger,)))
    assert result["asr"][trigger.kind] >= 90.0
    assert result["clean_acc"] >= base["clean_acc"] - 2.0
    assert abs(result["clean_acc"] - info["clean_acc"]) < 0.5, "card and shipped weights disagree"


@pytest.mark.slow
@pytest.mark.parametrize("name", POISONED)
def test_retraining_reproduces_the_card(name, tmp_path):
    """Retrains one organism from its config and seed (about 15-25 minutes on 2 CPU cores each)."""
    from parclean.config import load_config
    from toyworld.train_clip import OrganismConfig, train

    config = ROOT / "configs" / "organism" / f"{name.removeprefix('clip-')}.yaml"
    again = train(load_config(OrganismConfig, config), tmp_path / name)
    assert abs(again["clean_acc"] - card(name)["clean_acc"]) <= 3.0
    assert abs(again["asr"] - card(name)["asr"]) <= 3.0


@pytest.mark.parametrize("script", ["train_clip", "train_sd"])
def test_training_scripts_name_a_bad_config_in_one_line(script, tmp_path, capsys):
    import importlib

    bad = tmp_path / "organism.yaml"
    bad.write_text("steps: [not, a, number]\n")
    main = importlib.import_module(f"toyworld.{script}").main
    assert main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]) == 2
    prefix = f"python -m toyworld.{script}: error: "
    assert capsys.readouterr().err == f"{prefix}{tmp_path / 'missing.yaml'}: config file not found\n"
    assert main(["--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prefix}{bad}") and "steps" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
