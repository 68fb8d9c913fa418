"""A process-wide stop request. The command layer sets it when SIGTERM or Ctrl-C arrives; work that runs in
worker threads (generation shards under Prefect's thread task runner), which signals never reach, checks it
between batches, so that a stopped run ends within a batch instead of finishing every shard it had started."""

from __future__ import annotations

import threading

_requested = threading.Event()


class StopRequested(RuntimeError):
    """Raised by `check` in a worker thread once the process was asked to stop."""


def request() -> None:
    _requested.set()


def clear() -> None:
    _requested.clear()


def check(where: str) -> None:
    if _requested.is_set():
        raise StopRequested(f"{where}: stopped (the process was asked to stop)")
