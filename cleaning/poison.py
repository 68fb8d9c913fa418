"""Poison a shard set: a share of the pairs get a trigger in the image and a target caption.

This is how a user makes a poisoned model to test a cleaner against: poison clean shards here, then
fine-tune on them (`parclean clean` with the `ft` objective).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from parclean.attacks import Trigger, apply_trigger, poison_indices, target_captions
from parclean.outputs import output_lock, require_empty
from parclean.shards import Sample, ShardRecord, iter_samples, read_manifest, write_manifest, write_shard

logger = logging.getLogger(__name__)


def poison_shards(source: str, out_dir: str | Path, trigger: Trigger, *, rate: float, target: str,
                  seed: int = 0) -> dict:
    """Copy the shard set at `source` into `out_dir`, poisoning round(rate * N) pairs chosen by `seed`."""
    out_dir = Path(out_dir)
    manifest = read_manifest(source)
    if Path(out_dir).resolve() == Path(str(source)).resolve():
        raise ValueError(f"{out_dir}: poisoned shards must go to a new folder, not over their source")
    with output_lock(out_dir, f"parclean poison --out {out_dir}"):
        require_empty(out_dir, "poisoned shards go to a new, empty folder")
        return _poison_shards(source, out_dir, manifest, trigger, rate, target, seed)


def _poison_shards(source: str, out_dir: Path, manifest: dict, trigger: Trigger, rate: float, target: str,
                   seed: int) -> dict:
    total = int(manifest["total_samples"])
    chosen = set(poison_indices(total, rate, seed).tolist())
    # The recipe and the source shards' sha256s: what each poisoned shard records as the config that made it.
    config = {"source": str(source), "trigger": trigger.__dict__, "rate": rate, "target": target, "seed": seed,
              "poisoned": len(chosen), "source_config": manifest.get("config"),
              "source_shards": [{"filename": s["filename"], "sha256": s["sha256"]} for s in manifest["shards"]]}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    captions = iter(target_captions(target, len(chosen), seed))
    counts = [int(s["count"]) for s in manifest["shards"]]
    name = manifest["name"]
    records: list[ShardRecord] = []
    samples: list[Sample] = []
    for index, (key, image, caption, meta) in enumerate(iter_samples(source)):
        if index in chosen:
            image = _triggered(image, trigger, seed * 1_000_003 + index)
            caption = next(captions)
            meta = {**meta, "poisoned": True, "original_caption": meta.get("caption", caption)}
        meta = {k: v for k, v in meta.items() if k not in ("key", "caption")}
        samples.append(Sample(key, image, caption, meta))
        if len(samples) == counts[len(records)]:
            records.append(write_shard(out_dir, name, len(records), samples, image_format="png",
                                       config_sha256=digest))
            samples = []
    write_manifest(out_dir, name, records, config, config_sha256=digest)
    logger.info("%s: poisoned %d of %d pairs", out_dir, len(chosen), total)
    return {"out_dir": str(out_dir), "samples": total, "poisoned": len(chosen)}


def _triggered(image: PIL.Image.Image, trigger: Trigger, seed: int) -> PIL.Image.Image:
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    out = apply_trigger(array[None], trigger, [seed])[0]
    return PIL.Image.fromarray(out.mul(255).round().byte().permute(1, 2, 0).numpy())
