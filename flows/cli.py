"""The `parclean` command line: one subcommand per stage; each parses arguments and calls the stage."""

from __future__ import annotations

import argparse
import logging
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with `add_arguments(parser)` and `run(args)`, one-line help)
    "generate": ("generation.command", "generate caption-image WebDataset shards with a diffusers pipeline"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parclean", description="Data-free backdoor cleaning for CLIP (PAR).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = __import__(module_name, fromlist=["add_arguments"])
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = __import__(SUBCOMMANDS[args.command][0], fromlist=["run"])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as err:
        # Clear one-line errors for people; tracebacks only with --verbose.
        if args.verbose:
            raise
        print(f"parclean {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
