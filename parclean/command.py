"""The one door of every command: --config/--set/--out declared once, and errors turned into one line and exit 2.

Configs resolve through parclean.config.load_config (the one resolver); the options here only collect its
inputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parclean.config import parse_override

# What a person can fix: a bad config or argument (ValueError, ConfigError, ShardError), a missing or unreadable
# file (OSError), a loss that became NaN (FloatingPointError: cleaning.train.NonFiniteLoss).
COMMAND_ERRORS = (ValueError, OSError, FloatingPointError)
ERROR_STATUS = 2
SET_HELP = "override a setting, e.g. --set seed=1 (repeatable; dotted keys for groups: data.num_workers=4)"


def add_config_options(parser: argparse.ArgumentParser, *, config_help: str, config_required: bool = True,
                       config_default: str | None = None, config_flag: str = "--config", set_help: str = SET_HELP,
                       out_help: str | None = None, out_default: str | None = None, out_type: type = str) -> None:
    """The config option (`args.config`; required unless optional or defaulted), repeatable --set KEY=VALUE and,
    given out_help, --out (required unless defaulted)."""
    parser.add_argument(config_flag, dest="config", required=config_required and config_default is None,
                        default=config_default, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    if out_help is not None:
        parser.add_argument("--out", required=out_default is None, default=out_default, type=out_type, help=out_help)


def set_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The --set options as {dotted key: value} (values read as YAML)."""
    return dict(parse_override(text) for text in args.set)


def script_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a training script: required --config and --out (a folder), repeatable --set."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_options(parser, config_help="YAML config", set_help="override a setting", out_help="output folder",
                       out_type=Path)
    return parser


def run_command(prog: str, command: Callable[[], int | None], *, verbose: bool = False) -> int:
    """command()'s exit status; an error a person can fix becomes `prog: error: ...` on stderr and status 2
    (with verbose, the traceback instead)."""
    try:
        return int(command() or 0)
    except COMMAND_ERRORS as err:
        if verbose:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return ERROR_STATUS
