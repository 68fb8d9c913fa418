"""How DataLoader workers are started: from a forkserver, not by forking the calling process.

A forked worker inherits the caller's threads and exit hooks. After a Prefect flow has run in the process (every
stage of the pipeline runs inside one), Prefect's log and event services leave exit hooks that fail in a forked
child, so each worker exited with code 1 as the loader shut it down. A forkserver child starts from a clean
process. (Python 3.14 makes forkserver the default on Linux for the same reason.)
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.context import BaseContext


def worker_context() -> BaseContext | None:
    """The start method for loader workers: forkserver where the platform has it, else the platform's default."""
    if sys.platform.startswith("linux") or sys.platform == "darwin":
        return multiprocessing.get_context("forkserver")
    return None
