"""What a parclean terminal shows: by default the stages' own lines and each flow run's start, link and end;
with --verbose every library's INFO lines too (open_clip, Accelerate, Prefect task runs, loading bars)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

# Loggers whose INFO lines are ours and always shown.
OWN_LOGGERS = ("flows", "cleaning", "generation", "prompts", "toyworld", "parclean")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class QuietFilter(logging.Filter):
    """Passes warnings, our INFO lines and Prefect's flow-run lines; drops other libraries' INFO lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS
                or record.name == "prefect.flow_runs")


class NamedRunLines(logging.Filter):
    """Prefect's bare 'Finished in state Completed()' says which run finished: 'task run 'clean' finished:
    Completed()'. On Prefect's run loggers, so the UI's log shows it named too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Finished in state "):
            state = message.removeprefix("Finished in state ").rstrip(".")
            if hasattr(record, "task_run_name"):
                record.msg = f"task run {record.task_run_name!r} finished: {state}"
            else:
                flow = getattr(record, "flow_name", "flow")
                record.msg = f"{flow} run {getattr(record, 'flow_run_name', '?')!r} finished: {state}"
            record.args = ()
        return True


def name_prefect_run_lines() -> None:
    """Attach NamedRunLines to Prefect's run loggers (kept when Prefect configures logging); idempotent."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, NamedRunLines) for f in logger.filters):
            logger.addFilter(NamedRunLines())


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (a test's capture, a redirected stream)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def configure(verbose: bool = False) -> Callable[[], None]:
    """One stderr handler on the root logger, quiet unless `verbose`; loading bars off unless `verbose`.
    Returns the function that puts the root logger back as it was."""
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    if not verbose:
        handler.addFilter(QuietFilter())
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)

    def restore() -> None:
        root.handlers[:], level = before
        root.setLevel(level)

    return restore
