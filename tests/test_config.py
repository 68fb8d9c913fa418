"""parclean/config.py: one resolver for paths, mappings and configs; `base:` includes a recipe by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cleaning.train import CleanConfig
from flows.config import PipelineConfig
from parclean.config import ConfigError, load_config, parse_override, to_dict

REPO = Path(__file__).resolve().parents[1]
RESOLVED = Path(__file__).parent / "data" / "resolved"


@pytest.mark.parametrize("name", ["demo", "demo-blended", "nightly"])
def test_pipeline_configs_that_include_recipes_resolve_to_the_settings_they_copied_before(name):
    # tests/data/resolved/ holds each config as it resolved when it still copied the recipes out in full.
    before = yaml.safe_load((RESOLVED / f"pipeline-{name}.yaml").read_text())
    assert to_dict(load_config(PipelineConfig, REPO / "configs" / "pipeline" / f"{name}.yaml")) == before


def test_a_base_is_read_relative_to_the_including_file_and_the_keys_beside_it_win(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "par.yaml").write_text("objective: par\ntau: 1.0\nsteps: 40\ndata: {num_workers: 0}\n")
    (tmp_path / "run.yaml").write_text("base: recipes/par.yaml\ntau: 1.5\ndata: {shuffle_buffer: 10}\n")
    cfg = load_config(CleanConfig, tmp_path / "run.yaml", {"steps": 50})
    assert (cfg.objective, cfg.tau, cfg.steps) == ("par", 1.5, 50)
    assert (cfg.data.num_workers, cfg.data.shuffle_buffer) == (0, 10)


def test_a_config_that_includes_itself_fails_with_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(CleanConfig, tmp_path / "a.yaml")


def test_a_missing_base_names_the_file_the_base_as_written_and_where_it_looked(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("base: ../recipes/nowhere.yaml\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config(CleanConfig, "configs/run.yaml")
    assert str(error.value) == (f"configs/run.yaml: base: ../recipes/nowhere.yaml not found (looked for "
                                f"{tmp_path}/recipes/nowhere.yaml: a base is read from this file's folder)")
    with pytest.raises(ConfigError) as error:
        load_config(CleanConfig, "configs/missing.yaml")
    assert str(error.value) == (f"configs/missing.yaml: config file not found (looked for {tmp_path}/configs/"
                                "missing.yaml: relative paths start at the working directory)")


def test_mappings_and_configs_resolve_like_files_and_overrides_leave_the_caller_alone():
    settings = {"tau": 1.5, "data": {"num_workers": 0}}
    from_mapping = load_config(CleanConfig, settings, {"data.num_workers": 2})
    assert from_mapping.data.num_workers == 2 and settings["data"]["num_workers"] == 0
    assert load_config(CleanConfig, from_mapping, {"tau": 2.0}).tau == 2.0
    with pytest.raises(ConfigError, match="tau is not a group of settings"):
        load_config(CleanConfig, settings, {"tau.x": 1})


@pytest.mark.parametrize("spelling", ["no", "No", "off", "yes", "on"])
def test_yes_no_on_off_stay_strings_in_string_settings_from_overrides_and_files(spelling, write_file):
    # YAML 1.1 reads these as booleans; a setting typed str must keep what the user wrote.
    key, value = parse_override(f"mixed_precision={spelling}")
    assert (key, value) == ("mixed_precision", spelling)
    from_file = write_file("run.yaml", f"mixed_precision: {spelling}\n")
    if spelling == "no":
        assert load_config(CleanConfig, None, {key: value}).mixed_precision == "no"
        assert load_config(CleanConfig, from_file).mixed_precision == "no"
        return
    # Any other spelling reaches the setting's own check as the string written, from either source.
    with pytest.raises(ConfigError, match=f"override mixed_precision: mixed_precision={spelling!r}: use one of"):
        load_config(CleanConfig, None, {key: value})
    with pytest.raises(ConfigError, match=f"^{from_file}: mixed_precision={spelling!r}: use one of"):
        load_config(CleanConfig, from_file)


def test_bool_settings_still_read_yaml_1_1_spellings_and_true_false():
    for text, expected in [("yes", True), ("On", True), ("true", True), ("no", False), ("off", False),
                           ("False", False)]:
        assert load_config(CleanConfig, None, dict([parse_override(f"augment={text}")])).augment is expected


def test_a_type_mismatch_names_the_override_or_the_file_it_came_from(write_file):
    config = write_file("run.yaml", "steps: 10\ndata: {num_workers: 0}\n")
    with pytest.raises(ConfigError, match=r"^override steps: steps must be int, got 'many'$"):
        load_config(CleanConfig, config, dict([parse_override("steps=many")]))
    with pytest.raises(ConfigError, match=r"^override data.num_workers: data.num_workers must be int, got 'x'$"):
        load_config(CleanConfig, config, {"data.num_workers": "x"})
    bad = write_file("bad.yaml", "steps: many\n")
    with pytest.raises(ConfigError, match=f"^{bad}: steps must be int, got 'many'$"):
        load_config(CleanConfig, bad, {"tau": 1.0})
    with pytest.raises(ConfigError, match=f"^{config} with override tau: .*tau must be positive"):
        load_config(CleanConfig, config, {"tau": -1})
