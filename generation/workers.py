"""Where generation runs: one worker per device (every GPU of the node by default), as Dask worker processes.

Shards are independent units (their captions and seeds are fixed by the config), so any worker can write any
shard and the bytes do not depend on which one did. Each worker process holds one pipeline on its own device.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from generation.config import DEVICES, GenerateConfig
from parclean.config import to_dict
from parclean.shards import ShardRecord

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from prompts.expand import Caption

logger = logging.getLogger(__name__)

ShardJob = Callable[..., ShardRecord]  # (cfg, out_dir, index, captions, devices) -> the shard's record

# The settings that decide which pipeline object a process holds; the others (count, seed, ...) do not.
PIPELINE_FIELDS = ("model", "device", "dtype", "scheduler", "compile", "channels_last", "safety_checker")

# One pipeline per worker process, loaded by the first shard that needs it. A diffusers pipeline keeps per-call
# state in its scheduler, so calls on one pipeline are serialised by the lock that comes with it.
_PIPELINES: dict[str, tuple[DiffusionPipeline, threading.Lock]] = {}
_PIPELINES_LOCK = threading.Lock()


def worker_devices(device: str, devices: str | Sequence[str] = "auto") -> list[str]:
    """One entry per generation worker: `devices` as listed, or for "auto" every visible GPU when `device`
    allows several (auto or cuda) and there are several, else just `device`."""
    if isinstance(devices, str):
        if devices != "auto":
            devices = [part.strip() for part in devices.split(",")]
        elif device in ("auto", "cuda") and torch.cuda.device_count() > 1:
            return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
        else:
            return [device]
    devices = list(devices)
    bad = [name for name in devices if not isinstance(name, str) or not DEVICES.match(name)]
    if not devices or bad:
        raise ValueError(f"devices={devices!r}: give auto, or a list of cpu, cuda, cuda:N or mps (one worker each)")
    return devices


def cached_pipeline(cfg: GenerateConfig, device: str | None = None) -> tuple[DiffusionPipeline, threading.Lock]:
    """This process's pipeline for `cfg` on `device` (loaded on first use; another one replaces it) and its lock."""
    from generation.pipeline import load_pipeline

    settings = to_dict(cfg)
    key = json.dumps({**{name: settings[name] for name in PIPELINE_FIELDS}, "on": device}, sort_keys=True)
    with _PIPELINES_LOCK:
        if key not in _PIPELINES:
            _PIPELINES.clear()  # one pipeline per process: device memory holds one
            _PIPELINES[key] = (load_pipeline(cfg, device=device), threading.Lock())
        return _PIPELINES[key]


def this_worker_device(devices: Sequence[str] | None) -> str | None:
    """The device of the Dask worker running this (worker i of a local cluster: devices[i]); devices[0] outside
    a local cluster; None (the config's device) when no devices are given (a remote cluster: one GPU each)."""
    if not devices:
        return None
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not on a Dask worker
        return devices[0]
    return devices[name % len(devices)] if isinstance(name, int) else devices[0]


def local_cluster(n_workers: int):
    """A Dask cluster on this machine: `n_workers` processes of one thread, each holding one pipeline."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.WARNING)


def generate_on_cluster(job: ShardJob, cfg: GenerateConfig, out_dir: str | Path,
                        todo: list[tuple[int, list[Caption]]], *, devices: Sequence[str] | None,
                        address: str | None = None,
                        done: Callable[[int], None] = lambda images: None) -> dict[int, ShardRecord]:
    """Run `job` for each of the `todo` shards on one local worker per device, or on the cluster at `address`
    (each worker on its config device); `done(images)` after each shard. Returns the records by shard index.

    job(cfg, out_dir, index, captions, devices) runs on a worker (generation.run.generate_shard_on_worker)."""
    from distributed import Client, as_completed

    cluster = None if address else local_cluster(len(devices or []) or 1)
    try:
        with Client(address or cluster) as client:
            logger.info("generating %d shards on %d Dask workers (%s)", len(todo), len(client.scheduler_info()
                        ["workers"]), address or ", ".join(devices or []))
            futures = {client.submit(job, cfg, str(out_dir), index, captions,
                                     None if address else list(devices or []), pure=False): index
                       for index, captions in todo}
            records = {}
            for future in as_completed(futures):
                record = future.result()  # a failed shard raises here; finished shards stay on disk
                records[futures[future]] = record
                done(record.count)
            return records
    finally:
        if cluster is not None:
            cluster.close()
