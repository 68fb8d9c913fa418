"""The generation flow: one Prefect task per shard, on a thread pool or a Dask cluster; resumable and idempotent.

The stage (generation/run.py) owns everything about images and shards; this file only wires it: the caption
list is computed once in the flow, each shard is a task that gets its captions and a plain-dict config, and the
manifest is written by a last task. A shard whose done marker and sha256 check out is skipped without loading
the pipeline, so a rerun of a finished flow writes nothing, and a failed or killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import PERSISTED_RESULT
from flows.progress import GenerationWatcher, ImageCounter, artifact_key
from generation.config import GenerateConfig
from generation.run import (
    check_output_folder,
    config_sha256,
    generate_shard,
    record_config,
    run_summary,
    shard_plan,
    write_set_manifest,
)
from generation.workers import cached_pipeline, this_worker_device, worker_devices
from parclean import stop
from parclean.config import ConfigError, load_config
from parclean.shards import shard_is_complete

if TYPE_CHECKING:
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import State
    from prefect.tasks import Task

    from prompts.expand import Caption

logger = logging.getLogger(__name__)

RUNNERS = ("local", "dask")
SHARD_RETRIES = 2
SHARD_RETRY_DELAY_SECONDS = 10.0
PROGRESS_FOLDER = ".progress"  # per-shard image counters, read by the flow's progress watcher
DASK_CLUSTER_WINDOW = 64  # shard tasks in flight on a cluster of unknown size
def is_transient(error: BaseException) -> bool:
    """Worth retrying: out of GPU memory, or an I/O error that is not a missing or misplaced file."""
    if type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower():
        return True
    permanent = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
    return isinstance(error, OSError) and not isinstance(error, permanent)


def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: retry transient errors only; a bad config or model fails at once."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - the state's exception, re-raised to be inspected
        return is_transient(error)
    return False


@task(
    name="generate-shard",
    task_run_name="shard-{index}",
    retries=SHARD_RETRIES,
    retry_delay_seconds=SHARD_RETRY_DELAY_SECONDS,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,  # the shard's done marker is the cache (see docs/flows.md)
)
def generate_shard_task(
    cfg: GenerateConfig, out_dir: str, index: int, captions: list[Caption], gpu_limit: str | None = None,
    devices: list[str] | None = None,
) -> dict[str, Any]:
    """Generate shard `index` unless it is already complete; return a small record (never images).

    devices: those of a local cluster's workers (worker i runs on devices[i]); None: the config's device."""
    if shard_is_complete(out_dir, cfg.name, index, len(captions), config_sha256(cfg)):
        return {"index": index, "written": False}
    pipe, lock = cached_pipeline(cfg, this_worker_device(devices))
    with lock, _gpu_slot(gpu_limit):  # this process's turn first, then a GPU slot
        start = time.perf_counter()
        counter = ImageCounter(Path(out_dir) / PROGRESS_FOLDER, index)
        record = generate_shard(cfg, out_dir, index, captions, pipe, progress=counter)
    return {"index": index, "written": True, "seconds": round(time.perf_counter() - start, 3), **asdict(record)}


@task(name="write-manifest", task_run_name="write-manifest", cache_policy=NO_CACHE)
def write_manifest_task(cfg: GenerateConfig, out_dir: str, num_shards: int) -> str:
    """manifest.json and sizes.json over all shards, read back from their done markers."""
    return str(write_set_manifest(cfg, out_dir, num_shards))


@flow(name="generate-shards", **PERSISTED_RESULT)
def generate_shards_flow(
    config: str | Path | GenerateConfig | dict[str, Any],
    out_dir: str,
    runner: str = "local",
    dask_address: str | None = None,
    n_workers: int = 2,
    devices: str | list[str] | tuple[str, ...] = "auto",
    overrides: dict | None = None,
    retries: int = SHARD_RETRIES,
    retry_delay_seconds: float = SHARD_RETRY_DELAY_SECONDS,
    gpu_limit: str | None = None,
    artifact_prefix: str | None = None,
) -> dict[str, Any]:
    """Generate the shard set of `config` into `out_dir`: only missing shards, then the manifest.

    runner: "local" (this machine: one worker per entry of `devices`, auto = every visible GPU; one worker runs
    in this process, several as a LocalCluster of processes) or "dask" (a LocalCluster of `n_workers` processes
    on `devices` in turn, or the cluster at `dask_address`, each worker on the config's device).
    gpu_limit: name of a Prefect global concurrency limit each shard holds a slot of while it generates.
    artifact_prefix: starts the keys of the progress and summary artifacts (default: out_dir's name).
    """
    cfg = load_config(GenerateConfig, config, overrides)
    placement = worker_devices(cfg.device, devices)
    workers = len(placement) if runner == "local" else n_workers
    pool = task_runner(runner, dask_address, workers)  # checked before anything is written
    out = str(out_dir)
    check_output_folder(cfg, out)
    record_config(cfg, out)
    plan = shard_plan(cfg)  # the caption list, computed once
    shard_task = generate_shard_task.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    made_by = config_sha256(cfg)
    todo = [(i, captions) for i, captions in enumerate(plan)
            if not shard_is_complete(out, cfg.name, i, len(captions), made_by)]
    total, already = cfg.num_samples, cfg.num_samples - sum(len(captions) for _, captions in todo)
    counters = Path(out) / PROGRESS_FOLDER
    shutil.rmtree(counters, ignore_errors=True)
    prefix = artifact_prefix or artifact_key(Path(out).resolve().name)
    watcher = GenerationWatcher(counters, total, already, key=artifact_key(prefix, "generation-progress"))
    start = time.perf_counter()
    stop.clear()
    with pool, watcher:
        try:
            results, failed = _run_shards(pool, shard_task, todo, window(runner, workers, dask_address),
                                          {"cfg": cfg, "out_dir": out, "gpu_limit": gpu_limit,
                                           "devices": None if dask_address else placement})
        except BaseException:
            # The run is unwinding (Ctrl-C, or Prefect's TerminationSignal for SIGTERM): the pool waits for its
            # threads on the way out, and signals never reach them, so ask them to stop at their next batch.
            stop.request()
            raise
    shutil.rmtree(counters, ignore_errors=True)
    if failed:
        logger.error("%d of %d shards failed; finished shards are kept and a rerun resumes", len(failed), len(todo))
        failed[0].result()  # raises the first failure, which fails the flow run with its message
    manifest = write_manifest_task(cfg, out, len(plan))
    summary = _summary(cfg, out, manifest, results, time.perf_counter() - start)
    create_markdown_artifact(_summary_markdown(summary), key=artifact_key(prefix, "shard-set"),
                             description="shard set")
    logger.info("%s: %d shards written, %d already complete", out, summary["shards_written"],
                summary["shards_skipped"])
    return summary


def window(runner: str, n_workers: int, dask_address: str | None) -> int:
    """Shard tasks in flight at once: as many as can run (one per worker), so a task's time is its own work,
    not a wait in a queue."""
    if runner == "dask" and dask_address is not None:
        return DASK_CLUSTER_WINDOW
    return n_workers


def _run_shards(pool: TaskRunner, shard_task: Task, todo: list[tuple[int, list[Caption]]], size: int,
                arguments: dict[str, Any]) -> tuple[list[dict], list]:
    """Submit the shard tasks at most `size` at a time; (results of the completed, futures of the failed)."""
    waiting, running, results, failed = list(reversed(todo)), [], [], []
    while waiting or running:
        while waiting and len(running) < size:
            index, captions = waiting.pop()
            running.append(pool.submit(shard_task, {**arguments, "index": index, "captions": captions}))
        done = wait(running, timeout=1.0).done
        for future in done:
            future.wait()  # done as a future; its final state may still be on its way
            (results.append(future.result()) if future.state.is_completed() else failed.append(future))
        running = [future for future in running if future not in done]
    return results, failed


def task_runner(runner: str, dask_address: str | None = None, n_workers: int = 2) -> TaskRunner:
    """The task runner for the shard tasks (entered by the flow): threads here, or Dask worker processes.

    local: one worker is this process (threads; one pipeline), several a LocalCluster, one process per device."""
    if runner not in RUNNERS:
        raise ConfigError(f"runner={runner!r}: use one of {', '.join(RUNNERS)}")
    if runner == "local" and n_workers == 1:
        return ThreadPoolTaskRunner(max_workers=4)
    from prefect_dask import DaskTaskRunner

    if runner == "dask" and dask_address:
        return DaskTaskRunner(address=dask_address)
    if n_workers < 1:
        raise ConfigError(f"n_workers={n_workers}: must be >= 1")
    # Processes, one thread each: each worker holds one pipeline and runs one shard at a time.
    cluster = {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
               "silence_logs": logging.WARNING}
    return DaskTaskRunner(cluster_kwargs=cluster)


@contextmanager
def _gpu_slot(limit: str | None) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `limit` (none: no limit)."""
    if limit is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, occupy=1, strict=True):
        yield


def _summary(cfg: GenerateConfig, out: str, manifest: str, results: list[dict], seconds: float) -> dict[str, Any]:
    written = [r for r in results if r["written"]]
    return run_summary(cfg, out, manifest, shards=cfg.num_shards, written=len(written),
                       images=sum(r["count"] for r in written), seconds=seconds)


def _summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Shard set", "", "| | |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in summary.items()]
    return "\n".join(lines) + "\n"
