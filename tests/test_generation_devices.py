"""Generation over several devices: one worker process per device writes the same shards as one worker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from generation.config import GenerateConfig
from generation.run import generate_shards
from generation.workers import worker_devices
from parclean.shards import read_manifest, verify_shards


def tiny_config(model: Path, **changes) -> GenerateConfig:
    settings = dict(model=str(model), bank="toyworld", seed=3, num_samples=10, shard_size=4, batch_size=4, steps=2,
                    height=32, width=32, device="cpu", dtype="fp32", image_format="png")
    return GenerateConfig(**{**settings, **changes})


def shard_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.tar"))}


def test_two_cpu_workers_write_the_same_shards_as_one(tiny_sd_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_sd_dir)
    one = generate_shards(cfg, tmp_path / "one", progress=False, devices=["cpu"])
    two = generate_shards(cfg, tmp_path / "two", progress=False, devices=["cpu", "cpu"])
    assert (one["workers"], two["workers"]) == (["cpu"], ["cpu", "cpu"])
    assert two["shards_written"] == 3 and two["images_generated"] == 10
    assert shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "one") and len(shard_hashes(tmp_path / "one")) == 3
    assert read_manifest(tmp_path / "two")["shards"] == read_manifest(tmp_path / "one")["shards"]
    assert verify_shards(tmp_path / "two", deep=True) == []
    # A rerun with another number of workers resumes the same set: nothing to do, nothing loaded.
    again = generate_shards(cfg, tmp_path / "two", progress=False, devices="cpu,cpu,cpu")
    assert (again["shards_written"], again["shards_skipped"]) == (0, 3)


def test_devices_auto_is_every_visible_gpu_or_the_configured_device() -> None:
    gpus = torch.cuda.device_count()
    expected = [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else ["auto"]
    assert worker_devices("auto") == expected
    assert worker_devices("cpu") == ["cpu"]  # an explicit device is one worker
    assert worker_devices("cuda:1") == ["cuda:1"]
    assert worker_devices("auto", ["cpu", "cpu"]) == ["cpu", "cpu"]
    assert worker_devices("auto", "cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    for bad in ([], ["gpu0"], "cuda:0,tpu"):
        with pytest.raises(ValueError, match="devices=.*give auto, or a list of cpu, cuda, cuda:N or mps"):
            worker_devices("auto", bad)


def test_a_missing_model_is_named_before_any_worker_starts_or_file_is_written(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"model '{missing}': no such folder"):
        generate_shards(tiny_config(missing), tmp_path / "out", progress=False, devices=["cpu", "cpu"])
    assert not (tmp_path / "out" / "config.yaml").exists()
