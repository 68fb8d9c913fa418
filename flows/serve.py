"""`parclean serve`: the data-free pipeline as a Prefect deployment on its cron schedule; `parclean run`: once, now.

    prefect server start                                   # UI and API at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api parclean serve --config configs/pipeline/nightly.yaml

Prefect is imported inside the functions: `parclean --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from parclean.command import add_config_options, set_overrides
from parclean.config import load_config

logger = logging.getLogger(__name__)

# The stages' own loggers, sent to the Prefect API too (so their lines show under each run in the UI).
STAGE_LOGGERS = "generation,cleaning,prompts,flows"


def prepare_logging() -> None:
    """Before Prefect is imported: stage logs to the Prefect UI; no line per HTTP request on the console."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", STAGE_LOGGERS)
    # Their lines outside a flow run (serve's own) go to the terminal only, without a warning each.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # The temporary server's first start migrates a database: Prefect's 20 s default is too short on a busy CPU.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, config_help="pipeline config with a schedule, e.g. configs/pipeline/nightly.yaml",
                       set_help="override a setting for every scheduled run, e.g. --set clean.steps=600 "
                                "(repeatable)")
    parser.add_argument("--name", help="deployment name (default: the config's schedule.deployment)")


def run(args: argparse.Namespace) -> int:
    """Register the deployment `data-free-clean/<name>` with its cron schedule and run its flow runs until ^C."""
    prepare_logging()
    deployment = build_deployment(args.config, set_overrides(args), args.name)
    from flows.config import PipelineConfig
    from flows.preflight import preflight

    preflight(load_config(PipelineConfig, args.config, set_overrides(args)))  # what each run will need, checked now
    if not os.environ.get("PREFECT_API_URL"):
        logger.warning("PREFECT_API_URL is not set: serving against a temporary server that stops with this "
                       "process. Start `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api "
                       "to keep runs, schedules and the UI")
    serve_until_stopped(deployment)
    return 0


def serve_until_stopped(deployment) -> None:
    """Prefect's `serve` for one deployment, stopped by Ctrl-C or SIGTERM alike: its schedule is paused on the
    way out, and a run in progress is stopped with the runner."""
    import asyncio

    from prefect.runner import Runner

    class _Runner(Runner):
        def handle_sigterm(self, *args: object, **kwargs: object) -> None:
            # Prefect's own handler calls the async stop() without awaiting it; unwind as Ctrl-C does instead.
            raise KeyboardInterrupt

    runner = _Runner(pause_on_shutdown=True)
    runner.add_deployment(deployment)
    schedules = ", ".join(s.schedule.cron for s in deployment.schedules)
    logger.info("serving data-free-clean/%s (cron %s); Ctrl-C or SIGTERM stops", deployment.name, schedules)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        logger.info("stopped serving data-free-clean/%s; its schedule is paused until it is served again",
                    deployment.name)


def build_deployment(config: str | Path, overrides: dict | None = None, name: str | None = None):
    """The RunnerDeployment of data_free_clean for `config` (checked first; it must have a schedule)."""
    from prefect.schedules import Cron

    from flows.config import PipelineConfig
    from flows.pipeline import data_free_clean_flow

    path = Path(config).resolve()
    cfg = load_config(PipelineConfig, path, overrides)
    if cfg.schedule is None:
        raise ValueError(f"{config}: no schedule to serve; add e.g. `schedule: {{cron: '0 2 * * *'}}`, or run it "
                         f"once with `parclean run --config {config}`")
    return data_free_clean_flow.to_deployment(
        name=name or cfg.schedule.deployment,
        schedule=Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone),
        parameters={"pipeline_config": str(path), "overrides": overrides or None},
        description=f"data-free PAR cleaning of {cfg.model} ({path.name})",
        tags=["parclean"],
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, config_help="pipeline config, e.g. configs/pipeline/demo.yaml",
                       set_help="override a setting, e.g. --set out=runs/x --set generate.num_samples=500 "
                                "(repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="write into out even if it holds another kind of "
                        "output")
    parser.add_argument("--dry-run", action="store_true", help="check the config, models, data, eval set, triggers "
                        "and outputs, print a summary and exit (0: ready, 2: one line naming the problem)")


def run_once(args: argparse.Namespace) -> int:
    """Run data_free_clean once (or only its preflight); print the before/after table and the report's path."""
    if args.dry_run:
        return dry_run(args.config, set_overrides(args), args.overwrite)
    return run_pipeline(args.config, set_overrides(args), f"parclean run --config {args.config}", args.overwrite)


def dry_run(config: str, overrides: dict, overwrite: bool) -> int:
    """The pipeline's preflight alone: the summary on stdout, nothing written."""
    from flows.config import PipelineConfig
    from flows.preflight import preflight

    lines = preflight(load_config(PipelineConfig, config, overrides), overwrite=overwrite)
    print(f"{config}: ready to run")
    print("\n".join(f"  {line}" for line in lines))
    return 0


def run_pipeline(config: str, overrides: dict, command: str, overwrite: bool) -> int:
    """Run data_free_clean once under an output lock held for `command`; print the before/after table."""
    from flows.config import PipelineConfig
    from flows.preflight import preflight

    cfg = load_config(PipelineConfig, config, overrides)  # a bad config fails here, before Prefect starts
    for line in preflight(cfg, overwrite=overwrite):  # and a missing model or eval set, before any shard
        logger.info("preflight: %s", line)
    prepare_logging()
    from cleaning.report import before_after_table
    from flows.pipeline import data_free_clean_flow, pipeline_outputs_locked

    with pipeline_outputs_locked(cfg, command, overwrite):
        report = data_free_clean_flow(config, overrides, overwrite)
    print(before_after_table(report))
    print(f"report: {report}")
    return 0
