"""parclean/command.py: the options every command shares, and one line and exit status 2 for a fixable error."""

from __future__ import annotations

import argparse

import pytest

from parclean.command import ERROR_STATUS, add_config_options, run_command, set_overrides
from parclean.config import ConfigError


def test_the_shared_options_give_the_config_the_overrides_and_the_out_folder():
    parser = argparse.ArgumentParser()
    add_config_options(parser, config_help="recipe", out_help="output folder")
    args = parser.parse_args(["--config", "c.yaml", "--set", "tau=1.5", "--set", "data.num_workers=2", "--out", "o"])
    assert (args.config, args.out) == ("c.yaml", "o")
    assert set_overrides(args) == {"tau": 1.5, "data.num_workers": 2}


def test_a_missing_required_config_is_an_argument_error_and_a_default_makes_it_optional():
    required = argparse.ArgumentParser()
    add_config_options(required, config_help="recipe")
    with pytest.raises(SystemExit):
        required.parse_args([])
    defaulted = argparse.ArgumentParser()
    add_config_options(defaulted, config_help="recipe", config_default="demo.yaml", out_help="out", out_default="o")
    assert vars(defaulted.parse_args([])) == {"config": "demo.yaml", "set": [], "out": "o"}


def test_a_fixable_error_becomes_one_line_naming_the_command_and_status_2(capsys):
    def bad_config() -> int:
        raise ConfigError("c.yaml: unknown setting(s) tua")

    assert run_command("parclean clean", bad_config) == ERROR_STATUS
    assert capsys.readouterr().err == "parclean clean: error: c.yaml: unknown setting(s) tua\n"
    assert run_command("parclean clean", lambda: None) == 0
    with pytest.raises(ConfigError):
        run_command("parclean clean", bad_config, verbose=True)


def test_a_bug_is_not_turned_into_a_line():
    def bug() -> int:
        raise KeyError("no such key")

    with pytest.raises(KeyError):
        run_command("parclean clean", bug)
