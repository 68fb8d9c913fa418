"""Shared fixtures: keep this file small; fixtures used by one test file live in that file."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Prefect reads its settings when it is first imported: give this test session its own PREFECT_HOME (profiles,
# local result storage) before any test module imports it, so tests never touch ~/.prefect or a user's server.
if "prefect" not in sys.modules:
    _PREFECT_HOME = tempfile.mkdtemp(prefix="parclean-test-prefect-home-")
    atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
    os.environ["PREFECT_HOME"] = _PREFECT_HOME
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # What `parclean` sets before it imports Prefect (flows/serve.py): tests that call its main() in this process
    # start the temporary server under Prefect's settings as read here, and 20 s timed out beside the other worker.
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
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


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP checkpoint ("tiny-test", seed 0: the organism's shape at 32 px), saved once; read only."""
    from parclean.models import create_model, save_model

    return save_model(create_model("tiny-test", seed=0), tmp_path_factory.mktemp("tiny-clip") / "model.safetensors")


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """toy_shards(count, seed, shard_size): the toy-world shard set of those sizes, written once per session;
    read only (a test that damages shards copies them first)."""
    made: dict[tuple[int, int, int], Path] = {}

    def make(count: int, seed: int, shard_size: int) -> Path:
        if (count, seed, shard_size) not in made:
            from toyworld.make_shards import write_toy_shards

            folder = tmp_path_factory.mktemp(f"toy-shards-{count}-seed-{seed}-of-{shard_size}-")
            write_toy_shards(folder, count, seed=seed, shard_size=shard_size, progress=False)
            made[count, seed, shard_size] = folder
        return made[count, seed, shard_size]

    return make


@pytest.fixture(scope="session")
def toy_clip():
    """The organism's CLIP architecture (text: width 128, 3 layers, context 24), random weights, and its layer
    norms moved off their (1, 0) init so a mix-up of weight and bias or of q/k/v cannot cancel out."""
    import torch

    from parclean.models import create_model

    loaded = create_model("toy-vit-32", seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "ln" in name or "bias" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return loaded


@pytest.fixture(scope="module")
def toy():
    """The packaged toy-world prompt bank."""
    from prompts.bank import load_bank

    return load_bank("toyworld")


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """write_file(name, text): a file of that name and text in the test's tmp_path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
