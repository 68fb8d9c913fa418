"""Generate a shard set: captions -> batches of images -> WebDataset shards -> manifest; resumable."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

from generation.config import GenerateConfig
from generation.images import generate_batch, image_seed, resize_for_storage
from generation.pipeline import load_pipeline, resolve_model_source
from generation.workers import cached_pipeline, generate_on_cluster, this_worker_device, worker_devices
from parclean import stop
from parclean.config import to_dict, write_resolved
from parclean.outputs import output_lock
from parclean.shards import (
    MANIFEST_NAME,
    Sample,
    ShardRecord,
    read_manifest,
    read_shard_record,
    sample_key,
    shard_is_complete,
    write_manifest,
    write_shard,
)
from prompts.bank import load_bank
from prompts.expand import Caption, expand

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"


def caption_list(cfg: GenerateConfig) -> list[Caption]:
    """All captions of the run, in order: a function of (bank, num_samples, seed)."""
    bank = load_bank(cfg.bank)
    return expand(bank, cfg.num_samples, cfg.seed, allow_duplicates=cfg.allow_duplicate_captions)


def shard_plan(cfg: GenerateConfig, captions: list[Caption] | None = None) -> list[list[Caption]]:
    """The captions of each shard: consecutive runs of `shard_size` (the last may be shorter)."""
    captions = caption_list(cfg) if captions is None else captions
    return [captions[start : start + cfg.shard_size] for start in range(0, len(captions), cfg.shard_size)]


def generate_shards(cfg: GenerateConfig, out_dir: str | Path, *, progress: bool = True,
                    devices: str | Sequence[str] = "auto", dask_address: str | None = None) -> dict:
    """Generate every shard that is not complete, then the manifest; return a small summary.

    devices: one worker per entry; "auto" is every visible GPU (or cfg.device). Several run as local Dask
    worker processes. dask_address: run the shards on that Dask cluster instead (one worker per GPU).
    """
    with output_lock(out_dir, f"parclean generate --out {out_dir}"):
        return _generate_shards(cfg, Path(out_dir), progress, worker_devices(cfg.device, devices), dask_address)


def _generate_shards(cfg: GenerateConfig, out_dir: Path, progress: bool, devices: list[str],
                     dask_address: str | None) -> dict:
    check_output_folder(cfg, out_dir)
    plan = shard_plan(cfg)
    digest = config_sha256(cfg)
    todo = [i for i, caps in enumerate(plan) if not shard_is_complete(out_dir, cfg.name, i, len(caps), digest)]
    in_process = len(devices) == 1 and dask_address is None
    # Loaded only when some shard needs work, and before anything is written, so a bad model writes nothing.
    pipe = load_pipeline(cfg, device=devices[0]) if todo and in_process else None
    if todo and not in_process:
        resolve_model_source(cfg.model)  # workers load their own copies: the path is checked here first
    record_config(cfg, out_dir)
    logger.info("%s: %d of %d shards to generate", out_dir, len(todo), len(plan))
    images = sum(len(plan[i]) for i in todo)
    bar = tqdm(total=images, unit="img", desc="generate", disable=not (progress and _is_main_process()))
    start = time.perf_counter()
    if in_process:
        records = {index: generate_shard(cfg, out_dir, index, plan[index], pipe, progress=bar) for index in todo}
    else:
        shards = [(i, plan[i]) for i in todo]
        records = generate_on_cluster(generate_shard_on_worker, cfg, out_dir, shards, devices=devices,
                                      address=dask_address, done=bar.update) if todo else {}
    bar.close()
    seconds = time.perf_counter() - start
    manifest = write_set_manifest(cfg, out_dir, len(plan), records)
    summary = run_summary(cfg, out_dir, manifest, shards=len(plan), written=len(todo), images=images,
                          seconds=seconds)
    return {**summary, "workers": dask_address or devices}


def run_summary(cfg: GenerateConfig, out_dir: str | Path, manifest: str | Path, *, shards: int, written: int,
                images: int, seconds: float) -> dict:
    """The small summary a generation run returns (and a flow publishes)."""
    return {
        "out_dir": str(out_dir),
        "manifest": str(manifest),
        "shards": shards,
        "shards_written": written,
        "shards_skipped": shards - written,
        "samples": cfg.num_samples,
        "images_generated": images,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 3) if images else None,
    }


def generate_shard(
    cfg: GenerateConfig,
    out_dir: str | Path,
    index: int,
    captions: list[Caption],
    pipe: DiffusionPipeline | None = None,
    *,
    progress: tqdm | None = None,
) -> ShardRecord:
    """Generate shard `index` from its captions and write it (atomically, stats last); one task's work."""
    if not 1 <= len(captions) <= cfg.shard_size:
        raise ValueError(f"shard {index}: {len(captions)} captions; expected 1..shard_size={cfg.shard_size}")
    pipe = load_pipeline(cfg) if pipe is None else pipe
    scheduler = type(pipe.scheduler).__name__
    start = time.perf_counter()
    samples = []
    for first in range(0, len(captions), cfg.batch_size):
        stop.check(f"shard {index}")  # nothing of this shard is written: a rerun generates it again
        batch = captions[first : first + cfg.batch_size]
        seeds = [image_seed(cfg.seed, caption.index) for caption in batch]
        generated = generate_batch(pipe, [caption.text for caption in batch], seeds, cfg)
        for offset, (caption, seed, image, nsfw) in enumerate(zip(batch, seeds, *generated, strict=True)):
            meta = {
                "caption_index": caption.index,
                "prompt_id": caption.prompt_id,
                "concept": caption.concept,
                "seed": seed,
                "model": cfg.model,
                "scheduler": scheduler,
                "steps": cfg.steps,
                "guidance": cfg.guidance,
                "resolution": [image.width, image.height],
                "nsfw": nsfw,
            }
            stored = resize_for_storage(image.convert("RGB"), cfg.store_size)
            key = sample_key(index, first + offset, cfg.shard_size)
            samples.append(Sample(key=key, image=stored, caption=caption.text, meta=meta))
        if progress is not None:
            progress.update(len(batch))
    seconds = time.perf_counter() - start
    return write_shard(
        out_dir,
        cfg.name,
        index,
        samples,
        image_format=cfg.image_format,
        jpeg_quality=cfg.jpeg_quality,
        seconds=seconds,
        config_sha256=config_sha256(cfg),
    )


