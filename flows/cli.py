"""The `parclean` command line: one subcommand per stage; each parses arguments and calls the stage."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from parclean import console, stop
from parclean.command import run_command

# name: (module:function adding the arguments, module:function running the command, one-line help).
# Modules that add arguments import nothing heavy (the run functions import the stage), so `parclean --help` stays
# quick.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("generation.command:add_arguments", "generation.command:run",
                 "generate caption-image WebDataset shards with a diffusers pipeline"),
    "verify": ("generation.command:add_verify_arguments", "generation.command:run_verify",
               "check a shard set against its manifest: every shard's size and sha256 (--deep: every sample)"),
    "tiny-sd": ("generation.command:add_tiny_arguments", "generation.command:run_tiny",
                "build a tiny random Stable Diffusion pipeline (tests, CPU smoke runs)"),
    "evaluate": ("cleaning.evaluate_command:add_arguments", "cleaning.evaluate_command:run",
                 "zero-shot clean accuracy and attack success rate of a CLIP checkpoint"),
    "scan": ("cleaning.scan_command:add_arguments", "cleaning.scan_command:run",
             "look for a backdoor without knowing its trigger (trigger inversion per class, Neural Cleanse)"),
    "poison": ("cleaning.evaluate_command:add_poison_arguments", "cleaning.evaluate_command:run_poison",
               "poison a shard set with a trigger (to make a model to test a cleaner against)"),
    "clean": ("cleaning.command:add_arguments", "cleaning.train:run",
              "clean a CLIP checkpoint with PAR (or the FT / CleanCLIP baselines) on a shard set"),
    "run": ("flows.serve:add_run_arguments", "flows.serve:run_once",
            "run the data-free pipeline once as a Prefect flow: generate, clean, evaluate, report"),
    "serve": ("flows.serve:add_arguments", "flows.serve:run",
              "serve the data-free pipeline as a Prefect deployment on the config's cron schedule"),
    "demo": ("flows.demo:add_arguments", "flows.demo:run",
             "the whole pipeline offline on the CPU: toy SD -> PAR cleans the BadNet toy CLIP -> report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parclean", description="Data-free backdoor cleaning for CLIP (PAR).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every library's log lines and loading bars, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in SUBCOMMANDS.items():
        function(add_arguments)(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def function(reference: str) -> Callable[..., Any]:
    """The function that "module:name" names (the module imported now)."""
    module_name, name = reference.split(":")
    return getattr(importlib.import_module(module_name), name)


INTERRUPTED, TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # the shell's exit codes for them


def stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: context managers close (Prefect's temporary server stops with this process)."""
    stop.request()
    raise SystemExit(TERMINATED)


def stop_on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C: the default KeyboardInterrupt, and worker threads are told to stop too."""
    stop.request()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore_logging = console.configure(args.verbose)
    command = function(SUBCOMMANDS[args.command][1])
    in_main_thread = threading.current_thread() is threading.main_thread()
    stop.clear()
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, stop_on_sigterm), (signal.SIGINT, stop_on_sigint))} if in_main_thread else {}
    try:
        # One clear line for people; the traceback only with --verbose.
        return run_command(f"parclean {args.command}", lambda: command(args), verbose=args.verbose)
    except (KeyboardInterrupt, SystemExit) as stopped:
        if isinstance(stopped, SystemExit) and stopped.code != TERMINATED:
            raise
        how = "Ctrl-C" if isinstance(stopped, KeyboardInterrupt) else "SIGTERM"
        print(f"parclean {args.command}: stopped by {how}; the same command resumes from the last checkpoint",
              file=sys.stderr)
        return INTERRUPTED if isinstance(stopped, KeyboardInterrupt) else TERMINATED
    finally:
        restore_logging()  # main() may be called again in one process (tests, notebooks)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
