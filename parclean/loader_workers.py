"""How DataLoader workers are started: from a forkserver, not by forking the calling process.

A forked worker inherits the caller's threads and exit hooks. After a Prefect flow has run in the process (every
stage of the pipeline runs inside one), Prefect's log and event services leave exit hooks that fail in a forked
child, so each worker exited with code 1 as the loader shut it down. A forkserver child starts from a clean
process. (Python 3.14 makes forkserver the default on Linux for the same reason.)

PARCLEAN_LOADER_START_METHOD=fork|spawn|forkserver chooses another start method (bench/data_loading.py counts
the workers' reads in memory that only forked workers share).
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import BaseContext

START_METHOD_VARIABLE = "PARCLEAN_LOADER_START_METHOD"


def worker_context() -> BaseContext | None:
    """The start method for loader workers: $PARCLEAN_LOADER_START_METHOD, else forkserver where the platform has
    it, else the platform's default."""
    method = os.environ.get(START_METHOD_VARIABLE)
    if method:
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"{START_METHOD_VARIABLE}={method!r}: use one of "
                             f"{', '.join(multiprocessing.get_all_start_methods())}")
        return multiprocessing.get_context(method)
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return None