def generate_shard_on_worker(cfg: GenerateConfig, out_dir: str, index: int, captions: list[Caption],
                             devices: Sequence[str] | None) -> ShardRecord:
    """One shard on this Dask worker's device (worker i of a local cluster: devices[i]), with its pipeline."""
    pipe, lock = cached_pipeline(cfg, this_worker_device(devices))
    with lock:
        return generate_shard(cfg, out_dir, index, captions, pipe)


def write_set_manifest(
    cfg: GenerateConfig, out_dir: str | Path, num_shards: int, records: dict[int, ShardRecord] | None = None
) -> Path:
    """Write manifest.json and sizes.json over all shards (records of shards written earlier read back)."""
    records = dict(records or {})
    for index in range(num_shards):
        if index not in records:
            records[index] = read_shard_record(out_dir, cfg.name, index)
    return write_manifest(out_dir, cfg.name, [records[i] for i in range(num_shards)], config=to_dict(cfg),
                          config_sha256=config_sha256(cfg))


def config_sha256(cfg: GenerateConfig) -> str:
    """sha256 of the resolved config: the name of the settings that made a shard."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def check_output_folder(cfg: GenerateConfig, out_dir: str | Path) -> None:
    """Refuse a folder whose shards were made with other settings, so a resume never mixes them."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: not a folder")
    has_output = (out_dir / MANIFEST_NAME).is_file() or any(out_dir.glob("*.tar"))
    if not has_output:
        return
    config_path = out_dir / CONFIG_NAME
    if config_path.is_file():
        previous = yaml.safe_load(config_path.read_text())
    elif (out_dir / MANIFEST_NAME).is_file():
        previous = read_manifest(out_dir).get("config")
    else:
        raise ValueError(f"{out_dir}: holds shards but no {CONFIG_NAME}; use a new --out folder")
    current = to_dict(cfg)
    if previous != current:
        previous = previous if isinstance(previous, dict) else {}
        changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
        detail = ", ".join(f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise ValueError(
            f"{out_dir}: its shards were made with a different config ({detail}); "
            f"use a new --out folder for these settings, or the old settings to resume"
        )


def record_config(cfg: GenerateConfig, out_dir: str | Path) -> Path:
    """Write the resolved config beside the shards (config.yaml)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CONFIG_NAME
    write_resolved(cfg, path)
    return path


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
