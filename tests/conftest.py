"""Shared fixtures: keep this file small; fixtures used by one test file live in that file."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings when it is first imported: give this test session its own PREFECT_HOME (profiles,
# local result storage) before any test module imports it, so tests never touch ~/.prefect or a user's server.
if "prefect" not in sys.modules:
    _PREFECT_HOME = tempfile.mkdtemp(prefix="parclean-test-prefect-home-")
    atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
    os.environ["PREFECT_HOME"] = _PREFECT_HOME
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread per test process: on a 2-core machine that may be running another job, two OpenMP
    threads per op mostly wait for each other (measured 3-10x slower)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion pipeline (32x32 images) saved in the diffusers layout, built once."""
    from generation.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), seed=0, sample_size=32)


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect server and database for the whole session (the first start migrates: allow 90 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
